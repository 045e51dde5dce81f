"""`python launch/sweep.py -m [--nproc-per-node P] <sweep overrides> [hydra/launcher=local|slurm]`.

A Hydra multirun of ft-train where each member is a multi-process job (see ft_dist.cluster.sweep). Exits 1 when any
member failed, after the summary table is written.
"""

from __future__ import annotations

import json
import os
import sys
from typing import List, Optional

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
