"""Activation memory: which blocks recompute in backward (full or selective checkpointing), and activation offload.

Checkpointing is transformers' own (its checkpointing layers, non-reentrant torch.utils.checkpoint); selective
checkpointing turns it off again on all but every k-th block.

Offload: the tensors autograd saves for backward wait in pinned host memory instead of GPU memory.
torch's saved-tensor hooks do the moving; torchtune's OffloadActivations showed which tensors are worth it.
Parameters (FSDP2's unsharded ones included) are saved by reference and are never copied, and small tensors cost
more in transfer latency than they free. Under autocast (single, DDP) the 16-bit copies of the weights that autocast
makes and saves for backward move too: 2 B per parameter each way per micro-batch, and that much pinned host memory
(the planner counts it); FSDP2's bf16 policy and DeepSpeed's bf16 compute on 16-bit weights and save none.
The copies are synchronous; a stream that overlaps them with compute is the next step if PCIe time shows in the
step time.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Tuple, Union

import torch
from torch import nn


def checkpoint_blocks(model: nn.Module, every: int = 1) -> int:
    """Recompute every `every`-th transformer block in backward (1: all of them). Returns how many do."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]
    model.config.use_cache = False  # type: ignore[union-attr]  # an HF PreTrainedModel's config
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for i, block in enumerate(blocks):
        # The layers read this flag on every forward: off, the block keeps its activations for backward.
        block.gradient_checkpointing = i % every == 0
    return len(blocks[::every])


MIN_BYTES = 1 << 20
"""Smaller saved tensors stay where they are."""


class _Offload(torch.autograd.graph.saved_tensors_hooks):
    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.moved = 0
        """Tensors moved to the host (a test's witness that the hooks ran)."""
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> "_Offload":  # type: ignore[override]  # the base returns None; tests read .moved
        super().__enter__()
        return self

    def _pack(self, t: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.device, torch.Tensor]]:
        if t.device.type != self.device_type or isinstance(t, nn.Parameter) or t.numel() * t.element_size() < MIN_BYTES:
            return t
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=torch.cuda.is_available())
        host.copy_(t)
        self.moved += 1
        return t.device, host

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, tuple):
            device, host = packed
            return host.to(device, non_blocking=True)
        return packed


def offload_activations(enabled: bool, device_type: str = "cuda") -> ContextManager[Any]:
    """Forward passes run inside this keep what they save for backward on the host (their backward needs nothing).

    Only tensors on `device_type` move; tests pass "cpu" to drive the copies through a CPU-only run.
    """
    if not enabled:
        return contextlib.nullcontext()
    return _Offload(device_type)
