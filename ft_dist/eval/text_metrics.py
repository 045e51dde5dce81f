"""Scores of generated answers against references: exact and normalised match, SQuAD token-F1, ROUGE-L.

Per-example scores (`example_scores`) feed error analysis and model comparison; `score_generations` averages them
over a test split.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache
from typing import Dict, List, Sequence

from rouge_score import rouge_scorer

_PUNCTUATION = frozenset(string.punctuation)


def normalize(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation or articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalized_tokens(text: str) -> List[str]:
    """The whitespace tokens of `normalize(text)`: the unit of token-F1."""
    return normalize(text).split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token-F1: harmonic mean of precision and recall of the normalised token multiset.

    Two empty answers agree (1.0); an empty answer against a non-empty one scores 0.0, as in the SQuAD script.
    """
    pred, ref = normalized_tokens(prediction), normalized_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge_l_scorer() -> rouge_scorer.RougeScorer:
    # No stemming: keeps ROUGE-L comparable to the exact/F1 scores, which do not stem either.
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of tokens), from Google's `rouge-score` package."""
    return _rouge_l_scorer().score(reference, prediction)["rougeL"].fmeasure


def example_scores(prediction: str, reference: str) -> Dict[str, float]:
    """All generation metrics for one answer, keyed as in `score_generations`."""
    return {
        "exact_match": float(prediction.strip() == reference.strip()),
        "normalized_match": float(normalize(prediction) == normalize(reference)),
        "token_f1": token_f1(prediction, reference),
        "rouge_l": rouge_l(prediction, reference),
    }


def score_generations(predictions: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    """Mean exact match (after stripping whitespace), normalised match, token-F1 and ROUGE-L F-measure.

    Raises ValueError when the two lists differ in length: a silent zip would score the wrong pairs.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    keys = ("exact_match", "normalized_match", "token_f1", "rouge_l")
    totals = dict.fromkeys(keys, 0.0)
    for pred, ref in zip(predictions, references):
        for key, value in example_scores(pred, ref).items():
            totals[key] += value
    n = max(len(references), 1)
    return {key: totals[key] / n for key in keys}
