"""Prompt + response -> token ids and labels, with the loss on response tokens only.

Prompt and response are tokenized separately (the prompt with the tokenizer's special tokens, e.g. BOS) so the
prompt tokens seen in training are exactly those `generate` sees at inference. Labels are -100 on prompt tokens;
padding is added later by the collator and masked there.
"""

from __future__ import annotations

from typing import Any, Dict, List

IGNORE_INDEX = -100


def tokenize_batch(batch: Dict[str, List[str]], tokenizer: Any, max_seq_len: int, overlong: str) -> Dict[str, List[Any]]:
    """A `datasets.map(batched=True)` function. Over-long examples are cut from the right, or marked for dropping.

    `keep` is False for examples to drop (overlong=drop, or no response token left after truncation), and
    `truncated` records what was cut, so every run can report both counts.
    """
    prompts = tokenizer(batch["prompt_text"], add_special_tokens=True)["input_ids"]
    responses = tokenizer(batch["response"], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out: Dict[str, List[Any]] = {"input_ids": [], "labels": [], "num_loss_tokens": [], "truncated": [], "keep": []}
    for p, r in zip(prompts, responses):
        ids = p + r + [eos]
        labels = [IGNORE_INDEX] * len(p) + r + [eos]
        truncated = len(ids) > max_seq_len
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        n_loss = sum(1 for x in labels if x != IGNORE_INDEX)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["num_loss_tokens"].append(n_loss)
        out["truncated"].append(truncated)
        out["keep"].append(n_loss > 0 and not (truncated and overlong == "drop"))
    return out
