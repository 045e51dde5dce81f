"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over ranks, per transformer block.

The model is built on the meta device on every rank, so no rank ever allocates the full weights on its device;
rank 0 builds (or loads) the full weights on the CPU once and `set_model_state_dict(broadcast_from_rank0=True)`
sends each rank only its shards. Mixed precision is FSDP's own policy (bf16 compute, fp32 reduce and master
weights), so no autocast is needed.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Dict, List, Optional

import torch
from torch import nn

from ft_dist.errors import ConfigError
from ft_dist.models import recompute_non_persistent_buffers
from ft_dist.strategies.base import ModelFactory, OptimizerFactory, Strategy, replica_from_state


def transformer_blocks(model: nn.Module) -> List[nn.Module]:
    """The repeated blocks to shard one by one: HF lists their class names in `_no_split_modules`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError("strategy", f"found no transformer blocks ({sorted(names)}) to shard in {type(base).__name__}")
    return blocks


class FSDP2(Strategy):
    def setup(self, build_model: ModelFactory, build_optimizer: Optional[OptimizerFactory]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        if self.precision == "fp16":
            raise ConfigError("train.precision", "FSDP2 here runs fp32 or bf16; for fp16 (V100) use strategy=ddp or a zero stage")
        self.build_model = build_model
        dev = self.world.device
        full_state: Dict[str, torch.Tensor] = {}
        if self.world.is_main:
            full = build_model(meta=False)
            full_state = {k: v.detach() for k, v in full.state_dict().items()}
            del full
        model = build_model(meta=True)
        mesh = init_device_mesh(dev.type, (self.world.size,))
        kwargs = dict(mesh=mesh, reshard_after_forward=self.cfg.strategy.reshard_after_forward)
        if self.precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if self.cfg.strategy.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for block in transformer_blocks(model):
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        model.to_empty(device="cpu" if self.cfg.strategy.cpu_offload else dev)
        set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        recompute_non_persistent_buffers(model)
        self.model = model
        if build_optimizer is not None:
            self.optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad])
        self.scaler = torch.amp.GradScaler(dev.type, enabled=False)

    def autocast(self) -> ContextManager[None]:
        return contextlib.nullcontext()  # the MixedPrecisionPolicy casts

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        # Without sync, gradients stay unsharded and accumulate locally; one reduce-scatter on the last micro-batch.
        self.model.set_requires_gradient_sync(sync)
        loss.backward()

    def step(self, max_grad_norm: float) -> float:
        return self.clip_and_step(self.model.parameters(), max_grad_norm)

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        return {k: v.detach().cpu() for k, v in state.items()}

    def inference_model(self) -> nn.Module:
        return replica_from_state(self.build_model, self.full_state_dict(), self.world.device)
