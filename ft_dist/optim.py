"""Optimizer and learning-rate schedule from `train.*` (torch's own classes; nothing re-implemented)."""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable

import torch

from ft_dist.config import TrainConfig

BNB_CLASSES = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit", "paged_adamw": "PagedAdamW"}
"""train.optimizer -> its bitsandbytes class: 8-bit block-quantized Adam states (2 bytes a parameter instead of 8)
and/or paged states that the GPU driver evicts to host memory under pressure."""


def build_optimizer(params: Iterable[torch.nn.Parameter], train_cfg: TrainConfig) -> torch.optim.Optimizer:
    params = list(params)
    tc = train_cfg
    if tc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tc.lr, momentum=0.9, weight_decay=tc.weight_decay)
    adam: Dict[str, Any] = dict(
        lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps, weight_decay=tc.weight_decay
    )
    if tc.optimizer in BNB_CLASSES:
        import bitsandbytes as bnb

        return getattr(bnb.optim, BNB_CLASSES[tc.optimizer])(params, **adam)
    if any(p.device.type == "cuda" for p in params):
        return torch.optim.AdamW(params, **adam, fused=True)  # one kernel for all parameters
    # CPU: one tensor at a time (foreach=False) keeps every update's arithmetic the same however the parameters are
    # grouped or sharded, which the bitwise resume and strategy-parity tests rely on.
    return torch.optim.AdamW(params, **adam, foreach=False)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Linear warmup to the peak, then constant, linear or cosine decay to zero at `total_steps`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, train_cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps, train_cfg.warmup_steps, train_cfg.scheduler)
    )
