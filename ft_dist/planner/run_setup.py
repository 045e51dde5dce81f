"""The planner's view of a real run: the TrainingSetup of an ft-train config, and the planner's figure for it.

ft-plan writes a run (plan.yaml); ft-train runs a config. Both directions meet here: `setup_of(cfg)` reads back the
setup a config runs, so a test can check a written plan field by field, and every ft-train can put the planner's
prediction for its exact config beside the peak it measured (`self_check`).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, cast

from omegaconf import OmegaConf

from ft_dist.config import RunConfig
from ft_dist.planner.memory import GIB, estimate_memory
from ft_dist.planner.params import architecture
from ft_dist.planner.workload import TrainingSetup


def strategy_name(cfg: RunConfig) -> str:
    """The planner's strategy name for conf/strategy/'s options (zero3 + offload -> zero3_offload...)."""
    s = cfg.strategy
    if s.name == "deepspeed":
        offload = s.offload_optimizer != "none" or s.offload_params != "none"
        return f"zero{s.zero_stage}" + ("_offload" if offload else "")
    if s.name == "fsdp" and s.cpu_offload:
        return "fsdp_offload"
    return s.name


def setup_of(
    cfg: RunConfig, world_size: int = 1, gpus_per_node: Optional[int] = None, device: str = "cuda"
) -> TrainingSetup:
    """The TrainingSetup an ft-train config runs on `world_size` ranks, `gpus_per_node` of them per node, on
    `device` (cuda: the planner adds the GPU-only terms; cpu: tensor bytes only)."""
    local = gpus_per_node or world_size
    peft = cfg.peft.method
    return TrainingSetup(
        peft=peft,
        lora_rank=cfg.peft.r if peft != "none" else TrainingSetup.lora_rank,
        lora_targets=tuple(cfg.peft.target_modules) if peft != "none" else TrainingSetup.lora_targets,
        lora_dropout=cfg.peft.dropout if peft != "none" else TrainingSetup.lora_dropout,
        precision=cfg.train.precision,
        optimizer=cfg.train.optimizer,
        strategy=strategy_name(cfg),
        nodes=max(1, world_size // local),
        gpus_per_node=local,
        micro_batch=cfg.train.micro_batch_size,
        seq_len=cfg.data.max_seq_len,
        grad_accum=cfg.train.grad_accum,
        activation_checkpointing=cfg.model.gradient_checkpointing,
        checkpoint_every=cfg.model.checkpoint_every,
        offload_activations=cfg.train.offload_activations,
        loss=cfg.train.loss,
        loss_chunk_tokens=cfg.train.loss_chunk_tokens,
        attention=cfg.model.attn_implementation,
        device=device,
    )


def self_check(
    cfg: RunConfig,
    world_size: int,
    gpus_per_node: int,
    device: str,
    records: Sequence[Mapping[str, Any]],
    phase: str = "train",
) -> Optional[Dict[str, Any]]:
    """The planner's prediction for this run next to what the largest rank measured in `phase`.

    GPU: predicted allocated and reserved bytes against torch.cuda's max_memory_allocated / max_memory_reserved.
    CPU: the predicted tensor bytes on top of the rank's baseline (its RSS before any model: interpreter,
    libraries, process group) against the phase's RSS high-water mark. None without `model.arch`."""
    if not cfg.model.arch or "model_type" not in cfg.model.arch:
        return None
    arch = architecture(cast(Dict[str, Any], OmegaConf.to_container(cfg.model.arch, resolve=True)))
    setup = setup_of(cfg, world_size, gpus_per_node, "cuda" if device == "cuda" else "cpu")
    predicted = estimate_memory(arch, setup)
    ranks = [r for r in records if phase in r["phases"]]
    if not ranks:
        return None
    out: Dict[str, Any] = {"phase": phase, "device": setup.device, "peak_phase": predicted.peak_phase}
    if setup.device == "cuda":
        measured = {
            k: max(r["phases"][phase].get(f"device_{k}_peak", 0) for r in ranks) for k in ("allocated", "reserved")
        }
        pairs = {"allocated": predicted.allocated, "reserved": predicted.reserved}
    else:
        worst = max(ranks, key=lambda r: r["phases"][phase]["host_peak"])
        measured = {"rss": worst["phases"][phase]["host_peak"]}
        pairs = {"rss": worst["baseline"] + predicted.allocated}
    for key, value in pairs.items():
        out[f"predicted_{key}"] = int(value)
        out[f"measured_{key}"] = int(measured[key])
        out[f"error_{key}"] = round(value / measured[key] - 1, 4) if measured[key] else None
    return out


def format_self_check(check: Optional[Mapping[str, Any]]) -> str:
    """One console line: measured beside predicted, per statistic."""
    if not check:
        return "planner self-check: skipped (no model.arch to plan from)"
    keys = [k[len("predicted_") :] for k in check if k.startswith("predicted_")]
    parts = [
        f"{k} measured {check[f'measured_{k}'] / GIB:.2f} GiB, predicted {check[f'predicted_{k}'] / GIB:.2f} GiB"
        + (f" ({100 * check[f'error_{k}']:+.1f} %)" if check[f"error_{k}"] is not None else "")
        for k in keys
    ]
    return f"planner self-check ({check['phase']} phase, {check['device']}): " + "; ".join(parts)
