"""One process, one device: the reference every distributed strategy must match."""

from __future__ import annotations

from typing import Optional

import torch

from ft_dist.models import ModelSpec
from ft_dist.strategies.base import OptimizerFactory, Strategy


class SingleDevice(Strategy):
    def setup(self, spec: ModelSpec, build_optimizer: Optional[OptimizerFactory]) -> None:
        self.model = spec.build(device=self.world.device).to(self.world.device)
        if build_optimizer is not None:
            self.optimizer = build_optimizer([p for p in self.model.parameters() if p.requires_grad])
        # fp16 needs loss scaling so small gradients do not flush to zero; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(self.world.device.type, enabled=self.precision == "fp16")

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        self.scaler.scale(loss).backward()
