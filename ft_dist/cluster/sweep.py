"""Hydra multirun members as multi-process training jobs, and the sweep's summary table.

`python launch/sweep.py -m [--nproc-per-node P] train.lr=1e-3,3e-3 [hydra/launcher=slurm]`: Hydra expands the sweep;
each member runs `run_member`, which starts torchrun (through `ft_dist.commands.node`) with the member's overrides and
its own output_dir. With the basic launcher the members run one after another on this machine (`--standalone`);
with the submitit launcher each member is a Slurm job whose one task per node starts torchrun with c10d rendezvous
on the first node. When the multirun ends, `SummaryCallback` gathers every member's resolved config and final
metrics into `<sweep dir>/summary.md` (a table) and `summary.jsonl` (everything, one member per line).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ft_dist.cluster import job_overrides
from ft_dist.cluster.command_line import Rendezvous, training_command
from ft_dist.cluster.rendezvous import head_address
from ft_dist.runtime import REPO_ROOT, TRAIN_SCRIPT

NPROC_ENV = "FT_DIST_NPROC_PER_NODE"
"""Processes per node for each member; set by launch/sweep.py's --nproc-per-node, inherited by Slurm jobs."""
SUMMARY_METRICS = ("final_train_loss", "eval_loss", "eval_perplexity", "exact_match", "token_f1", "train_seconds")


def member_overrides(
    task_overrides: List[str], run_dir: Path, world_size: int, cfg: DictConfig, sweep_name: str
) -> List[str]:
    """The training overrides for one member: its sweep values, its run dir, a distributed strategy, a W&B group."""
    out = job_overrides(task_overrides, world_size, output_dir=run_dir)
    if cfg.logger.name == "wandb" and cfg.logger.group is None:
        out.append(f"logger.group={sweep_name}")  # W&B groups the sweep's runs together
    return out


def _layout() -> Tuple[int, int, Rendezvous]:
    """This member's (nodes, processes per node, rendezvous): a Slurm job's nodes (one task each) or one node."""
    nproc = int(os.environ.get(NPROC_ENV, "1"))
    if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_JOB_NUM_NODES", "1")) > 1:
        # Every node must pick the same port without talking to the others: derive it from the job id.
        port = 20000 + int(os.environ["SLURM_JOB_ID"]) % 20000
        rendezvous = Rendezvous(head_address(), str(port), f"sweep-{os.environ['SLURM_JOB_ID']}")
        return int(os.environ["SLURM_JOB_NUM_NODES"]), nproc, rendezvous
    return 1, nproc, Rendezvous()


def run_member(cfg: DictConfig) -> int:
    """Hydra task function: run this member as a multi-process job and record how it went in member.json."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir).resolve()
    sweep_dir = Path(hc.sweep.dir).resolve()
    nnodes, nproc, rendezvous = _layout()
    node_rank, world_size = int(os.environ.get("SLURM_NODEID", "0")) if nnodes > 1 else 0, nnodes * nproc
    overrides = member_overrides(list(hc.overrides.task), run_dir, world_size, cfg, sweep_dir.name)
    cmd = training_command(
        nnodes, nproc, overrides, rendezvous, python=sys.executable, script=str(REPO_ROOT / TRAIN_SCRIPT)
    )
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # submitit sets these for its own tasks; torchrun must set them for the workers
    start = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / f"member.node{node_rank}.log").open("a") as log:
        code = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if node_rank == 0:
        record = {
            "member": hc.job.num,
            "overrides": list(hc.overrides.task),
            "exit_code": code,
            "status": "ok" if code == 0 else "failed",
            "seconds": round(time.time() - start, 1),
            "nodes": nnodes,
            "world_size": world_size,
            "run_dir": str(run_dir),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        }
        (run_dir / "member.json").write_text(json.dumps(record, indent=2))
    return 0  # a failed member is recorded, not raised: the other members still run and the summary shows it


def _member_row(run_dir: Path) -> Dict[str, Any]:
    """member.json + the resolved config + final metrics of one member directory."""
    import yaml

    row: Dict[str, Any] = json.loads((run_dir / "member.json").read_text())
    config_file, eval_file = run_dir / "config.yaml", run_dir / "eval.json"
    row["config"] = yaml.safe_load(config_file.read_text()) if config_file.exists() else None
    metrics: Dict[str, Any] = {}
    if eval_file.exists():
        report = json.loads(eval_file.read_text())
        metrics = {
            **report.get("after", {}),
            "final_train_loss": report.get("final_train_loss"),
            "train_seconds": report.get("train_seconds"),
            "steps": report.get("steps"),
        }
    row["metrics"] = metrics
    return row


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))


def write_summary(sweep_dir: Path) -> Optional[Path]:
    """Gather every member under the sweep dir into summary.jsonl and a Markdown table in summary.md."""
    sweep_dir = Path(sweep_dir)
    rows = sorted((_member_row(p.parent) for p in sweep_dir.glob("*/member.json")), key=lambda r: r["member"])
    if not rows:
        return None
    with (sweep_dir / "summary.jsonl").open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    # Show the overrides that differ between members (the swept values); the rest is common to all of them.
    common = set.intersection(*(set(r["overrides"]) for r in rows)) if len(rows) > 1 else set()
    header = ["member", "overrides", "status", *SUMMARY_METRICS, "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            str(r["member"]),
            " ".join(o for o in r["overrides"] if o not in common),
            r["status"],
            *(_cell(r["metrics"].get(k)) for k in SUMMARY_METRICS),
            _cell(r["seconds"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    path = sweep_dir / "summary.md"
    path.write_text(f"# Sweep {sweep_dir.name}: {len(rows)} members\n\n" + "\n".join(lines) + "\n")
    return path


class SummaryCallback(Callback):
    """Writes the sweep summary in the launching process once every member has finished."""

    last_summary: Optional[Path] = None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = write_summary(Path(config.hydra.sweep.dir))
        SummaryCallback.last_summary = path
        if path is not None:
            print(f"sweep summary: {path}\n{path.read_text()}", flush=True)
