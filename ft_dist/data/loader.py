"""Each optimizer step's micro-batches, collated ahead of the step that uses them.

Which examples a step takes is fixed by `GlobalBatchSampler` (data order and resume exactness live there); this
module decides only *when* and *where* they are collated: in DataLoader worker processes (`train.num_workers` > 0)
or else in one background thread, into pinned memory on a GPU run, a few steps ahead of the step computing now. The
loop then copies a step's batches to the device without blocking, and never waits on collation.

Each step also carries what the loop would otherwise count on the host in the middle of the step: the global
batch's loss tokens, this rank's non-pad tokens, the sum of squared sequence lengths that attention's FLOPs grow
with, and in every micro-batch the positions that predict a label (`label_positions`, for the loss).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Dict, Generator, Iterator, List, Sequence

import torch

from ft_dist.data.batching import (
    GlobalBatchSampler,
    collate,
    collate_flat,
    count_real_tokens,
    examples_from_rows,
    label_positions,
    sequence_lengths,
)

PREFETCH_STEPS = 2
"""Steps collated ahead of the one computing: one to hide collation's jitter, one being consumed."""


@dataclass
class StepBatches:
    step: int
    batches: List[Dict[str, Any]]
    """This rank's micro-batches (CPU tensors; pinned on a GPU run)."""
    n_global: int
    """Loss tokens of the whole global batch: the loss's divisor (every rank computes the same)."""
    tokens: int
    """Non-pad tokens in this rank's micro-batches."""
    seq_sq: int
    """Sum over this rank's sequences of length^2 (a packed row holds several): attention FLOPs scale with it."""

    def pin_memory(self) -> "StepBatches":
        """Called by DataLoader's pinning thread (pin_memory=True) and by the prefetch thread on a GPU run."""
        self.batches = [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()} for b in self.batches]
        return self


class StepDataset(torch.utils.data.Dataset):
    """Map-style: step -> StepBatches, so DataLoader workers can collate any step (in the sampler's order)."""

    def __init__(self, rows: Any, sampler: GlobalBatchSampler, pad_id: int, flatten: bool) -> None:
        self.rows, self.sampler, self.pad_id, self.flatten = rows, sampler, pad_id, flatten
        self.num_loss_tokens = rows["num_loss_tokens"]

    def __getitem__(self, step: int) -> StepBatches:
        n_global = sum(self.num_loss_tokens[i] for i in self.sampler.global_indices(step))
        batches, tokens, seq_sq = [], 0, 0
        for indices in self.sampler.micro_batches(step):
            examples = examples_from_rows(self.rows[indices])
            seq_sq += sum(n * n for e in examples for n in sequence_lengths(e))
            batch = collate_flat(examples) if self.flatten else collate(examples, self.pad_id)
            batch["label_positions"] = label_positions(batch["labels"])
            tokens += count_real_tokens(batch)
            batches.append(batch)
        return StepBatches(step, batches, int(n_global), tokens, seq_sq)


def step_batches(
    dataset: StepDataset, steps: Sequence[int], num_workers: int, pin: bool
) -> Generator[StepBatches, None, None]:
    """StepBatches for `steps` in order, collated ahead: by `num_workers` DataLoader processes, or by a thread."""
    if num_workers > 0:
        loader = torch.utils.data.DataLoader(
            dataset,
            sampler=list(steps),
            batch_size=None,  # one item is already a whole step
            num_workers=num_workers,
            pin_memory=pin,
            prefetch_factor=PREFETCH_STEPS,
        )
        yield from loader
        return
    yield from _prefetched((dataset[s] for s in steps), pin)


def _prefetched(items: Iterator[StepBatches], pin: bool) -> Iterator[StepBatches]:
    """`items` produced by a background thread, PREFETCH_STEPS ahead. Collation is mostly torch copies that release
    the GIL, so it overlaps the step's compute; order is kept, and an error in the thread is raised here."""
    box: "queue.Queue[Any]" = queue.Queue(maxsize=PREFETCH_STEPS)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                box.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False  # the consumer has gone

    def produce() -> None:
        try:
            for item in items:
                if not put(item.pin_memory() if pin else item):
                    return
            put(done)
        except BaseException as err:  # surfaces in the training thread, with its traceback
            put(err)

    thread = threading.Thread(target=produce, name="ft-dist-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = box.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:  # the loop stopped early (preemption, divergence): let the thread end
        stop.set()
        thread.join(timeout=5)
