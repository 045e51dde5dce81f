"""What ft-plan prints and writes: the ranked table, the naive course table, a PNG chart, a runnable plan."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, cast

import yaml

from ft_dist.cluster.command_line import Rendezvous, shell_line, training_command
from ft_dist.planner.api import Plan
from ft_dist.planner.memory import GIB, MemoryBreakdown
from ft_dist.planner.recommend import Candidate
from ft_dist.planner.workload import TrainingSetup

_COMPONENTS = ("params", "grads", "optimizer", "activations", "logits", "comm_buffers", "allocator", "cuda_context")


def _b(x: float) -> str:
    return f"{x / 1e9:.1f}B"


def naive_text(plan: Plan) -> str:
    lines = [
        "Rule of thumb (one GPU, no sharding; inference 2 B/param x1.2 headroom, training 16 B/param), "
        "and what ZeRO-3 over the node, LoRA and ZeRO-3 offload change:",
        f"{'instance':15} {'GPUs':>4} {'GPU':10} {'GB':>4} {'max infer':>9} {'max train':>9} "
        f"{'ZeRO-3 node':>11} {'LoRA':>6} {'offload':>8}",
    ]
    for r in plan.naive:
        lines.append(
            f"{r.instance:15} {r.gpus:>4} {r.gpu:10} {r.gpu_memory_gb:>4.0f} {_b(r.max_inference_params):>9} "
            f"{_b(r.max_training_params):>9} {_b(r.zero3_node_training_params):>11} "
            f"{_b(r.lora_training_params):>6} {_b(r.offload_training_params):>8}"
        )
    return "\n".join(lines)


def _gib(m: Optional[MemoryBreakdown], attr: str) -> str:
    return f"{getattr(m, attr) / GIB:.1f}" if m is not None else "-"


def candidates_text(plan: Plan, top: int) -> str:
    """The ranked fits (allocated, reserved and device GiB per GPU; time and cost when tokens are given), then the
    rejected options with their figure and the term that broke the limit."""
    fits = [c for c in plan.candidates if c.fits]
    timed = plan.total_tokens > 0
    lines = [
        f"{plan.model}: {plan.arch.total_params:,} parameters"
        + (f" (meta-device build: {plan.meta_params:,})" if plan.meta_params is not None else "")
        + ", "
        + (f"{plan.total_tokens:.3g} tokens to train" if timed else "memory-only plan (set plan.tokens for time/cost)"),
        "GiB per GPU: alloc = tensors (max_memory_allocated), resv = + allocator reserve (max_memory_reserved), "
        "GPU = + CUDA context (nvidia-smi)",
        f"{'instance':14} {'nodes':>5} {'strategy':13} {'prec':>5} {'mb':>3} {'acc':>4} {'AC':>3} {'alloc':>6} "
        f"{'resv':>6} {'GPU':>6} {'tok/s':>9}" + (f" {'hours':>8} {'cost $':>9}" if timed else ""),
    ]
    shown = fits[:top]
    # Every instance that can run the job gets a row: the best option of those the top rows leave out.
    seen = {c.instance for c in shown}
    for c in fits[top:]:
        if c.instance not in seen:
            seen.add(c.instance)
            shown.append(c)
    for c in shown:
        m = c.memory
        lines.append(
            f"{c.instance:14} {c.nodes:>5} {c.strategy:13} {c.precision:>5} {c.micro_batch:>3} {c.grad_accum:>4} "
            f"{'on' if c.activation_checkpointing else 'off':>3} {_gib(m, 'allocated'):>6} {_gib(m, 'reserved'):>6} "
            f"{_gib(m, 'total'):>6} {c.tokens_per_second:>9,.0f}"
            + (f" {c.hours:>8.1f} {c.cost_usd:>9,.0f}" if timed else "")
        )
    notes = sorted({f"{c.instance}: {c.note}" for c in shown if c.note})
    lines += [f"note: {n}" for n in notes]
    if fits and timed:
        fastest = min(fits, key=lambda c: c.hours)
        lines.append(
            f"cheapest: {fits[0].instance} x{fits[0].nodes} {fits[0].strategy}; "
            f"fastest: {fastest.instance} x{fastest.nodes} {fastest.strategy} ({fastest.hours:.1f} h)"
        )
    elif fits:
        lines.append(f"most tokens per dollar: {fits[0].instance} x{fits[0].nodes} {fits[0].strategy}")
    else:
        lines.append("nothing fits: see the reasons below")
    rejected = [c for c in plan.candidates if not c.fits]
    if rejected:
        lines.append(f"rejected ({len(rejected)}), GiB per GPU at the smallest setting tried:")
        for c in rejected[: max(top, 12)]:
            lines.append(f"  {c.instance} x{c.nodes} {c.strategy} ({_gib(c.memory, 'total')} GiB): {c.reason}")
        if len(rejected) > max(top, 12):
            lines.append(f"  ... {len(rejected) - max(top, 12)} more (plan.format=json lists all)")
    return "\n".join(lines)


def train_overrides(plan: Plan, c: Candidate, base: TrainingSetup, model: Sequence[str]) -> List[str]:
    """Hydra overrides of ft-train for a candidate: every setting the plan's memory figure depends on. `model`
    selects the model and its planned architecture (write_plan_files)."""
    train_precision = "bf16" if c.precision == "pure_bf16" else c.precision
    peft = (
        []
        if base.peft == "none"
        else [
            f"peft={base.peft}",
            f"peft.r={base.lora_rank}",
            f"peft.target_modules=[{','.join(base.lora_targets)}]",
            f"peft.dropout={base.lora_dropout}",
        ]
    )
    return [
        *model,
        *(
            ["strategy=fsdp", "strategy.cpu_offload=true"]
            if c.strategy == "fsdp_offload"
            else [f"strategy={c.strategy}"]
        ),
        *(peft or ["peft=none"]),
        f"train.micro_batch_size={c.micro_batch}",
        f"train.grad_accum={c.grad_accum}",
        f"train.precision={train_precision}",
        f"train.optimizer={base.optimizer}",
        f"train.loss={base.loss}",
        f"train.loss_chunk_tokens={base.loss_chunk_tokens}",
        f"train.offload_activations={'true' if base.offload_activations else 'false'}",
        f"data.max_seq_len={base.seq_len}",
        f"model.attn_implementation={c.attention}",
        f"model.gradient_checkpointing={'true' if c.activation_checkpointing else 'false'}",
        f"model.checkpoint_every={base.checkpoint_every}",
    ]


def launch_command(c: Candidate, overrides: List[str]) -> str:
    """What ft-launch prints for this layout: the same line on every node, MASTER_ADDR set to the first one."""
    elastic = "ft-dist" if c.nodes > 1 else None
    return shell_line(
        training_command(c.nodes, c.gpus_per_node, overrides, Rendezvous("$MASTER_ADDR", "29500", elastic))
    )


def write_plan_files(
    plan: Plan, out_dir: Path, base: TrainingSetup, arch: Mapping[str, Any], source_config: Optional[str] = None
) -> Optional[Path]:
    """plan.yaml (the overrides, one per line), launch.sh (the torchrun command) for the cheapest fit, and
    config.json: the architecture exactly as planned (conf/model/'s arch with any command-line overrides), which
    plan.yaml hands to ft-train as model.config. A plan made from model.config=<dir>/config.json loads <dir>."""
    best = plan.best
    if best is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(dict(arch), indent=1) + "\n")
    model = [f"model.config={(out_dir / 'config.json').resolve()}"]
    if source_config:
        # The weights beside the config.json, loaded (not a random init of the architecture).
        model += [f"model.name_or_path={Path(source_config).expanduser().resolve().parent}", "model.from_config=false"]
    else:
        model.insert(0, f"model={plan.model}")
    overrides = train_overrides(plan, best, base, model)
    note = "# pure bf16 is planned; ft-train's nearest setting is bf16 mixed\n" if best.precision == "pure_bf16" else ""
    if best.note:
        note += f"# {best.note}\n"
    # `planned`: the setup the memory figure was computed for, field by field (the overrides above reproduce it;
    # ft_dist/planner/run_setup.py reads the same fields back from a run's config).
    planned = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cast(TrainingSetup, best.setup)).items()}
    (out_dir / "plan.yaml").write_text(
        f"# ft-plan: {best.instance} x{best.nodes}"
        + (f", {best.hours:.1f} h, ${best.cost_usd:,.0f}" if plan.total_tokens > 0 else " (memory-only plan)")
        + f"\n{note}"
        + yaml.safe_dump({"overrides": overrides, "planned": planned}, sort_keys=False, width=1000)
    )
    (out_dir / "launch.sh").write_text(
        "#!/bin/bash\n# run on every node; MASTER_ADDR = the first node\n" + launch_command(best, overrides) + "\n"
    )
    return out_dir


def write_chart(plan: Plan, path: Path, top: int) -> Optional[Path]:
    """A stacked bar per candidate: memory per GPU by component against the usable memory."""
    shown = [c for c in plan.candidates if c.memory is not None][: max(top, 1)]
    if not shown:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(shown) + 2), 4.5))
    labels = [
        f"{c.instance}\nx{c.nodes} {c.strategy}\nmb{c.micro_batch}{' AC' if c.activation_checkpointing else ''}"
        for c in shown
    ]
    bottom = [0.0] * len(shown)
    for comp in _COMPONENTS:
        values = [cast(MemoryBreakdown, c.memory).per_gpu()[comp] / GIB for c in shown]  # shown: memory is not None
        ax.bar(range(len(shown)), values, bottom=bottom, label=comp)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.scatter(range(len(shown)), [c.usable_bytes / GIB for c in shown], marker="_", s=400, color="k", label="usable")
    ax.set_xticks(range(len(shown)), labels, fontsize=6)
    ax.set_ylabel("GiB per GPU")
    ax.set_title(f"{plan.model}: memory per GPU at the peak")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
