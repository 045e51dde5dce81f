"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over ranks, per transformer block.

The model is built on the meta device on every rank, sharded, and only then given storage, so each rank only ever
allocates its own shards. Pretrained weights stream in through DCP's HuggingFaceStorageReader: each rank reads only
its own slices of the memory-mapped safetensors. A model built from config is initialised module by module from a
seed derived from each module's name, so the same model results at any world size. Mixed precision is FSDP's own
policy (bf16 compute, fp32 reduce and master weights), so no autocast is needed.

Outside training the sharded model stays sharded: generation and eval run on it with every rank in lockstep (FSDP
gathers one block at a time), and the final save gathers one block at a time (`gathered_units`).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ft_dist import dist
from ft_dist.errors import ConfigError
from ft_dist.hf_weights import load_hf_weights
from ft_dist.models import (
    ModelSpec,
    initial_values,
    is_adapter_name,
    recompute_non_persistent_buffers,
    transformer_blocks,
)
from ft_dist.strategies.base import OptimizerFactory, Strategy


def fill_local(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of the full tensor `full` into `param` (a DTensor shard or a plain tensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(param, DTensor):
            # src_data_rank=None: every rank holds the same `full`, so each slices its own part, no communication.
            local = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(local.to_local())
        else:
            param.copy_(full)


def shard_units(model: nn.Module) -> List[nn.Module]:
    """The modules FSDP2 gathers one at a time: every transformer block, and (as torchtitan does) the input
    embedding and the LM head each on their own, so the root holds only the final norm. Untied, embedding and head
    are the largest units of a big-vocabulary model; left in the root, both would stay gathered (with their
    gradients in fp32 for the reduce) from the first forward to the end of backward."""
    units = transformer_blocks(model)
    # transformers PreTrainedModel methods, which nn.Module.__getattr__ types as Tensor | Module
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()  # type: ignore[operator]
    if embed is not None and head is not None and embed.weight is not head.weight:
        units = [embed, *units, head]
    return units


class FSDP2(Strategy):
    def setup(self, spec: ModelSpec, build_optimizer: Optional[OptimizerFactory]) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        if self.precision == "fp16":
            raise ConfigError(
                "train.precision", "FSDP2 here runs fp32 or bf16; for fp16 (V100) use strategy=ddp or a zero stage"
            )
        dev = self.world.device
        mesh = dist.device_mesh(dev.type)
        # QLoRA: every rank loads the 4-bit base (quantized tensor by tensor as it is read, 0.5 B/param), then
        # keeps 1/N of it once sharded. Everything else: built on meta, and only this rank's shards get storage.
        model = spec.build(device=dev) if spec.quantized else spec.build(meta=True)
        # The root is the HF model itself, also under PEFT: generate() calls it directly (not through the
        # PeftModel), and the root's hooks are what gather the embeddings and the head.
        # get_base_model: PEFT method, which nn.Module.__getattr__ types as Tensor | Module
        self.root = model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]
        from torch.distributed.tensor import Shard

        n = self.world.size
        # A LoRA A matrix (r x in) has fewer rows than ranks on a wide mesh; sharding its rows would pad it N/r-fold.
        place = lambda p: Shard(1) if p.ndim == 2 and p.shape[0] < n <= p.shape[1] else None  # noqa: E731
        kwargs = dict(mesh=mesh, reshard_after_forward=self.cfg.reshard_after_forward, shard_placement_fn=place)
        if self.precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if self.cfg.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for unit in shard_units(self.root):
            fully_shard(unit, **kwargs)
        fully_shard(self.root, **kwargs)
        self.model = model
        if not spec.quantized:
            with self.fake_mode or contextlib.nullcontext():  # sharding happened on meta; storage may be fake
                model.to_empty(device="cpu" if self.cfg.cpu_offload else dev)
            if self.fake_mode is None:
                self._fill_weights(spec)
                recompute_non_persistent_buffers(model)
        if build_optimizer is not None:
            self.optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad])
        self.scaler = torch.amp.GradScaler(dev.type, enabled=False)

    def _fill_weights(self, spec: ModelSpec) -> None:
        """Pretrained: each rank reads its own slices; anything not in the checkpoint (LoRA adapters) and every
        weight of a from-config model: initialised module by module, each rank keeping its shard."""

        params = dict(self.model.named_parameters())
        weights_dir = spec.weights_dir
        if weights_dir is not None:
            load_hf_weights({n: p.detach() for n, p in params.items() if not is_adapter_name(n)}, weights_dir)
        twin = spec.build(meta=True)
        assert spec.peft_cfg is not None  # a training spec carries cfg.peft (None only for ft-eval's SingleDevice)
        for values in initial_values(twin, spec.seed, spec.peft_cfg.seed, adapters_only=weights_dir is not None):
            for name, value in values.items():
                fill_local(params[name], value)

    def autocast(self) -> ContextManager[None]:
        return contextlib.nullcontext()  # the MixedPrecisionPolicy casts

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        # Every micro-batch reduce-scatters its gradients into the sharded accumulator. Skipping that sync on all
        # but the last micro-batch (no_sync) would save communication but keep every unit's gradient unsharded on
        # every rank until the step: the whole model's gradients, which is exactly what FSDP exists to avoid.
        loss.backward()

    def generation_model(self) -> Tuple[nn.Module, bool]:
        return self.model, True

    def gathered_units(self) -> Iterator[Dict[str, torch.Tensor]]:
        """FSDP's own all-gather (`unshard`), one FSDP unit at a time: each block, then the root's own weights
        (embeddings, final norm, head), in the training dtype (bf16 under the bf16 policy)."""
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        names = {id(m): n for n, m in self.model.named_modules()}
        units = [m for m in self.model.modules() if isinstance(m, FSDPModule) and m is not self.root] + [self.root]
        buffers = {
            f"{p}.{n}" if p else n: b
            for p, m in self.model.named_modules()
            for n, b in m.named_buffers(recurse=False)
            if n not in m._non_persistent_buffers_set
        }
        with torch.no_grad():
            for unit in units:
                unit.unshard()  # type: ignore[operator]  # FSDPModule method (units are FSDPModules)
                prefix = names[id(unit)]
                out = {
                    f"{prefix}.{n}" if prefix else n: p
                    for n, p in unit.named_parameters()
                    if not isinstance(p, DTensor)
                }
                if unit is self.root:
                    out.update(buffers)
                yield out
                del out
                unit.reshard()  # type: ignore[operator]  # FSDPModule method
