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

# Builds the (PEFT-wrapped) model; `meta=True` asks for structure only, to be filled in shard by shard.
ModelFactory = Callable[..., nn.Module]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse precisions the device cannot run, before any model is built."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision", "fp16 with loss scaling needs a CUDA GPU; use fp32 or bf16 on CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision", f"{torch.cuda.get_device_name()} has no bf16 (needs sm80+, e.g. A100/H100); use fp16 on V100")


def replica_from_state(build_model: ModelFactory, state: Dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """A plain full model from gathered weights, built on meta first so no random init is paid for."""
    from ft_dist.models import recompute_non_persistent_buffers

    model = build_model(meta=True)
    model.to_empty(device="cpu")
    model.load_state_dict(state)
    recompute_non_persistent_buffers(model)
    return model.to(device)


class Strategy(ABC):
    """Build, wrap, step and save one model across `world`."""

    def __init__(self, cfg: Any, world: World):
        self.cfg = cfg
        self.world = world
        self.precision = cfg.train.precision
        check_precision(self.precision, world.device)
        self.model: nn.Module
        self.optimizer: torch.optim.Optimizer

    can_skip_steps = True
    """Whether a step with a non-finite loss/gradient can be dropped and training go on (see skip_step)."""

    def skip_step(self) -> None:
        """Drop this step's gradients without updating anything."""
        self.optimizer.zero_grad(set_to_none=True)

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

    def clip_and_step(self, params: Iterable[nn.Parameter], max_grad_norm: float) -> float:
        """The torch-native step (single, DDP, FSDP2): unscale (fp16), clip, step, zero. Returns the pre-clip norm."""
        self.scaler.unscale_(self.optimizer)
        trainable = [p for p in params if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm if max_grad_norm > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP2: the norm is a DTensor over the shards
            norm = norm.full_tensor()
        if not torch.isfinite(norm) and not self.scaler.is_enabled():
            self.optimizer.zero_grad(set_to_none=True)  # never apply a NaN/Inf update; the loop counts it
            return float(norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def inference_model(self) -> nn.Module:
        """A full model this rank can run alone (generation, export). Sharded strategies build a replica."""
        return self.unwrapped()

    def unwrapped(self) -> nn.Module:
        """The plain (PEFT-wrapped or not) HF model, for generation and export."""
        return self.model

    @abstractmethod
    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The full, unsharded model weights on CPU, on every rank (a collective for sharded strategies)."""

    # --- checkpoint state: one portable format (torch.distributed.checkpoint, keyed by parameter name) --------
    def checkpoint_state(self) -> Dict[str, Any]:
        """{"model": ..., "optim": ...} as torch's state-dict API gives them (sharded DTensors under FSDP2).

        Keys are parameter names, never positions or ranks, so a checkpoint loads at any world size and under
        any torch-native strategy (DCP reshards on load).
        """
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_checkpoint_state(self, state: Dict[str, Any]) -> None:
        """Apply a state loaded in place into the structure `checkpoint_state()` returned."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def close(self) -> None:
        """Release engine resources; the process group itself is closed by ft_dist.dist.close()."""
