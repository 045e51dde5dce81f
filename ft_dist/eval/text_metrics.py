"""Scores of generated answers against references (owned by the evaluation issue; extended there)."""

from __future__ import annotations

import re
import string
from typing import Dict, Sequence


def normalize(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation or articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def score_generations(predictions: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    """Mean exact match (after stripping whitespace) and normalised match."""
    n = max(len(references), 1)
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / n
    norm = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / n
    return {"exact_match": exact, "normalized_match": norm}
