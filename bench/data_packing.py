"""Packed vs padded batches on lamini_docs with the GPT-NeoX tokenizer: non-pad share and effective tokens/s.

Both arms train the same small GPT-NeoX model built from config (same seed) on CPU for the same number of optimizer
steps, in this one run: padded = one example per row, padded to the longest in the micro-batch; packed = examples
packed into rows of max_seq_len with restarting positions (ft_dist.data.pack). Effective tokens/s counts non-pad
tokens only (ft_dist.data.batching.count_real_tokens). Prints both and the speed-up ratio; packing must reach
>= 95 % non-pad tokens. Usage: python bench/data_packing.py [--steps 20] [--micro-batch 8] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ASSETS = Path(os.environ.get("FT_DIST_ASSETS", REPO.parent / "shared" / "assets"))


def train_arm(model_cfg, tok, dataset, steps: int, micro: int, warmup: int) -> dict:
    import torch

    from ft_dist.data.batching import GlobalBatchSampler, collate, count_real_tokens, examples_from_rows
    from ft_dist.models import build_model

    torch.manual_seed(0)
    model = build_model(model_cfg, tok).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sampler = GlobalBatchSampler(len(dataset), micro, 1, 1, 0, seed=0)
    n_loss_col = dataset["num_loss_tokens"]
    real = slots = 0
    seconds = 0.0
    for step in range(warmup + steps):
        idx = sampler.global_indices(step)
        batch = collate(examples_from_rows(dataset[idx]), tok.pad_token_id)
        t = time.perf_counter()
        out = model(**batch, use_cache=False, num_items_in_batch=sum(n_loss_col[i] for i in idx))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:  # the first steps pay one-off allocation costs
            seconds += time.perf_counter() - t
            real += count_real_tokens(batch)
            slots += batch["input_ids"].numel()
    return {"non_pad_share": real / slots, "tokens_per_s": real / seconds, "seconds": seconds, "real_tokens": real}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    import torch
    from omegaconf import OmegaConf

    from ft_dist.data.prepare import prepare_dataset
    from ft_dist.data.schema import DataConfig
    from ft_dist.models import load_tokenizer

    torch.set_num_threads(args.threads)
    model_cfg = OmegaConf.create({
        "name": "neox-small", "name_or_path": None, "from_config": True, "tokenizer": str(ASSETS / "tokenizers" / "gpt-neox-20b"),
        "trust_remote_code": False, "attn_implementation": "sdpa", "gradient_checkpointing": False,
        "arch": {"model_type": "gpt_neox", "vocab_size": 50304, "hidden_size": args.hidden, "num_hidden_layers": args.layers,
                 "num_attention_heads": 4, "intermediate_size": 4 * args.hidden, "max_position_embeddings": 2048,
                 "rotary_pct": 0.25, "use_parallel_residual": True, "tie_word_embeddings": False}})
    tok = load_tokenizer(model_cfg)
    with tempfile.TemporaryDirectory() as cache:
        base = {"name": "lamini", "path": str(ASSETS / "datasets" / "lamini_docs.jsonl"), "cache_dir": cache,
                "max_seq_len": args.seq_len, "test_size": 0.1}
        padded = prepare_dataset(OmegaConf.merge(OmegaConf.structured(DataConfig), base), tok)
        packed = prepare_dataset(OmegaConf.merge(OmegaConf.structured(DataConfig), {**base, "packing": True}), tok)
        print(f"lamini_docs, GPT-NeoX tokenizer: {padded.stats['train']} train examples; packed into "
              f"{packed.stats['packing']['rows']} rows of {args.seq_len} ({100 * packed.stats['packing']['efficiency']:.1f} % full)")
        print(f"model: gpt_neox hidden {args.hidden} x {args.layers} layers from config, micro-batch {args.micro_batch}, "
              f"{args.steps} timed steps per arm, {args.threads} threads")
        results = {name: train_arm(model_cfg, tok, ds.train, args.steps, args.micro_batch, args.warmup)
                   for name, ds in (("padded", padded), ("packed", packed))}
    for name, r in results.items():
        print(f"{name:>7}: non-pad {100 * r['non_pad_share']:5.1f} %  effective {r['tokens_per_s']:8.0f} tokens/s "
              f"({r['real_tokens']} tokens in {r['seconds']:.1f} s)")
    ratio = results["packed"]["tokens_per_s"] / results["padded"]["tokens_per_s"]
    print(f"speed-up (effective tokens/s, packed / padded): {ratio:.2f}x")
    if results["packed"]["non_pad_share"] < 0.95:
        print("FAIL: packing below 95 % non-pad tokens")
        sys.exit(1)


if __name__ == "__main__":
    main()
