"""Records -> token ids and labels, with the loss on responses (assistant turns) only, and the length policy.

Prompt/response records: prompt and response are tokenized separately (the prompt with the tokenizer's special
tokens, e.g. BOS) so the prompt tokens seen in training are exactly those `generate` sees at inference. Chat
records (and `template=tokenizer`) go through the chat template, see ft_dist/data/chat.py. Labels are -100 where
there is no loss; the first token never carries a label (nothing predicts it), which keeps `num_loss_tokens`
exact and stops a packed example from being trained to follow the previous one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ft_dist.data.chat import encode_conversation, generation_prompt, with_system_prompt
from ft_dist.data.templates import render_prompt

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodeSettings:
    """The `data.*` values tokenization depends on (plain values: they travel to datasets.map worker processes)."""

    template: str
    chat_template: Optional[str]
    """Jinja template for chat rendering (None: prompt/response data uses the named string template)."""
    system_prompt: Optional[str]
    train_on_prompt: bool
    max_seq_len: int
    truncation_side: str
    overlong: str


def apply_length_policy(
    ids: List[int], labels: List[int], max_seq_len: int, side: str
) -> Tuple[List[int], List[int], bool]:
    """Cut an over-long example to max_seq_len from the right (its end) or the left (its start)."""
    if len(ids) <= max_seq_len:
        return ids, labels, False
    if side == "left":
        return ids[-max_seq_len:], labels[-max_seq_len:], True
    return ids[:max_seq_len], labels[:max_seq_len], True


def _encoded(
    batch: Dict[str, List[Any]], tokenizer: Any, s: EncodeSettings
) -> Iterator[Tuple[str, List[int], List[int]]]:
    """(prompt_text, input_ids, labels) per row, before the length policy."""
    if s.chat_template is not None:
        for row in (dict(zip(batch, values)) for values in zip(*batch.values())):
            messages = _messages_of(row, s)
            ids, trained = encode_conversation(tokenizer, messages, s.chat_template, s.train_on_prompt)
            yield (
                generation_prompt(tokenizer, messages, s.chat_template),
                ids,
                [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained)],
            )
        return
    prompt_texts = [render_prompt(s.template, p, c) for p, c in zip(batch["prompt"], batch["context"])]
    # One call per column: the fast tokenizer encodes the whole batch in Rust, far quicker than row by row.
    prompts = tokenizer(prompt_texts, add_special_tokens=True)["input_ids"]
    responses = tokenizer(batch["response"], add_special_tokens=False)["input_ids"]
    for text, p, r in zip(prompt_texts, prompts, responses):
        r = r + [tokenizer.eos_token_id]
        yield text, p + r, (p if s.train_on_prompt else [IGNORE_INDEX] * len(p)) + r


def _messages_of(row: Dict[str, Any], s: EncodeSettings) -> List[Dict[str, str]]:
    if row["messages"]:
        messages = list(row["messages"])
    else:  # prompt/response data through a chat template: one user turn, one assistant turn
        user = f"{row['prompt']}\n\n{row['context']}" if row["context"] else row["prompt"]
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["response"]}]
    return with_system_prompt(messages, s.system_prompt)


def encode_batch(batch: Dict[str, List[Any]], tokenizer: Any, settings: EncodeSettings) -> Dict[str, List[Any]]:
    """A `datasets.map(batched=True)` function: adds prompt_text, input_ids, labels and the length-policy outcome.

    `keep` is False for examples to drop (overlong=drop, or no loss token left after truncation), and `truncated`
    records what was cut, so every run can report both counts. `length` is the token count after the policy.
    """
    out: Dict[str, List[Any]] = {
        k: [] for k in ("prompt_text", "input_ids", "labels", "num_loss_tokens", "length", "truncated", "keep")
    }
    for prompt_text, ids, labels in _encoded(batch, tokenizer, settings):
        ids, labels, truncated = apply_length_policy(ids, labels, settings.max_seq_len, settings.truncation_side)
        labels = [IGNORE_INDEX] + labels[1:]
        n_loss = sum(1 for x in labels if x != IGNORE_INDEX)
        out["prompt_text"].append(prompt_text)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["num_loss_tokens"].append(n_loss)
        out["length"].append(len(ids))
        out["truncated"].append(truncated)
        out["keep"].append(n_loss > 0 and not (truncated and settings.overlong == "drop"))
    return out
