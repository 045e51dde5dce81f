"""DeepSpeed's partitions as torch.distributed.checkpoint sees shards: each rank saves and loads only its own.

ZeRO keeps, per rank, a contiguous range of each parameter's flattened elements (ZeRO-3: `ds_tensor`, the same
range of every parameter; ZeRO-1/2: the fragment of the flat partition that `_hp_mapping` points at). A contiguous
range of a row-major tensor is a union of at most 2 x ndim - 1 rectangular blocks (a partial row, whole rows, a
partial row, recursively), which is exactly what DCP stores as chunks. So a ZeRO partition becomes a ShardedTensor
whose local shards are views into DeepSpeed's own buffers: saving copies nothing, loading writes in place, and DCP
reshards the chunks to any world size or strategy (FSDP2 DTensors, whole tensors) by name.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch

Chunk = Tuple[Tuple[int, ...], Tuple[int, ...]]
"""(offsets, sizes) of one rectangular block."""


def range_chunks(shape: Sequence[int], start: int, end: int) -> List[Chunk]:
    """Rectangular blocks that together cover the flat elements [start, end) of a row-major tensor of `shape`."""
    shape = tuple(int(s) for s in shape)
    if start >= end:
        return []
    if len(shape) <= 1:
        return [((start,), (end - start,))]
    row = math.prod(shape[1:])
    r0, c0 = divmod(start, row)
    r1, c1 = divmod(end, row)
    tail = len(shape) - 1

    def in_row(r: int, a: int, b: int) -> List[Chunk]:
        return [((r, *o), (1, *s)) for o, s in range_chunks(shape[1:], a, b)]

    if r0 == r1:
        return in_row(r0, c0, c1)
    out: List[Chunk] = []
    if c0:
        out += in_row(r0, c0, row)
        r0 += 1
    if r1 > r0:
        out.append(((r0,) + (0,) * tail, (r1 - r0, *shape[1:])))
    if c1:
        out += in_row(r1, 0, c1)
    return out


def sharded_range(
    local: torch.Tensor, shape: Sequence[int], ranges: Sequence[Tuple[int, int]], rank: int
) -> "torch.Tensor":
    """A ShardedTensor of global `shape` whose rank r holds flat elements ranges[r]; this rank's part is the first
    ranges[rank] length elements of the 1-D tensor `local` (a view into the engine's buffer, no copy)."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

    local = local.detach().reshape(-1)
    device = str(local.device)
    metas, shards = [], []
    for r, (a, b) in enumerate(ranges):
        pos = 0
        # A rank without elements still gets an empty chunk (DCP drops a ShardedTensor with no local shard from
        # the rank's flattened state dict, and a key missing on one rank derails its load planning). It sits at
        # the far end, an offset no real chunk has: DCP dedups chunks by (name, offset).
        empty = [((int(shape[0]),) + (0,) * (len(shape) - 1), (0,) * len(shape))]
        for offsets, sizes in range_chunks(shape, a, b) or empty:
            md = ShardMetadata(list(offsets), list(sizes), f"rank:{r}/{device}")
            metas.append(md)
            n = math.prod(sizes)
            if r == rank:
                shards.append(Shard(local[pos : pos + n].view(sizes), md))
            pos += n
    props = TensorProperties(dtype=local.dtype, pin_memory=local.is_pinned())
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        shards, ShardedTensorMetadata(metas, torch.Size(shape), props)
    )
