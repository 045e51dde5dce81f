"""Hygiene and the train/test split: exact-duplicate removal after normalisation, then a deterministic split.

Both work on raw records (before tokenization), so they do not depend on the tokenizer. Duplicates are found from
a 64-bit hash per example (8 bytes each in memory, whatever the text length), and removed before the split, so
the same example can never be in both train and test.
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Tuple

import numpy as np

from ft_dist.errors import ConfigError


def normalise(text: str) -> str:
    """What counts as the same text: case and runs of whitespace are ignored."""
    return " ".join(text.casefold().split())


def example_key(prompt: str, context: str, response: str, messages: List[Dict[str, str]]) -> int:
    """A 63-bit hash of the normalised example (all its turns for chat data)."""
    parts = [normalise(prompt), normalise(context), normalise(response)]
    parts += [f"{m['role']}:{normalise(m['content'])}" for m in messages or ()]
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # fits Arrow's int64


def add_keys(batch: Dict[str, List[Any]]) -> Dict[str, List[int]]:
    """A `datasets.map(batched=True)` function adding the `key` column."""
    return {
        "key": [
            example_key(p, c, r, m)
            for p, c, r, m in zip(batch["prompt"], batch["context"], batch["response"], batch["messages"])
        ]
    }


def first_occurrences(keys: np.ndarray) -> np.ndarray:
    """Indices of the first example of each distinct key, in dataset order."""
    _, first = np.unique(keys, return_index=True)
    return np.sort(first)


def held_out_count(n: int, test_size: float) -> int:
    n_test = int(test_size) if test_size >= 1 else max(1, round(n * test_size))
    if n_test >= n:
        raise ConfigError("data.test_size", f"expected fewer test examples than the {n} available, got {n_test}")
    return n_test


def split_train_test(ds: Any, test_size: float, seed: int) -> Tuple[Any, Any]:
    """Same inputs and seed -> same split, on any machine (datasets' seeded permutation)."""
    parts = ds.train_test_split(test_size=held_out_count(len(ds), test_size), seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def overlap(train_keys: np.ndarray, test_keys: np.ndarray) -> int:
    """Test examples that also occur in train (0 whenever dedup is on)."""
    return int(np.isin(test_keys, train_keys).sum())


def nested_subset(n: int, fraction: float, seed: int) -> np.ndarray:
    """Indices (sorted) of the `fraction` of n training examples kept: the first round(fraction * n) of one seeded
    permutation, at least one. The permutation depends on n and the seed only, so for the same training split a
    smaller fraction is always a subset of a larger one (the points of a learning curve are nested)."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: max(1, round(fraction * n))])


def keys_digest(keys: np.ndarray) -> str:
    """A short digest of a split's example keys (order-free): equal digests mean the same examples."""
    return hashlib.blake2b(np.sort(keys.astype(np.int64)).tobytes(), digest_size=8).hexdigest()
