"""Training FLOPs counted from the model's own modules, and the peak they are divided by: MFU and TFLOP/s per GPU.

Per token, a matmul weight of n = fan_in x fan_out elements costs 2n in forward and 2n in backward for the gradient
of its input; a weight that trains costs another 2n for its own gradient. Full finetuning is so the familiar 6N,
and LoRA is 4N for the frozen base plus 6N for the adapters: frozen weights get no weight gradient. The embedding
lookup is not a matmul and is not counted; the LM head is. Attention's QK^T and AV add 4 q_dim s per layer per
token of a sequence of length s in forward, half of which the causal mask skips, and twice that in backward:
6 L q_dim s per token, so 6 L q_dim s^2 per sequence (the planner's count, planner/throughput.py). Only non-pad
tokens count, and a packed example attends over its own length, not the row's. Recomputation under activation
checkpointing is not counted: MFU is the model's useful FLOPs over the hardware's peak.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import nn

from ft_dist.planner.catalog import load_catalog


@dataclass(frozen=True)
class TrainingFlops:
    per_token: float
    """Matmul FLOPs per token, forward + backward."""
    attention_per_sq: float
    """Attention FLOPs per squared sequence length (times the sum of s^2 over a step's sequences)."""

    def step(self, tokens: float, seq_sq: float) -> float:
        return self.per_token * tokens + self.attention_per_sq * seq_sq


def _weight_shape(module: nn.Module) -> Optional[int]:
    """fan_in x fan_out of a matmul module (nn.Linear and its FSDP2/bitsandbytes subclasses, GPT-2's Conv1D)."""
    if isinstance(module, nn.Linear):
        return int(module.in_features) * int(module.out_features)
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 projection: weight [in, out]
        shape: Any = getattr(module.weight, "ds_shape", None) or module.weight.shape  # ZeRO-3 keeps it aside
        return int(shape[0]) * int(shape[1])
    return None


def training_flops(model: nn.Module) -> TrainingFlops:
    """The counts of a (PEFT-wrapped, possibly sharded) HF causal LM: PEFT's adapters are nn.Linear modules of their
    own beside the frozen base layer, so walking every matmul module counts both, each by whether it trains."""
    per_token = 0.0
    for module in model.modules():
        n = _weight_shape(module)
        if n is not None:
            per_token += (6 if module.weight.requires_grad else 4) * n
    cfg: Any = model.config  # PEFT forwards its base model's config
    layers, heads = int(cfg.num_hidden_layers), int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return TrainingFlops(per_token=per_token, attention_per_sq=6.0 * layers * heads * head_dim)


def peak_flops(device: torch.device, precision: str, configured_tflops: float = 0.0) -> Optional[float]:
    """Dense peak FLOP/s of one device for `precision`: `train.peak_tflops` if set, else the planner catalog's
    figure for this GPU, else None: a CPU has no catalog figure, and MFU is then left out rather than made up."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    memory_gb = torch.cuda.get_device_properties(device).total_memory / 1e9
    gpu = catalog_gpu(torch.cuda.get_device_name(device), memory_gb)
    if gpu is None:
        return None
    peaks = gpu["peak_tflops"]
    return float(peaks.get(precision, peaks["fp16"])) * 1e12


def catalog_gpu(device_name: str, memory_gb: float) -> Optional[Dict[str, Any]]:
    """The catalog's entry for a CUDA device name ("NVIDIA H100 80GB HBM3", "Tesla V100-SXM2-16GB"): the model in
    the name, the nearest memory size. The catalog's peaks are the SXM parts'; a PCIe card peaks lower (set
    train.peak_tflops there)."""
    name = device_name.upper()
    matches = [
        (abs(gpu["memory_gb"] - memory_gb), gpu)
        for key, gpu in load_catalog().gpus.items()
        if re.search(rf"\b{re.escape(key.split('-')[0].upper())}\b", name)
    ]
    return min(matches, key=lambda m: m[0])[1] if matches else None
