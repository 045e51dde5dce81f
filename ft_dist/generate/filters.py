"""Quality filters. Per pair: empty, too short/long, not grounded in its chunk, in the target's test split. Over
the whole output, in chunk order (so any number of ranks and any resume give the same result): exact duplicates
(normalised text) and near duplicates (datasketch MinHash LSH)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Optional, Set, Tuple

from rouge_score import rouge_scorer

from ft_dist.data.split import normalise
from ft_dist.generate.schema import FilterConfig

PAIR_FILTERS = ("empty", "too_short", "too_long", "ungrounded", "test_overlap")
ORDER_FILTERS = ("duplicate", "near_duplicate")


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def grounding(answer: str, chunk: str) -> float:
    """ROUGE-L precision of the answer against its chunk: the share of its words the chunk has, in order."""
    return float(_scorer().score(chunk, answer)["rougeL"].precision)


def pair_verdict(question: str, answer: str, chunk: str, cfg: FilterConfig, test_texts: Set[str]) -> Optional[str]:
    """The first per-pair filter that drops this pair, or None to keep it."""
    a = answer.strip()
    if not a or not question.strip():
        return "empty"
    if len(a) < cfg.min_answer_chars:
        return "too_short"
    if len(a) > cfg.max_answer_chars:
        return "too_long"
    if grounding(a, chunk) < cfg.min_grounding:
        return "ungrounded"
    if normalise(question) in test_texts or normalise(a) in test_texts:
        return "test_overlap"
    return None


class DuplicateIndex:
    """Exact and near duplicates among the pairs seen so far; rebuilt from scratch over the kept pairs each merge."""

    def __init__(self, cfg: FilterConfig):
        from datasketch import MinHashLSH

        self.cfg = cfg
        self.exact: Set[Tuple[str, str]] = set()
        self.lsh = MinHashLSH(threshold=cfg.near_duplicate, num_perm=cfg.num_perm)
        self.count = 0

    def _minhash(self, text: str) -> Any:
        from datasketch import MinHash

        m = MinHash(num_perm=self.cfg.num_perm, seed=1)
        grams = {text[i : i + 5] for i in range(max(len(text) - 4, 1))}
        m.update_batch([g.encode() for g in sorted(grams)])
        return m

    def verdict(self, question: str, answer: str) -> Optional[str]:
        """'duplicate', 'near_duplicate', or None (then the pair is added to the index)."""
        key = (normalise(question), normalise(answer))
        if key in self.exact:
            return "duplicate"
        m = self._minhash(" ".join(key))
        if self.lsh.query(m):
            return "near_duplicate"
        self.exact.add(key)
        self.lsh.insert(str(self.count), m)
        self.count += 1
        return None
