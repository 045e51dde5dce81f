"""`python launch/sweep.py -m [--nproc-per-node P] <sweep overrides> [hydra/launcher=local|slurm]`.

A Hydra multirun of ft-train where each member is a multi-process job (see ft_dist.cluster.sweep). Exits 1 when any
member failed, after the summary table is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import yaml

from ft_dist.cluster import wandb_sweep
from ft_dist.cluster.sweep import NPROC_ENV, SummaryCallback
from ft_dist.commands.startup import entry

CALLBACK = "+hydra.callbacks.ft_dist_summary._target_=ft_dist.cluster.sweep.SummaryCallback"


def _take_option(argv: List[str], name: str) -> Optional[str]:
    """Remove `--name V` / `--name=V` from argv (Hydra would reject it) and return V."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
        if arg.startswith(name + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def main(argv: Optional[List[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    nproc = _take_option(args, "--nproc-per-node")
    if nproc is not None:
        os.environ[NPROC_ENV] = nproc  # read by each member, here or in its Slurm job (sbatch exports the env)
    if not any(a in ("-m", "--multirun") for a in args):
        args.insert(0, "-m")
    sys.argv = [sys.argv[0], *args, CALLBACK]
    entry("train", "ft_dist.cluster.sweep:run_member")()
    summary = SummaryCallback.last_summary
    if summary is None:
        sys.exit(1)
    rows = [json.loads(line) for line in (summary.parent / "summary.jsonl").read_text().splitlines()]
    if any(r["status"] != "ok" for r in rows):
        sys.exit(1)


def wandb_main(argv: Sequence[str]) -> None:
    """`python launch/sweep.py wandb yaml|agent ...` (ft_dist/cluster/wandb_sweep.py says how the sweep runs)."""
    parser = argparse.ArgumentParser(
        prog="launch/sweep.py wandb", description=(wandb_sweep.__doc__ or "").split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="action", required=True)
    gen = sub.add_parser("yaml", help="write a W&B sweep YAML from Hydra sweep overrides (after --)")
    gen.add_argument("--nproc-per-node", type=int, default=1)
    gen.add_argument("--method", default="grid", choices=["grid", "random", "bayes"])
    gen.add_argument("--metric", default="eval_loss")
    gen.add_argument("--goal", default="minimize", choices=["minimize", "maximize"])
    gen.add_argument("--name")
    gen.add_argument("--runs-dir", default="runs/wandb-sweeps")
    gen.add_argument("-o", "--output", default="sweep.yaml")
    gen.add_argument("overrides", nargs="*")
    agent = sub.add_parser("agent", help="run trials of a sweep YAML (online with WANDB_API_KEY, else offline)")
    agent.add_argument("sweep_file")
    agent.add_argument("--count", type=int)
    agent.add_argument("--sweep-id", help="an existing online sweep (else the YAML is registered once, here)")
    agent.add_argument("--project", default="ft-dist")
    agent.add_argument("--entity")
    args = parser.parse_args(list(argv))
    if args.action == "yaml":
        config = wandb_sweep.sweep_config(
            args.overrides, args.nproc_per_node, args.method, args.metric, args.goal, args.name, args.runs_dir
        )
        Path(args.output).write_text(yaml.safe_dump(config, sort_keys=False))
        print(f"wrote {args.output}: {len(config['parameters'])} parameter(s), method {args.method}")
        return
    config = yaml.safe_load(Path(args.sweep_file).read_text())
    online = os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE", "online") != "offline"
    if online:
        wandb_sweep.online_agent(config, args.count, args.sweep_id, args.project, args.entity)
        return
    results = wandb_sweep.offline_agent(config, args.count, args.sweep_id)
    print(json.dumps(results, indent=2))
    if any(r["exit_code"] != 0 for r in results):
        sys.exit(1)
