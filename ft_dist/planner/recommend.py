"""Enumerate instance x nodes x strategy x micro-batch x checkpointing, keep what fits, rank by cost and time.

For every (instance, nodes, strategy) the fastest fitting (micro-batch, checkpointing) pair is kept; when nothing
fits, the smallest-memory option is kept with the reason. Gradient accumulation makes up the global batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, cast

from ft_dist.config import BNB_OPTIMIZERS
from ft_dist.planner.catalog import Catalog, Instance
from ft_dist.planner.memory import GIB, GpuOverhead, MemoryBreakdown, estimate_memory
from ft_dist.planner.params import Architecture
from ft_dist.planner.throughput import step_time
from ft_dist.planner.workload import STRATEGIES, TrainingSetup

MICRO_BATCHES = (1, 2, 4, 8, 16, 32)
NODE_COUNTS = (1, 2, 4, 8)


@dataclass
class Candidate:
    """One (instance, nodes, strategy) option with its best micro-batch, or the reason none fits."""

    instance: str
    nodes: int
    gpus_per_node: int
    strategy: str
    micro_batch: int
    grad_accum: int
    activation_checkpointing: bool
    fits: bool
    memory: Optional[MemoryBreakdown]
    usable_bytes: float
    precision: str = "bf16"
    """What this GPU runs: the asked precision, or fp16 with loss scaling where the GPU has no bf16 (V100)."""
    attention: str = "sdpa"
    note: str = ""
    """Why precision or attention differ from what was asked."""
    tokens_per_second: float = 0.0
    hours: float = math.inf
    cost_usd: float = math.inf
    reason: str = ""
    setup: Optional[TrainingSetup] = None
    """The exact setup its memory figure was computed for."""

    def as_dict(self) -> Dict[str, object]:
        finite = lambda x: round(x, 4) if math.isfinite(x) else None
        return {
            "instance": self.instance,
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "strategy": self.strategy,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "activation_checkpointing": self.activation_checkpointing,
            "precision": self.precision,
            "attention": self.attention,
            "note": self.note,
            "fits": self.fits,
            "per_gpu_bytes": self.memory.per_gpu() if self.memory else None,
            "model_states_bytes_per_gpu": self.memory.model_states if self.memory else None,
            "peak_phase": self.memory.peak_phase if self.memory else None,
            "host_ram_bytes": self.memory.host_ram if self.memory else None,
            "usable_bytes_per_gpu": int(self.usable_bytes),
            "tokens_per_second": finite(self.tokens_per_second),
            "hours": finite(self.hours),
            "cost_usd": finite(self.cost_usd),
            "reason": self.reason,
        }


@dataclass(frozen=True)
class SearchSpace:
    """What to enumerate; None in a field means "search over it"."""

    instances: Sequence[str]
    nodes: Optional[int] = None
    strategy: Optional[str] = None
    micro_batch: Optional[int] = None
    activation_checkpointing: Optional[bool] = None
    global_batch: int = 64
    headroom: float = 0.10
    deadline_hours: Optional[float] = None
    budget_usd: Optional[float] = None


def _strategies(space: SearchSpace, world: int) -> List[str]:
    if space.strategy:
        return [space.strategy]
    return [s for s in STRATEGIES if (s == "single") == (world == 1)]


def for_gpu(base: TrainingSetup, inst: Instance) -> Tuple[TrainingSetup, str]:
    """The setup this GPU runs, and why it differs from `base`: Volta (V100) has no bf16, so mixed bf16 becomes
    mixed fp16 with dynamic loss scaling (train.precision=fp16), and no FlashAttention-2 (Ampere+), so SDPA."""
    notes = []
    if base.precision in ("bf16", "pure_bf16") and base.precision not in inst.precisions and "fp16" in inst.precisions:
        base = base.but(precision="fp16")
        notes.append(f"{inst.gpu} has no bf16: fp16 mixed precision with loss scaling")
    if base.attention == "flash_attention_2" and inst.generation == "volta":
        base = base.but(attention="sdpa")
        notes.append("FlashAttention-2 needs Ampere or newer: SDPA")
    return base, "; ".join(notes)


def _structural_reason(setup: TrainingSetup, inst: Instance, strategy: str, world: int) -> str:
    if setup.precision not in inst.precisions:
        return f"{inst.gpu} has no {setup.precision} support"
    if strategy == "single" and world > 1:
        return "single needs one GPU"
    # The combinations ft-train refuses (ft_dist/config.py, strategies/), so a plan never picks a run that cannot
    # start.
    if setup.precision == "fp16" and strategy in ("fsdp", "fsdp_offload"):
        return "FSDP2 runs fp32 or bf16 here; fp16 (V100) runs under DDP or ZeRO"
    if setup.optimizer in BNB_OPTIMIZERS and strategy not in ("single", "ddp"):
        return f"{setup.optimizer} (bitsandbytes) runs under single or ddp only"
    if setup.peft == "qlora" and strategy.endswith("_offload"):
        return "QLoRA keeps its 4-bit base and adapters on the GPU (no offload)"
    return ""


def _too_big(m: MemoryBreakdown, usable: float, host_limit: float) -> str:
    """Why a memory figure does not fit, naming the largest term."""
    if m.total > usable:
        return (
            f"{m.total / GIB:.1f} GiB per GPU > {usable / GIB:.1f} GiB usable; "
            f"largest term {m.largest_term()} {getattr(m, m.largest_term()) / GIB:.1f} GiB at {m.peak_phase}"
        )
    return f"{m.host_ram / 1e9:.0f} GB host RAM per node > {host_limit / 1e9:.0f} GB"


def evaluate(
    arch: Architecture,
    base: TrainingSetup,
    inst: Instance,
    nodes: int,
    strategy: str,
    space: SearchSpace,
    catalog: Catalog,
    total_tokens: float,
    overhead: GpuOverhead,
) -> Candidate:
    """Best fitting micro-batch x checkpointing for one (instance, nodes, strategy).

    Without a token budget (total_tokens 0: a memory-only plan) fits are ranked by throughput per dollar-hour and
    carry no hours or cost. A rejected option keeps the memory figure of its smallest setting."""
    world = nodes * inst.gpus
    usable = inst.device_gib * GIB * (1 - space.headroom)
    host_limit = inst.host_ram_gb * 1e9 * (1 - space.headroom)
    base, note = for_gpu(base, inst)
    reason = _structural_reason(base, inst, strategy, world)
    best: Optional[Candidate] = None
    smallest: Optional[Candidate] = None
    mbs = [space.micro_batch] if space.micro_batch else MICRO_BATCHES
    acs = [space.activation_checkpointing] if space.activation_checkpointing is not None else [False, True]
    for ac in acs:
        for mb in mbs:
            accum = max(1, math.ceil(space.global_batch / (mb * world)))
            setup = base.but(
                strategy=strategy,
                nodes=nodes,
                gpus_per_node=inst.gpus,
                micro_batch=mb,
                grad_accum=accum,
                activation_checkpointing=ac,
                device="cuda",
            )
            mem = estimate_memory(arch, setup, overhead)
            cand = Candidate(
                inst.name, nodes, inst.gpus, strategy, mb, accum, ac, fits=False, memory=mem, usable_bytes=usable,
                precision=base.precision, attention=base.attention, note=note, setup=setup,
            )  # fmt: skip
            # `smallest` is only ever a candidate built here, with its memory estimate
            if smallest is None or mem.total < cast(MemoryBreakdown, smallest.memory).total:
                smallest = cand
            if reason or mem.total > usable or mem.host_ram > host_limit:
                continue
            timing = step_time(arch, setup, inst, catalog.mfu)
            cand.fits = True
            cand.tokens_per_second = timing.tokens_per_second
            if total_tokens > 0:
                cand.hours = total_tokens / timing.tokens_per_second / 3600
                cand.cost_usd = cand.hours * inst.usd_per_hour * nodes
            if best is None or cand.tokens_per_second > best.tokens_per_second:
                best = cand
    if best is None:
        assert smallest is not None and smallest.memory is not None
        smallest.reason = reason or _too_big(smallest.memory, usable, host_limit)
        return smallest
    if space.deadline_hours is not None and best.hours > space.deadline_hours:
        best.fits, best.reason = False, f"takes {best.hours:.1f} h > deadline {space.deadline_hours} h"
    elif space.budget_usd is not None and best.cost_usd > space.budget_usd:
        best.fits, best.reason = False, f"costs ${best.cost_usd:,.0f} > budget ${space.budget_usd:,.0f}"
    return best


def recommend(
    arch: Architecture,
    base: TrainingSetup,
    catalog: Catalog,
    space: SearchSpace,
    total_tokens: float,
    overhead: GpuOverhead = GpuOverhead(),
) -> List[Candidate]:
    """Every (instance, nodes, strategy) option, fitting ones first, cheapest first."""
    out: List[Candidate] = []
    for name in space.instances:
        inst = catalog.instances[name]
        node_counts = [space.nodes] if space.nodes else (NODE_COUNTS if inst.gpus > 1 else (1,))
        for nodes in node_counts:
            for strategy in _strategies(space, nodes * inst.gpus):
                out.append(evaluate(arch, base, inst, nodes, strategy, space, catalog, total_tokens, overhead))
    if total_tokens > 0:
        out.sort(key=lambda c: (not c.fits, c.cost_usd, c.hours))
    else:  # memory-only: the cheapest tokens per dollar first
        price = {name: catalog.instances[name].usd_per_hour for name in space.instances}
        out.sort(key=lambda c: (not c.fits, -c.tokens_per_second / (price[c.instance] * c.nodes)))
    return out


@dataclass(frozen=True)
class NaiveRow:
    """The single-GPU rule of thumb: 2 B/param for inference (with headroom), 16 B/param for mixed-precision Adam."""

    instance: str
    gpus: int
    gpu: str
    gpu_memory_gb: float
    max_inference_params: float
    max_training_params: float
    zero3_node_training_params: float = 0.0
    lora_training_params: float = 0.0
    offload_training_params: float = 0.0
    extra: Dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "extra"}


INFERENCE_OVERHEAD = 1.20
"""accelerate's model-size estimator docs: add up to 20 % for inference (citing EleutherAI)."""


def naive_table(catalog: Catalog) -> List[NaiveRow]:
    """The course table, from the rule of thumb, with what ZeRO-3, LoRA and offload change beside it.

    The rule: one GPU, no sharding, memory in decimal GB. Inference 2 B/param x 1.2; training 16 B/param
    (2 fp16 weights + 2 fp16 grads + 12 fp32 master and Adam moments). ZeRO-3 across the node divides the 16 B
    by the GPUs; LoRA keeps 2 B/param of frozen 16-bit weights (adapters ~1 %); ZeRO-3 offload keeps only the
    16-bit weights of the node on its GPUs (2 B/param / GPUs), the rest in host RAM (18 B/param, DeepSpeed).
    """
    rows = []
    for inst in catalog.instances.values():
        mem = inst.gpu_memory_gb * 1e9
        rows.append(
            NaiveRow(
                instance=inst.name,
                gpus=inst.gpus,
                gpu=inst.gpu,
                gpu_memory_gb=inst.gpu_memory_gb,
                max_inference_params=mem / (2 * INFERENCE_OVERHEAD),
                max_training_params=mem / 16,
                zero3_node_training_params=mem * inst.gpus / 16,
                lora_training_params=mem / 2,
                offload_training_params=min(mem * inst.gpus / 2, inst.host_ram_gb * 1e9 / 18),
            )
        )
    return rows
