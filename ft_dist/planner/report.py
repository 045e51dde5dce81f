"""What ft-plan prints and writes: the ranked table, the naive course table, a PNG chart, a runnable plan."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, cast

from ft_dist.cluster.command_line import Rendezvous, shell_line, training_command
from ft_dist.planner.api import Plan
from ft_dist.planner.memory import GIB, MemoryBreakdown
from ft_dist.planner.recommend import Candidate
from ft_dist.planner.workload import TrainingSetup

_COMPONENTS = ("params", "grads", "optimizer", "activations", "logits", "comm_buffers", "overhead")


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


def candidates_text(plan: Plan, top: int) -> str:
    fits = [c for c in plan.candidates if c.fits]
    lines = [
        f"{plan.model}: {plan.arch.total_params:,} parameters, {plan.total_tokens:.3g} tokens to train",
        f"{'instance':14} {'nodes':>5} {'strategy':13} {'mb':>3} {'acc':>4} {'AC':>3} {'GiB/GPU':>8} "
        f"{'tok/s':>9} {'hours':>8} {'cost $':>9}",
    ]
    for c in fits[:top]:
        assert c.memory is not None  # a candidate only fits with a memory estimate
        lines.append(
            f"{c.instance:14} {c.nodes:>5} {c.strategy:13} {c.micro_batch:>3} {c.grad_accum:>4} "
            f"{'on' if c.activation_checkpointing else 'off':>3} {c.memory.total / GIB:>8.1f} "
            f"{c.tokens_per_second:>9,.0f} {c.hours:>8.1f} {c.cost_usd:>9,.0f}"
        )
    if fits:
        fastest = min(fits, key=lambda c: c.hours)
        lines.append(
            f"cheapest: {fits[0].instance} x{fits[0].nodes} {fits[0].strategy}; "
            f"fastest: {fastest.instance} x{fastest.nodes} {fastest.strategy} ({fastest.hours:.1f} h)"
        )
    else:
        lines.append("nothing fits: see the reasons below")
    rejected = [c for c in plan.candidates if not c.fits]
    if rejected:
        lines.append(f"rejected ({len(rejected)}):")
        for c in rejected[: max(top, 12)]:
            lines.append(f"  {c.instance} x{c.nodes} {c.strategy}: {c.reason}")
        if len(rejected) > max(top, 12):
            lines.append(f"  ... {len(rejected) - max(top, 12)} more (plan.format=json lists all)")
    return "\n".join(lines)


def train_overrides(plan: Plan, c: Candidate, base: TrainingSetup) -> List[str]:
    """Hydra overrides of ft-train for a candidate: every setting the plan's memory figure depends on."""
    train_precision = "bf16" if base.precision == "pure_bf16" else base.precision
    peft = (
        []
        if base.peft == "none"
        else [
            f"peft={base.peft}",
            f"peft.r={base.lora_rank}",
            f"peft.target_modules=[{','.join(base.lora_targets)}]",
        ]
    )
    return [
        f"model={plan.model}",
        f"strategy={c.strategy}",
        *(peft or ["peft=none"]),
        f"train.micro_batch_size={c.micro_batch}",
        f"train.grad_accum={c.grad_accum}",
        f"train.precision={train_precision}",
        f"train.optimizer={base.optimizer}",
        f"train.loss={base.loss}",
        f"train.offload_activations={'true' if base.offload_activations else 'false'}",
        f"data.max_seq_len={base.seq_len}",
        f"model.attn_implementation={base.attention}",
        f"model.gradient_checkpointing={'true' if c.activation_checkpointing else 'false'}",
        f"model.checkpoint_every={base.checkpoint_every}",
    ]


def launch_command(c: Candidate, overrides: List[str]) -> str:
    """What ft-launch prints for this layout: the same line on every node, MASTER_ADDR set to the first one."""
    elastic = "ft-dist" if c.nodes > 1 else None
    return shell_line(
        training_command(c.nodes, c.gpus_per_node, overrides, Rendezvous("$MASTER_ADDR", "29500", elastic))
    )


def write_plan_files(plan: Plan, out_dir: Path, base: TrainingSetup) -> Optional[Path]:
    """plan.yaml (the overrides, one per line) and launch.sh (the torchrun command) for the cheapest fit."""
    best = plan.best
    if best is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = train_overrides(plan, best, base)
    note = "# pure bf16 is planned; ft-train's nearest setting is bf16 mixed\n" if base.precision == "pure_bf16" else ""
    (out_dir / "plan.yaml").write_text(
        f"# ft-plan: {best.instance} x{best.nodes}, {best.hours:.1f} h, ${best.cost_usd:,.0f}\n{note}"
        "overrides:\n" + "".join(f"  - {o}\n" for o in overrides)
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
