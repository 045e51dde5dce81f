"""The small protocol between the one training loop and a parallelism strategy.

A strategy owns how its engine builds, wraps, steps and saves the model; the loop never asks which one it has.
`single` is the reference implementation; DDP, FSDP2 and DeepSpeed implement the same methods.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, Callable, ContextManager, Dict, Iterable, Optional

import torch
from torch import nn

from ft_dist.dist import World
from ft_dist.errors import ConfigError

ModelFactory = Callable[[], nn.Module]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse precisions the device cannot run, before any model is built."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision", "fp16 with loss scaling needs a CUDA GPU; use fp32 or bf16 on CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision", f"{torch.cuda.get_device_name()} has no bf16 (needs sm80+, e.g. A100/H100); use fp16 on V100")


class Strategy(ABC):
    """Build, wrap, step and save one model across `world`."""

    def __init__(self, cfg: Any, world: World):
        self.cfg = cfg
        self.world = world
        self.precision = cfg.train.precision
        check_precision(self.precision, world.device)
        self.model: nn.Module
        self.optimizer: torch.optim.Optimizer

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas whose gradients are averaged (the loop scales the loss by it)."""
        return self.world.size

    @abstractmethod
    def setup(self, build_model: ModelFactory, build_optimizer: Optional[OptimizerFactory]) -> None:
        """Build the model (sharded from the start where the engine can), wrap it, create the optimizer.

        Without an optimizer factory the model is set up for inference only (evaluation).
        """

    def autocast(self) -> ContextManager[Any]:
        """Mixed precision for forward passes: bf16/fp16 compute over fp32 master weights."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.world.device.type, dtype=_DTYPES[self.precision])

    @abstractmethod
    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        """Accumulate gradients; `sync` is False on all but the last micro-batch of a step."""

    @abstractmethod
    def step(self, max_grad_norm: float) -> float:
        """Clip, apply the optimizer, zero the gradients. Returns the pre-clip global gradient norm."""

    def unwrapped(self) -> nn.Module:
        """The plain (PEFT-wrapped or not) HF model, for generation and export."""
        return self.model

    @abstractmethod
    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """The full, unsharded model weights on rank 0 (None on other ranks)."""

    def close(self) -> None:
        """Release engine resources; the process group itself is closed by ft_dist.dist.close()."""
