"""Which examples each rank sees at each optimizer step, and how they become padded (or packed) tensors.

The order is a seeded permutation per epoch over the whole training set, cut into global batches of
micro_batch x grad_accum x world_size examples. Each rank takes its slice of each global batch, so the sequence
of global batches, and hence training, is the same whatever the world size; and a position in the data is just
`samples consumed`, which resume on any world size maps back to a step.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from ft_dist.data.tokenize import IGNORE_INDEX
from ft_dist.errors import ConfigError


class GlobalBatchSampler:
    def __init__(self, num_examples: int, micro_batch: int, grad_accum: int, world_size: int, rank: int, seed: int):
        self.n = num_examples
        self.micro = micro_batch
        self.accum = grad_accum
        self.world = world_size
        self.rank = rank
        self.seed = seed
        self.global_batch = micro_batch * grad_accum * world_size
        if self.global_batch > num_examples:
            raise ConfigError(
                "train.micro_batch_size",
                f"global batch {self.global_batch} (micro x accum x world) exceeds the {num_examples} training examples",
            )
        self.steps_per_epoch = num_examples // self.global_batch
        self._epoch = -1
        self._perm: List[int] = []

    def _permutation(self, epoch: int) -> List[int]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(self.n, generator=g).tolist()
            self._epoch = epoch
        return self._perm

    def global_indices(self, step: int) -> List[int]:
        """All example indices of optimizer step `step` (every rank can compute them)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        start = k * self.global_batch
        return self._permutation(epoch)[start : start + self.global_batch]

    def micro_batches(self, step: int) -> List[List[int]]:
        """This rank's `grad_accum` micro-batches for step `step`."""
        idx = self.global_indices(step)
        chunk = self.micro * self.world
        return [
            idx[a * chunk + self.rank * self.micro : a * chunk + (self.rank + 1) * self.micro]
            for a in range(self.accum)
        ]


def examples_from_rows(rows: Dict[str, List[Any]]) -> List[Dict[str, Any]]:
    """Per-example dicts for `collate` from a column slice `dataset[indices]` (with position_ids when packed)."""
    keys = [k for k in ("input_ids", "labels", "position_ids") if k in rows]
    return [dict(zip(keys, values)) for values in zip(*(rows[k] for k in keys))]


def collate(examples: Sequence[Dict[str, Any]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding never enters attention or the loss.

    Unpacked rows get an attention mask. Packed rows (with `position_ids`) get NO attention mask: that is what
    makes transformers derive a block-diagonal mask from the restarting positions (SDPA/eager) or use varlen
    flash-attention, so examples sharing a row never see each other. Their padding gets position 0 on every pad
    token: each pad token is then its own one-token sequence, attended by nothing real, and `count_real_tokens`
    can tell it apart (a real example is at least two tokens long, so never ends at position 0).
    """
    packed = "position_ids" in examples[0]
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
        if packed:
            positions[i, :n] = torch.tensor(e["position_ids"])
    if packed:
        return {"input_ids": ids, "position_ids": positions, "labels": labels}
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sequence_lengths(example: Dict[str, Any]) -> List[int]:
    """The lengths of the sequences in one row: one, or a packed row's examples (positions restart at 0)."""
    if "position_ids" not in example:
        return [len(example["input_ids"])]
    starts = np.flatnonzero(np.asarray(example["position_ids"]) == 0)
    return np.diff(np.append(starts, len(example["position_ids"]))).tolist()


def collate_flat(examples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """A micro-batch as ONE row with no padding (padding-free), for flash-attention's variable-length kernels.

    The examples (or packed rows) are laid end to end with positions restarting at every sequence, and the
    cumulative sequence lengths go with them as `cu_seq_lens_q/k` and `max_length_q/k`: transformers hands those
    straight to `flash_attn_varlen_func`, so no 4-D mask is built and nothing is read back from the GPU to find the
    boundaries. Each example's first label is -100 (tokenize.py), so no sequence learns to predict the next one.
    """
    ids: List[int] = []
    labels: List[int] = []
    positions: List[int] = []
    lengths: List[int] = []
    for e in examples:
        ids += e["input_ids"]
        labels += e["labels"]
        positions += e["position_ids"] if "position_ids" in e else list(range(len(e["input_ids"])))
        lengths += sequence_lengths(e)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    longest = max(lengths)
    return {
        "input_ids": torch.tensor([ids]),
        "position_ids": torch.tensor([positions]),
        "labels": torch.tensor([labels]),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def count_real_tokens(batch: Dict[str, torch.Tensor]) -> int:
    """Non-padding tokens in a collated batch (for tokens/s)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    # Packed: padding is the trailing run of position-0 tokens; a real example never ends at position 0.
    pos = batch["position_ids"]
    index = torch.arange(pos.shape[1], device=pos.device).expand_as(pos)
    last_real = torch.where(pos != 0, index, torch.full_like(index, -1)).max(dim=1).values
    return int((last_real + 1).sum())


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (into the batch's [rows x width] positions) of the positions that predict a label: position t
    predicts token t+1, so t counts when label t+1 is not IGNORE_INDEX. Only their logits enter the loss, and the
    chunked loss runs the LM head on them alone (prompt and padding positions are skipped: 30-50 % of a packed
    SFT batch). Computed on the host when a batch is collated, because selecting them on the device with a
    boolean mask would read the mask back (a host sync) in every forward."""
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    return torch.nonzero(targets != IGNORE_INDEX).squeeze(1)


def to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """Tensors to `device` without blocking the host (asynchronous from pinned memory); ints stay as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
