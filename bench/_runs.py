"""Shared bench helpers: launch the real CLI (single process or torchrun) and read what the run wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("FT_DIST_ASSETS", REPO.parent / "shared" / "assets"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(overrides: Sequence[str], nproc: int = 0, threads: int = 1, launcher: str = "torchrun") -> str:
    """Run launch/train.py; nproc=0 means a plain single process. Returns stdout; raises on failure."""
    env = {**os.environ, "FT_DIST_NO_PROGRESS": "1", "OMP_NUM_THREADS": str(threads)}
    script = str(REPO / "launch" / "train.py")
    if nproc == 0:
        cmd = [sys.executable, script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), script]
    proc = subprocess.run([*cmd, *overrides], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def metrics(run_dir: Path) -> List[Dict[str, float]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def seconds_per_step(run_dir: Path, skip: int) -> float:
    """Steady-state step time: elapsed between step `skip` and the last step (startup and warmup excluded)."""
    rows = [m for m in metrics(run_dir) if "loss" in m]
    first, last = rows[skip - 1], rows[-1]
    return (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"])


def dir_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20
