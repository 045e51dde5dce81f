"""One process, one device: the reference every distributed strategy must match."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ft_dist.strategies.base import ModelFactory, OptimizerFactory, Strategy


class SingleDevice(Strategy):
    def setup(self, build_model: ModelFactory, build_optimizer: Optional[OptimizerFactory]) -> None:
        self.model = build_model().to(self.world.device)
        if build_optimizer is not None:
            self.optimizer = build_optimizer([p for p in self.model.parameters() if p.requires_grad])
        # fp16 needs loss scaling so small gradients do not flush to zero; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(self.world.device.type, enabled=self.precision == "fp16")

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        self.scaler.scale(loss).backward()

    def step(self, max_grad_norm: float) -> float:
        return self.clip_and_step(self.model.parameters(), max_grad_norm)

    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
