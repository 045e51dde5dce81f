"""`ft-export`: a checkpoint of any strategy/world size -> an HF model dir, using the run's own saved config."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
from omegaconf import OmegaConf

from ft_dist import dist
from ft_dist.checkpoint import CHECKPOINTS, export_checkpoint, find_resume_checkpoint
from ft_dist.commands.schema import ExportConfig
from ft_dist.config import RunConfig
from ft_dist.errors import ConfigError
from ft_dist.phase_memory import PhaseMemory


def run(cfg: ExportConfig) -> int:
    checkpoint = find_resume_checkpoint(cfg.checkpoint, Path("."), key="checkpoint")
    if checkpoint is None:  # checkpoint=auto (or none) in a folder with no complete checkpoint
        raise ConfigError(
            "checkpoint", f"expected a checkpoints/step-N dir or a run dir with one, got {cfg.checkpoint!r}"
        )
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else None
    if run_dir is None or not (run_dir / "config.yaml").exists():
        raise ConfigError(
            "checkpoint", f"expected <run dir>/checkpoints/step-N with the run's config.yaml, got {str(checkpoint)!r}"
        )
    run_cfg = cast(RunConfig, OmegaConf.load(run_dir / "config.yaml"))  # the run's saved RunConfig
    memory = PhaseMemory(torch.device("cpu"))
    with memory.phase("export"):
        out = export_checkpoint(
            run_cfg,
            checkpoint,
            Path(cfg.output),
            merge_lora=cfg.merge_lora,
            max_shard_bytes=int(cfg.max_shard_gb * 2**30),
        )
    peak = memory.phases["export"]["host_peak"]
    dist.log(
        f"exported {checkpoint} -> {out} (peak host memory {peak / 2**30:.2f} GiB, "
        f"baseline {memory.baseline / 2**30:.2f} GiB)"
    )
    return 0
