"""DistributedDataParallel: a full replica per rank, gradients all-reduced (bucketed, overlapped with backward).

Memory per rank is the whole model's states by design (weights, gradients, optimizer); pick FSDP2 or ZeRO when
they do not fit one GPU.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from ft_dist.models import ModelSpec
from ft_dist.strategies.base import OptimizerFactory, Strategy


class DDP(Strategy):
    def setup(self, spec: ModelSpec, build_optimizer: Optional[OptimizerFactory]) -> None:
        self.module = spec.build(device=self.world.device).to(self.world.device)
        dev = self.world.device
        # Bucket views: gradients live in the all-reduce buckets instead of a second copy.
        self.model = DistributedDataParallel(
            self.module, device_ids=[dev.index] if dev.type == "cuda" else None, gradient_as_bucket_view=True
        )
        if build_optimizer is not None:
            self.optimizer = build_optimizer([p for p in self.module.parameters() if p.requires_grad])
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.precision == "fp16")

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        # Skip the all-reduce on all but the last micro-batch of a step: accumulate locally, reduce once.
        with contextlib.nullcontext() if sync else self.model.no_sync():  # type: ignore[operator]  # DDP method
            self.scaler.scale(loss).backward()

    def unwrapped(self) -> torch.nn.Module:
        return self.module
