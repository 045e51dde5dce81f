"""Packing: several tokenized examples per row, positions restarting at each example.

Rows are filled by best-fit decreasing (each example, longest first, goes into the open row it fills most
tightly), which is at least as tight as first-fit decreasing. Each packed row carries `position_ids` that restart
at 0 for every example; transformers detects that (with no attention mask given) and builds a block-diagonal
causal mask for SDPA and eager attention, or variable-length kernels for flash-attention, so an example never
attends to its neighbours. Each example's first label is already -100 (ft_dist/data/tokenize.py), so no example
is trained to predict the start of the next one. The loss of a packed row equals the sum of its examples' losses.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np


def pack_lengths(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Best-fit decreasing: groups of example indices whose lengths sum to at most `capacity`.

    Open rows are kept in buckets by their free space, so the tightest row that fits is found by scanning at most
    `capacity` bucket counts (in numpy) instead of every open row: O(n * capacity / SIMD width), fine for millions.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: List[List[int]] = []
    by_free: List[List[int]] = [[] for _ in range(capacity + 1)]  # free space -> open rows with that much
    counts = np.zeros(capacity + 1, dtype=np.int64)
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the row capacity {capacity}")
        fits = np.flatnonzero(counts[n:])
        if len(fits):
            free = n + int(fits[0])
            row = by_free[free].pop()
            counts[free] -= 1
        else:
            free, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        left = free - n
        if left > 0:
            by_free[left].append(row)
            counts[left] += 1
    return rows


def pack_batch(batch: Dict[str, List[Any]], capacity: int) -> Dict[str, List[Any]]:
    """A `datasets.map(batched=True, batch_size=pack_window)` function: a window of examples -> packed rows."""
    groups = pack_lengths([len(x) for x in batch["input_ids"]], capacity)
    out: Dict[str, List[Any]] = {
        "input_ids": [],
        "labels": [],
        "position_ids": [],
        "num_loss_tokens": [],
        "num_examples": [],
        "length": [],
    }
    for group in groups:
        ids: List[int] = []
        labels: List[int] = []
        positions: List[int] = []
        for i in group:
            ids += batch["input_ids"][i]
            labels += batch["labels"][i]
            positions += range(len(batch["input_ids"][i]))
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["position_ids"].append(positions)
        out["num_loss_tokens"].append(sum(batch["num_loss_tokens"][i] for i in group))
        out["num_examples"].append(len(group))
        out["length"].append(len(ids))
    return out


def packing_efficiency(row_lengths: np.ndarray, capacity: int) -> float:
    """Share of the rows' token slots that hold real tokens (1.0: no padding at all)."""
    return float(row_lengths.sum() / (len(row_lengths) * capacity)) if len(row_lengths) else 0.0
