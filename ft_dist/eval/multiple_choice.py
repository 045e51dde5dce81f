"""Multiple-choice scoring by log-likelihood, the way lm-eval scores ARC, HellaSwag, MMLU or TruthfulQA-MC.

Each choice is scored by the summed log-probability the model gives its tokens after the question's context. The
pick is the best choice by the raw sum (`acc`), by the sum per token (`acc_norm_token`) and by the sum per character
of the choice (`acc_norm`, lm-eval's definition). The raw sum favours short choices (fewer tokens, fewer negative
terms); the normalised picks correct for that.

This native scorer uses the model's own forward and needs nothing beyond transformers; it serves in-training
evaluation and machines without lm-eval. It formats and tokenizes exactly as lm-eval's HF backend does
(`harness.py` writes the same template into its task file), so both give the same log-likelihoods.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ft_dist.errors import DataError

CONTEXT_TEMPLATE = "Question: {question}\nAnswer:"
"""The context each choice continues; lm-eval's ARC and MMLU tasks use this shape."""
TARGET_DELIMITER = " "
"""Put between context and choice, as lm-eval's default `target_delimiter` for multiple-choice tasks."""


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One question, its choices, and the index of the correct choice."""

    question: str
    choices: Tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class ChoiceScore:
    """Log-likelihood of one choice given the context, and the lengths it is normalised by."""

    loglikelihood: float
    num_tokens: int
    num_chars: int


def parse_item(record: Dict, where: str = "item") -> MultipleChoiceItem:
    """A {question, choices, answer} record as an item; `answer` is an index or the text of a choice."""
    try:
        question, choices, answer = record["question"], record["choices"], record["answer"]
    except KeyError as err:
        raise DataError(f"{where}: missing key {err}; expected question, choices, answer") from None
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: choices must be a list of at least two strings")
    if isinstance(answer, str):
        # The text of a choice wins over reading digits as an index: choices may themselves be numbers.
        if answer in choices:
            answer = choices.index(answer)
        elif answer.isdigit():
            answer = int(answer)
        else:
            raise DataError(f"{where}: answer {answer!r} is not one of the choices")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(f"{where}: answer {answer!r} is not an index into {len(choices)} choices")
    return MultipleChoiceItem(question=str(question), choices=tuple(choices), answer=answer)


def load_items(path: Union[str, Path]) -> List[MultipleChoiceItem]:
    """Read a JSONL file of {question, choices, answer} records (answer: index or choice text)."""
    items = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"invalid JSON ({err.msg})", str(path), line_no) from None
            items.append(parse_item(record, where=f"{path}:{line_no}"))
    if not items:
        raise DataError("no items", str(path))
    return items


def format_context(question: str) -> str:
    """The text every choice of `question` is scored after."""
    return CONTEXT_TEMPLATE.format(question=question)


def encode_pair(tokenizer, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    """Token ids of context and continuation, split as lm-eval's HF backend splits them.

    Encoding the whole string and cutting it after the context's tokens keeps the merges a tokenizer makes across
    the boundary; a trailing space of the context moves to the continuation so that " word" stays one token.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


def model_max_length(model, default: int = 2048) -> int:
    """The context length from the model's config, found as lm-eval's HF backend finds it."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def _batch_loglikelihoods(model, pairs: Sequence[Tuple[List[int], List[int]]], max_length: int) -> List[float]:
    """Summed log-probabilities of each pair's continuation, one right-padded forward for the batch."""
    # Keep the last max_length + 1 tokens (the continuation and as much context as fits); the final token is
    # only ever a target, never an input.
    rows = [(ctx + cont)[-(max_length + 1) :][:-1] for ctx, cont in pairs]
    width = max(len(r) for r in rows)
    device = next(model.parameters()).device
    input_ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    attention = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, device=device)
        attention[i, : len(row)] = 1
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
    totals = []
    for i, (row, (_, cont)) in enumerate(zip(rows, pairs)):
        # Logits at position t predict token t + 1: the continuation's predictions end at the row's last input.
        positions = torch.arange(len(row) - len(cont), len(row), device=device)
        logprobs = torch.log_softmax(logits[i, positions].float(), dim=-1)
        targets = torch.tensor(cont, device=device)
        totals.append(logprobs.gather(1, targets[:, None]).sum().item())
    return totals


def choice_loglikelihoods(
    model, tokenizer, items: Sequence[MultipleChoiceItem], batch_size: int = 8, max_length: Optional[int] = None
) -> List[List[ChoiceScore]]:
    """Score every choice of every item by its log-likelihood after the item's context.

    `model` is a causal LM (any HF `*ForCausalLM`, PEFT-wrapped or not); it is put in eval mode for the forward and
    returned to its previous mode. Choices are batched across items, `batch_size` choices per forward. Longer
    inputs than `max_length` (default: the model's context length) lose context tokens from the left.
    """
    max_length = max_length or model_max_length(model)
    pairs, owners = [], []
    for item_index, item in enumerate(items):
        context = format_context(item.question)
        for choice in item.choices:
            context_ids, choice_ids = encode_pair(tokenizer, context, TARGET_DELIMITER + choice)
            if not choice_ids:
                raise DataError(f"item {item_index}: choice {choice!r} encodes to no tokens")
            pairs.append((context_ids, choice_ids))
            owners.append((item_index, len(choice_ids), len(choice)))
    was_training = model.training
    model.eval()
    try:
        sums = []
        for start in range(0, len(pairs), batch_size):
            sums.extend(_batch_loglikelihoods(model, pairs[start : start + batch_size], max_length))
    finally:
        model.train(was_training)
    scores: List[List[ChoiceScore]] = [[] for _ in items]
    for total, (item_index, num_tokens, num_chars) in zip(sums, owners):
        scores[item_index].append(ChoiceScore(total, num_tokens, num_chars))
    return scores


def _argmax(values: Sequence[float]) -> int:
    # First index of the maximum, as numpy's argmax (lm-eval) breaks ties.
    return max(range(len(values)), key=lambda i: (values[i], -i))


def predictions(scores: Sequence[ChoiceScore]) -> Dict[str, int]:
    """The index each rule picks: raw sum, sum per token, sum per character."""
    return {
        "acc": _argmax([s.loglikelihood for s in scores]),
        "acc_norm_token": _argmax([s.loglikelihood / s.num_tokens for s in scores]),
        # lm-eval divides by the length of the choice text (without the delimiter); so do we, to match acc_norm.
        "acc_norm": _argmax([s.loglikelihood / max(s.num_chars, 1) for s in scores]),
    }


def mean_and_stderr(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n)), lm-eval's closed form for accuracies."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def accuracy_metrics(scores: Sequence[Sequence[ChoiceScore]], answers: Sequence[int]) -> Dict[str, float]:
    """acc, acc_norm_token, acc_norm and their standard errors (`<name>_stderr`), plus the item count `n`."""
    if len(scores) != len(answers) or not answers:
        raise ValueError(f"{len(scores)} scored items for {len(answers)} answers")
    picks = [predictions(s) for s in scores]
    metrics: Dict[str, float] = {"n": len(answers)}
    for name in ("acc", "acc_norm_token", "acc_norm"):
        mean, stderr = mean_and_stderr([float(p[name] == a) for p, a in zip(picks, answers)])
        metrics[name], metrics[f"{name}_stderr"] = mean, stderr
    return metrics


def score_multiple_choice(
    model, tokenizer, items: Sequence[MultipleChoiceItem], batch_size: int = 8, max_length: Optional[int] = None
) -> Dict[str, object]:
    """Score `items` with `model`: {"metrics": accuracy_metrics(...), "items": per-item log-likelihoods and picks}."""
    scores = choice_loglikelihoods(model, tokenizer, items, batch_size=batch_size, max_length=max_length)
    per_item = [
        {
            "question": item.question,
            "answer": item.answer,
            "loglikelihoods": [s.loglikelihood for s in item_scores],
            "predictions": predictions(item_scores),
        }
        for item, item_scores in zip(items, scores)
    ]
    return {"metrics": accuracy_metrics(scores, [item.answer for item in items]), "items": per_item}
