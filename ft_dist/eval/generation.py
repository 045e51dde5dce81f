"""Batched greedy generation through the data template, and the task metric on the test split.

Prompts are sorted by length and cut into batches, so each batch pads little (length bucketing); outputs are put
back in the original order. Under torchrun each rank generates its share and the answers are gathered.

A sharded model (FSDP2, ZeRO-3) gathers its weights collectively in every forward, so all ranks must call it the
same number of times: each rank runs the same number of batches (a rank with fewer prompts repeats one, discarding
the answer) and `synced_gpus=True` keeps every rank stepping until the longest answer of any rank is done.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

import torch
from torch import nn

from ft_dist import dist
from ft_dist.eval.schema import EvalConfig
from ft_dist.eval.text_metrics import score_generations


def batch_rounds(n: int, world_size: int, batch_size: int) -> int:
    """Generation batches every rank runs when `n` prompts are dealt round-robin over `world_size` ranks."""
    return math.ceil(math.ceil(n / world_size) / batch_size) if n else 0


@dataclass
class Generation:
    text: str
    truncated: bool
    """Stopped at max_new_tokens without an EOS."""


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
    synced: bool = False,
    rounds: int = 0,
    filler: str = "",
) -> List[Generation]:
    """Greedy continuations of `prompts` (already rendered through the template), in input order.

    `synced`: the model is sharded; run exactly `rounds` batches (padding with `filler` prompts whose answers are
    discarded) and generate with synced_gpus, so every rank takes part in every forward.
    """
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: List[Generation] = [Generation("", False)] * len(prompts)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if synced:
        encoded.append(tokenizer(filler, add_special_tokens=True)["input_ids"])
        batches += [[len(encoded) - 1]] * (rounds - len(batches))
    # One bar on rank 0; FT_DIST_NO_PROGRESS=1 (tests, logs to files) turns it off as for the training bar.
    show = progress and dist.is_main() and os.environ.get("FT_DIST_NO_PROGRESS") != "1"
    for idx in tqdm(batches, desc="generate", disable=not show, leave=False):
        width = max(len(encoded[i]) for i in idx)
        # Left padding: every prompt ends where generation starts.
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        out = model.generate(  # type: ignore[operator]  # transformers' generate, not visible on nn.Module
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
            synced_gpus=synced,
        )
        for row, i in enumerate(idx):
            if i >= len(prompts):  # a filler batch
                continue
            new = out[row, width:].tolist()
            hit_eos = eos in new
            new = new[: new.index(eos)] if hit_eos else new
            results[i] = Generation(
                tokenizer.decode(new, skip_special_tokens=True), truncated=not hit_eos and len(new) >= max_new_tokens
            )
    if was_training:
        model.train()
    return results


def task_metrics(
    model: nn.Module, tokenizer: Any, test: Any, eval_cfg: EvalConfig, device: torch.device, synced: bool = False
) -> Dict[str, Any]:
    """Generate an answer for each test prompt and score it against the reference response.

    `synced`: `model` is sharded over the ranks (see generate); otherwise each rank holds it whole.
    """
    n = len(test) if not eval_cfg.max_examples else min(len(test), eval_cfg.max_examples)
    world = dist.world()
    mine = list(range(world.rank, n, world.size))
    rows = test[mine] if mine else {"prompt_text": [], "response": []}
    filler = test[0]["prompt_text"] if synced and n else ""
    outs = generate(
        model,
        tokenizer,
        rows["prompt_text"],
        eval_cfg.max_new_tokens,
        eval_cfg.batch_size,
        device,
        synced=synced,
        rounds=batch_rounds(n, world.size, eval_cfg.batch_size),
        filler=filler,
    )
    shards = [(i, o.text, o.truncated) for i, o in zip(mine, outs)]
    if world.distributed:
        gathered: List[Any] = [None] * world.size
        torch.distributed.all_gather_object(gathered, shards)
        shards = sorted((x for part in gathered for x in part), key=lambda x: x[0])
    predictions = [text for _, text, _ in shards]
    references = test[:n]["response"]
    scores = score_generations(predictions, references)
    scores["examples"] = n
    samples = [
        {"prompt": p, "reference": r, "prediction": g, "truncated": t}
        for p, r, (_, g, t) in zip(test[:n]["prompt"], references, shards)
    ]
    return {"scores": scores, "samples": samples}
