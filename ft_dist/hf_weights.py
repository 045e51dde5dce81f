"""Hugging Face model directories, streamed both ways: read slice by slice, written shard by shard.

Reading goes through torch.distributed.checkpoint's HuggingFaceStorageReader: given a state dict of this rank's
tensors (FSDP2 DTensor shards, DeepSpeed partitions as ShardedTensors, or whole tensors), each rank reads only the
slices it owns from the memory-mapped safetensors files, cast into its own tensors' dtype.

Writing (`write_hf_model`) takes the full tensors of one unit at a time (a transformer block gathered by FSDP2 or
ZeRO-3, or the tensors a single process holds) and appends them, cast to the save dtype, to the current safetensors
shard; a shard is written once it reaches `max_shard_bytes`. So the writer holds at most one shard plus one unit,
never the model. LoRA adapters are merged per layer with PEFT's own delta, on a CPU twin of that layer only.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, cast

import torch
from torch import nn

from ft_dist.atomic_io import atomic_dir
from ft_dist.errors import ConfigError
from ft_dist.models import is_adapter_name, lora_layers

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The dtype a run's model is saved in: its training precision (bf16 training writes bf16 safetensors)."""


def hf_name(name: str) -> str:
    """The name transformers uses for a parameter of the (PEFT-wrapped) training model."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    return name.replace(".base_layer.", ".")


def hf_tensor_names(model_dir: Path) -> List[str]:
    """The tensor names stored in a safetensors model directory (index or file headers; no tensor data read)."""
    index = Path(model_dir) / INDEX_NAME
    if index.exists():
        return list(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    names: List[str] = []
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            names += list(fh.keys())
    return names


def load_hf_weights(targets: Mapping[str, Any], model_dir: Path) -> None:
    """Fill `targets` ({training-model name: this rank's tensor}) in place from `model_dir`, each rank reading only
    its own slices. Names missing from the directory are a one-line error before any data is read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    by_hf = {hf_name(n): t for n, t in targets.items()}
    stored = set(hf_tensor_names(model_dir))
    missing = sorted(set(by_hf) - stored)
    if missing:
        raise ConfigError(
            "model.name_or_path",
            f"{model_dir} lacks {len(missing)} weights of this architecture "
            f"(e.g. {missing[0]!r}); expected a checkpoint of the same model",
        )
    dcp.load(by_hf, storage_reader=HuggingFaceStorageReader(str(model_dir)))


class ShardedSafetensorsWriter:
    """Append tensors; every `max_shard_bytes` they go to disk as one safetensors file, then an index ties them up."""

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory = Path(directory)
        self.max_shard_bytes = max(1, int(max_shard_bytes))
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: List[List[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> None:
        if name in self.pending or any(name in f for f in self.files):
            raise ValueError(f"tensor {name!r} written twice")
        cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        value = tensor.detach().to(device="cpu", dtype=cast, copy=True).contiguous()
        size = value.numel() * value.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending[name] = value
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(
            self.pending, str(self.directory / f".shard-{len(self.files):05d}.safetensors"), metadata={"format": "pt"}
        )
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> List[str]:
        """Write the last shard, name the files as transformers does, and write the index when there are several."""
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            os.replace(self.directory / f".shard-{i:05d}.safetensors", self.directory / name)
        if n > 1:
            weight_map = {t: names[i] for i, tensors in enumerate(self.files) for t in tensors}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return names


class _LoraMerger:
    """Merges LoRA deltas into base weights unit by unit; the adapters themselves are kept for adapter/."""

    def __init__(self, twin: nn.Module):
        self.layers = dict(lora_layers(twin))
        self.adapters: Dict[str, torch.Tensor] = {}

    def take_adapters(self, unit: Mapping[str, torch.Tensor]) -> None:
        for name, t in unit.items():
            if is_adapter_name(name):
                self.adapters[name] = t.detach().to("cpu", copy=True)

    def merged(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (a LoRA layer's base weight) plus the layer's delta, computed by PEFT on a CPU twin."""
        prefix = name.rsplit(".base_layer.", 1)[0]
        layer = self.layers[prefix]
        subs = [m for n, m in layer.named_children() if n.startswith("lora_")]
        for sub in subs:
            sub.to_empty(device="cpu")
        with torch.no_grad():
            for n, p in layer.named_parameters():
                if is_adapter_name(n):
                    p.copy_(self.adapters[f"{prefix}.{n}"])
            # PEFT LoraLayer members, which nn.Module.__getattr__ types as Tensor | Module; the sum of the active
            # adapters' delta tensors is a Tensor (typeshed's sum adds `| Literal[0]` for an empty iterable).
            delta = cast(
                torch.Tensor,
                sum(layer.get_delta_weight(a) for a in layer.active_adapters),  # type: ignore[operator, union-attr]
            )
        for sub in subs:
            sub.to_empty(device="meta")
        return weight.float() + delta.float()


def write_hf_model(
    units: Iterable[Mapping[str, torch.Tensor]],
    twin: nn.Module,
    tokenizer: Any,
    target: Path,
    dtype: torch.dtype,
    merge_lora: bool,
    max_shard_bytes: int,
    extra_files: Mapping[str, str],
    write: bool = True,
    dense: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None,
) -> Optional[Path]:
    """Stream `units` (full tensors keyed by training-model name, one unit at a time) into an HF model dir.

    `twin` is the same (PEFT-wrapped) model on the meta device: it gives the config, the class name and the LoRA
    layers, and costs no memory. Every rank consumes `units` (gathering is collective); only `write=True` (rank 0)
    writes. A LoRA model writes its adapter to adapter/ and, with `merge_lora`, the merged model to `target`.
    The directory is assembled in a temp dir and renamed into place, so a crash leaves no half-written model.
    `dense` turns a stored tensor into its dense value first (QLoRA: dequantizes a 4-bit weight), one at a time.
    """
    is_peft = hasattr(twin, "peft_config")
    merger = _LoraMerger(twin) if is_peft else None
    write_model = merge_lora or not is_peft
    if not write:
        for _ in units:  # take part in every gather
            pass
        return None
    with atomic_dir(Path(target)) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes) if write_model else None
        for unit in units:
            if merger is not None:
                merger.take_adapters(unit)
            for name, tensor in unit.items():
                if is_adapter_name(name) or writer is None:
                    continue
                if dense is not None:
                    tensor = dense(name, tensor)
                value = (
                    merger.merged(name, tensor)
                    if merger is not None and name.endswith(".base_layer.weight")
                    else tensor
                )
                writer.add(hf_name(name), value, dtype)
        # The HF PreTrainedModel (config, generation_config); nn.Module.__getattr__ would type them Tensor | Module.
        base: Any = twin.get_base_model() if is_peft else twin  # type: ignore[operator]  # PEFT's get_base_model
        if writer is not None:
            writer.close()
            config = copy.deepcopy(base.config)
            config.architectures = [type(base).__name__]
            config.dtype = dtype
            config.save_pretrained(tmp)
            if getattr(base, "generation_config", None) is not None:
                base.generation_config.save_pretrained(tmp)
        if merger is not None:
            _write_adapter(twin, merger.adapters, tmp / "adapter")
            tokenizer.save_pretrained(tmp / "adapter")
        tokenizer.save_pretrained(tmp)
        for name, text in extra_files.items():
            (tmp / name).write_text(text)
    return Path(target)


def _write_adapter(twin: nn.Module, adapters: Dict[str, torch.Tensor], out: Path) -> None:
    """adapter_model.safetensors + adapter_config.json with PEFT's own key names."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(twin, state_dict=adapters)
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(out / "adapter_model.safetensors"), metadata={"format": "pt"}
    )
    twin.peft_config["default"].save_pretrained(str(out))  # type: ignore[index, union-attr]  # PEFT attribute
