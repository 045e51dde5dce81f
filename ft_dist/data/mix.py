"""Mixing several sources with weights: which training rows each source contributes, and how often.

A weight w uses each training example of its source floor(w) times, plus a seeded random share (w - floor(w)) of
them once more: 0.5 keeps a random half, 2 repeats every example, 1.5 adds a random half on top. Only the train
split is reweighted; the test split keeps one row per held-out example so metrics stay per example.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def weighted_indices(source_ids: np.ndarray, weights: Sequence[float], seed: int) -> np.ndarray:
    """Row indices of the mixed training set (shuffled, since repeats would otherwise sit together)."""
    rng = np.random.default_rng(seed)
    picked = []
    for sid, weight in enumerate(weights):
        rows = np.flatnonzero(source_ids == sid)
        whole, frac = int(weight), weight - int(weight)
        picked.extend([rows] * whole)
        if frac > 0:
            picked.append(rng.choice(rows, size=int(round(frac * len(rows))), replace=False))
    out = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
    rng.shuffle(out)
    return out
