"""`python launch/sweep.py -m [--nproc-per-node P] <sweep overrides> [hydra/launcher=local|slurm]`.

A Hydra multirun of ft-train where each member is a multi-process job (see ft_dist.cluster.sweep). Exits 1 when any
member failed, after the summary table is written. `ft-sweep wandb ...` is the W&B sweep generator and agent,
`ft-sweep curve ...` a learning curve (data.fraction x models, each run scored by ft-eval).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import yaml

from ft_dist.cluster import curve, wandb_sweep
from ft_dist.cluster.sweep import NPROC_ENV, SummaryCallback
from ft_dist.commands.slurm import check_train_overrides
from ft_dist.commands.startup import entry
from ft_dist.errors import UserError
from ft_dist.runtime import exit_with_error

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
    """`ft-sweep -m ...` (Hydra multirun), `ft-sweep wandb ...` or `ft-sweep curve ...`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("wandb", "curve"):
        (wandb_main if args[0] == "wandb" else curve_main)(args[1:])
        return
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


CURVE_EPILOG = """example (the embedded demo, two model sizes):
  python launch/sweep.py curve --fractions 0.1,0.3,1.0 --model tiny \\
      --model "tiny-4l: model.arch.num_hidden_layers=4 model.arch.hidden_size=192" -- train.max_steps=300
Everything after -- applies to every run (training overrides, hydra/launcher=slurm, hydra.launcher.*)."""


def _curve_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch/sweep.py curve",
        description="Learning curve: train every model at every data.fraction (nested subsets, one test split), "
        "score each run with ft-eval, write curve.png / curve.md / curve.json.",
        epilog=CURVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--fractions", default="0.1,0.3,1.0", help="shares of the training data, in (0, 1]")
    parser.add_argument(
        "--model", action="append", default=[], help="a conf/model option, or 'LABEL: override ...' (repeatable)"
    )
    parser.add_argument(
        "--metric", default="exact_match", help="the task metric to plot (a key of ft-eval's eval.json)"
    )
    parser.add_argument("--dir", help="where the curve goes (default: multirun/curve-<time>)")
    parser.add_argument("--nproc-per-node", type=int, help="processes per run (as ft-sweep -m --nproc-per-node)")
    parser.add_argument("overrides", nargs="*", help="after --: overrides for every run")
    return parser.parse_args(list(argv))


def curve_main(argv: Sequence[str]) -> None:
    """`ft-sweep curve`: check everything in one line each, then run the sweeps, the evaluations and the curve."""
    import time

    args = _curve_args(argv)
    try:
        fractions = curve.parse_fractions(args.fractions)
        models = curve.parse_models(args.model)
        common = list(args.overrides)
        if any(o.startswith(("data.fraction=", "output_dir=")) for o in common):
            raise UserError("config error: data.fraction / output_dir: set by the curve, not after -- (--fractions)")
        for model in models:  # every run's training config composes and validates before any of them starts
            check_train_overrides(
                [*curve.training_overrides(common), *model.overrides, f"data.fraction={fractions[0]}"]
            )
    except UserError as err:
        exit_with_error(str(err))
    out = Path(args.dir or f"multirun/curve-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "curve.log"
    print(f"learning curve: {len(models)} model(s) x fractions {fractions} -> {out} (progress: {log})", flush=True)
    points = []
    for model in models:
        sweep_dir = out / model.label
        cmd = curve.model_sweep_command(model, fractions, common, sweep_dir, out.name, args.nproc_per_node)
        code = curve.run_logged(cmd, log)
        rows = curve.members(sweep_dir)
        print(f"{model.label}: {sum(r['status'] == 'ok' for r in rows)}/{len(fractions)} runs trained (exit {code})")
        for row in rows:
            if row["status"] == "ok":
                curve.evaluate_run(Path(row["run_dir"]), common, log)
            points.append(curve.point(model.label, row))
        if not rows:  # the sweep died before any member: one failed point per fraction keeps the table honest
            points += [_failed_point(model.label, f, sweep_dir) for f in fractions]
    _finish_curve(out, points, args.metric)


def _failed_point(model: str, fraction: float, sweep_dir: Path) -> dict:
    return {
        "model": model,
        "fraction": fraction,
        "examples": None,
        "parameters": None,
        "scores": {},
        "run_dir": str(sweep_dir),
        "status": "failed",
        "test_digest": None,
    }


def _finish_curve(out: Path, points: list, metric: str) -> None:
    """Tabulate, plot and read the curve; exit 1 when a run failed (after writing what there is)."""
    from ft_dist.eval.curve import CurvePoint, write_curve

    try:
        curve.check_same_test_split(points)
    except UserError as err:
        exit_with_error(str(err))
    curve_points = [
        CurvePoint(
            model=p["model"],
            fraction=p["fraction"],
            examples=p["examples"],
            metric=p["scores"].get(metric),
            eval_loss=p["scores"].get("eval_loss"),
            parameters=p["parameters"],
            run_dir=p["run_dir"],
            status=p["status"],
        )
        for p in points
    ]
    paths = write_curve(out, curve_points, metric, out.name)
    print(paths["md"].read_text(), flush=True)
    print(f"curve: {paths['png']}, {paths['md']}, {paths['json']}", flush=True)
    if any(p.status != "ok" for p in curve_points):
        sys.exit(1)
