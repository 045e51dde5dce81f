"""Deterministic train/test split of raw records (before tokenization, so it does not depend on the tokenizer)."""

from __future__ import annotations

from typing import Any, Tuple

from ft_dist.errors import ConfigError


def split_train_test(ds: Any, test_size: float, seed: int) -> Tuple[Any, Any]:
    """Same inputs and seed -> same split, on any machine (datasets' seeded permutation)."""
    n_test = int(test_size) if test_size >= 1 else max(1, round(len(ds) * test_size))
    if n_test >= len(ds):
        raise ConfigError("data.test_size", f"expected fewer test examples than the {len(ds)} available, got {n_test}")
    parts = ds.train_test_split(test_size=n_test, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
