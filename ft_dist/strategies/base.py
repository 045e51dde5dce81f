"""The small protocol between the one training loop and a parallelism strategy.

A strategy owns how its engine builds, wraps, steps and saves the model; the loop never asks which one it has.
`single` is the reference implementation; DDP, FSDP2 and DeepSpeed implement the same methods.

Memory is part of the contract: no method gathers the whole model onto a rank. Sharded strategies generate and
evaluate on the sharded model itself (all ranks in lockstep), hand out full tensors one unit (transformer block) at a
time for the final save, and checkpoint each rank's own shards.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, Callable, ContextManager, Dict, Iterable, Iterator, Optional, Tuple

import torch
from torch import nn

from ft_dist.activations import offload_activations
from ft_dist.config import StrategyConfig, TrainConfig
from ft_dist.dist import World
from ft_dist.errors import ConfigError
from ft_dist.loss import CausalLMLoss
from ft_dist.models import ModelSpec, model_tensors

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse precisions the device cannot run, before any model is built."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision", "fp16 with loss scaling needs a CUDA GPU; use fp32 or bf16 on CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "train.precision",
            f"{torch.cuda.get_device_name()} has no bf16 (needs sm80+, e.g. A100/H100); use fp16 on V100",
        )


class Strategy(ABC):
    """Build, wrap, step and save one model across `world`."""

    def __init__(self, cfg: StrategyConfig, train: TrainConfig, world: World):
        self.cfg = cfg  # this strategy's own settings
        self.train = train  # what it needs of the schedule: precision, optimizer (DeepSpeed: the batch layout)
        self.world = world
        self.precision = train.precision
        check_precision(self.precision, world.device)
        self.model: nn.Module
        self.optimizer: torch.optim.Optimizer
        self.scaler: torch.amp.GradScaler  # set by the torch-native strategies' setup (clip_gradients uses it)
        self.fake_mode: Optional[Any] = None
        """A dry run's FakeTensorMode: storage is created under it, and no weights are read or initialised."""
        self._loss: Optional[CausalLMLoss] = None

    can_skip_steps = True
    """Whether a step with a non-finite loss/gradient can be dropped (`step(apply=False)`) and training go on."""

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas whose gradients are averaged (the loop scales the loss by it)."""
        return self.world.size

    @abstractmethod
    def setup(self, spec: ModelSpec, build_optimizer: Optional[OptimizerFactory]) -> None:
        """Build the model (sharded from the start where the engine can), load or initialise its weights, wrap it,
        create the optimizer. Without an optimizer factory the model is set up for inference only (evaluation).
        """

    def autocast(self) -> ContextManager[Any]:
        """Mixed precision for forward passes: bf16/fp16 compute over fp32 master weights."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.world.device.type, dtype=_DTYPES[self.precision])

    def prepare_loss(self) -> CausalLMLoss:
        """The run's loss on the set-up model (train.loss=chunked on a head it is not exact for fails here)."""
        if self._loss is None:
            self._loss = CausalLMLoss(self.unwrapped(), self.train.loss, self.train.loss_chunk_tokens)
        return self._loss

    def loss(self, batch: Dict[str, torch.Tensor], n_items: float) -> torch.Tensor:
        """The response-token cross-entropy of `batch` summed and divided by `n_items`, under autocast
        (`train.loss`: chunked from the hidden states, or transformers' loss over full logits)."""
        loss = self.prepare_loss()
        with self.autocast(), offload_activations(self.train.offload_activations and torch.is_grad_enabled()):
            return loss(self.model, batch, n_items)

    @abstractmethod
    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        """Accumulate gradients; `sync` is False on all but the last micro-batch of a step."""

    def clip_gradients(self, max_grad_norm: float) -> Optional[torch.Tensor]:
        """Unscale (fp16) and clip this step's gradients. Returns the pre-clip global norm as a device tensor, which
        is never read here: the loop reads it with the step's loss, in the step's one host sync. None where the
        engine clips inside its own step (DeepSpeed). The torch-native version (single, DDP, FSDP2)."""
        self.scaler.unscale_(self.optimizer)
        trainable = [p for p in self.unwrapped().parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm if max_grad_norm > 0 else float("inf"))
        # FSDP2: a DTensor over the shards; its full value is one all-reduce, still on the device.
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def step(self, apply: bool) -> Optional[float]:
        """Apply the update if `apply` (the loop saw a finite loss and norm), then zero the gradients. An engine
        that clips inside its own step returns the norm it saw. The torch-native version (single, DDP, FSDP2)."""
        if apply:  # never a NaN/Inf update: the loop decides from the values it already read
            self.optimizer.step()
        if self.scaler.is_enabled():
            # fp16: lower the scale after an overflow (from the inf checks unscale_ left on the device), raise it
            # after a run of good steps. GradScaler.step is not used: it would read those checks on the host again.
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return None

    def unwrapped(self) -> nn.Module:
        """The plain (PEFT-wrapped or not) HF model: generation, parameter names, the final save."""
        return self.model

    def generation_model(self) -> Tuple[nn.Module, bool]:
        """The model to call `generate()` on, and whether every rank must generate in lockstep
        (`synced_gpus`: a sharded model gathers weights collectively in every forward)."""
        return self.unwrapped(), False

    def gathered_units(self) -> Iterator[Dict[str, torch.Tensor]]:
        """The full weights, one unit at a time (a collective for sharded strategies: every rank iterates).

        Each item maps training-model names to full tensors that stay valid until the next item, so a writer holds
        one unit at a time. A strategy whose ranks hold the whole model yields it as one unit, without copies.
        """
        yield model_tensors(self.unwrapped())

    def release_optimizer(self) -> None:
        """Free optimizer states once training is over: the final eval and save do not need them."""
        if getattr(self, "optimizer", None) is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer.state.clear()

    # --- checkpoint state: one portable format (torch.distributed.checkpoint, keyed by parameter name) --------
    def checkpoint_state(self) -> Dict[str, Any]:
        """{"model": ..., "optim": ...} as torch's state-dict API gives them (sharded DTensors under FSDP2).

        Keys are parameter names, never positions or ranks, so a checkpoint loads at any world size and under
        any torch-native strategy (DCP reshards on load).
        """
        from torch.distributed.checkpoint.state_dict import get_state_dict

        options = self._state_options()
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=options)
        if options is not None:  # QLoRA: bitsandbytes adds its quantization constants as extra entries; drop them too
            trained = {n for n, p in self.unwrapped().named_parameters() if p.requires_grad}
            model_sd = {k: v for k, v in model_sd.items() if k in trained}
        return {"model": model_sd, "optim": optim_sd}

    def load_checkpoint_state(self, state: Dict[str, Any]) -> None:
        """Apply a state loaded in place into the structure `checkpoint_state()` returned."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=self._state_options(),
        )

    @property
    def quantized(self) -> bool:
        """A QLoRA model (transformers marks a bitsandbytes 4-bit load). Its checkpoints hold the adapters and their
        optimizer states only: the frozen 4-bit base is the pretrained model, quantized the same way again at every
        start (and torch's state-dict API has no layout for its blocks' quantization constants)."""
        return bool(getattr(self.unwrapped(), "is_loaded_in_4bit", False))

    def _state_options(self) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=True, strict=False) if self.quantized else None

    def close(self) -> None:  # noqa: B027  (optional: most strategies hold nothing to release)
        """Release engine resources; the process group itself is closed by ft_dist.dist.close()."""
