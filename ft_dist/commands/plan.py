"""`ft-plan`: compose the config, plan, print a table (or JSON), write the chart and the runnable plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, cast

from omegaconf import OmegaConf

from ft_dist.commands.schema import PlanRunConfig
from ft_dist.planner.api import apply_trace
from ft_dist.planner.api import plan as make_plan
from ft_dist.planner.catalog import load_catalog
from ft_dist.planner.memory import GIB, GpuOverhead
from ft_dist.planner.params import meta_param_count
from ft_dist.planner.recommend import SearchSpace
from ft_dist.planner.report import candidates_text, naive_text, write_chart, write_plan_files
from ft_dist.planner.workload import TrainingSetup


def run(cfg: PlanRunConfig) -> Optional[int]:
    p = cfg.plan
    catalog = load_catalog(p.catalog)
    arch_dict = cast(Dict[str, Any], OmegaConf.to_container(cfg.model.arch, resolve=True))
    base = TrainingSetup(
        peft=p.peft,
        lora_rank=p.lora_rank,
        lora_dropout=p.lora_dropout,
        lora_targets=tuple(p.lora_targets),
        precision=p.precision,
        optimizer=p.optimizer,
        seq_len=p.seq_len,
        attention=p.attention,
        loss=p.loss,
        checkpoint_every=p.checkpoint_every,
        offload_activations=p.offload_activations,
    )
    space = SearchSpace(
        instances=[p.instance] if p.instance else list(catalog.instances),
        nodes=p.nodes,
        strategy=p.strategy,
        micro_batch=p.micro_batch,
        activation_checkpointing=p.activation_checkpointing,
        global_batch=p.global_batch,
        headroom=p.headroom,
        deadline_hours=p.deadline_hours,
        budget_usd=p.budget_usd,
    )
    overhead = GpuOverhead(cuda_context_bytes=p.cuda_context_gib * GIB, fragmentation=p.fragmentation)
    result = make_plan(
        arch_dict,
        p.tokens,
        p.epochs,
        base,
        space,
        catalog,
        overhead,
        mfu=dict(p.mfu) if p.mfu else None,
        model_name=cfg.model.name,
        meta_params=meta_param_count(arch_dict),
    )
    if p.trace:
        best = result.best
        mb = best.micro_batch if best else (p.micro_batch or 1)
        ac = best.activation_checkpointing if best else bool(p.activation_checkpointing)
        result.trace = apply_trace(
            arch_dict, result.arch, base.but(micro_batch=mb, activation_checkpointing=ac), p.trace_layers
        )
    written = []
    if p.output_dir:
        out = Path(p.output_dir)
        for path in (
            write_plan_files(result, out, base, arch_dict, cfg.model.config),
            write_chart(result, out / "memory.png", p.top),
        ):
            if path is not None:
                written.append(str(path))
    if p.format == "json":
        data = result.as_dict()
        data["written"] = written
        print(json.dumps(data))
        return 0
    print(naive_text(result))
    print()
    print(candidates_text(result, p.top))
    if result.trace:
        t = result.trace
        print(
            f"trace: measured single-process peak {t['measured_single_process_peak_bytes'] / GIB:.2f} GiB, "
            f"analytic {t['analytic_single_process_peak_bytes'] / GIB:.2f} GiB "
            f"({100 * t['analytic_vs_measured']:+.1f} %)"
        )
    if written:
        print("wrote: " + ", ".join(written))
    return 0
