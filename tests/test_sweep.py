"""Hydra multirun with the basic launcher: members one after another, each a real 2-process torchrun job, and the
sweep summary table gathering each member's resolved config and final metrics. (The Slurm/submitit variant is in
test_slurm.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from dist_utils import env

pytestmark = pytest.mark.slow
TINY = ["data.limit=200", "data.test_size=20", "train.max_steps=3", "train.log_every=1", "eval.before_training=false",
        "eval.max_examples=4", "eval.max_new_tokens=4"]


def test_local_multirun_members_are_multiprocess_jobs_and_summary_is_written(cache_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "sweep.py"), "-m", "--nproc-per-node", "2",
                           "hydra/launcher=local", f"hydra.sweep.dir={sweep_dir}", f"data.cache_dir={cache_dir}",
                           *TINY, "train.lr=1e-3,1e-2"], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (sweep_dir / "summary.jsonl").read_text().splitlines()]
    assert [r["member"] for r in rows] == [0, 1] and all(r["status"] == "ok" for r in rows)
    assert [r["config"]["train"]["lr"] for r in rows] == [1e-3, 1e-2]  # each member's resolved config
    assert all(r["config"]["strategy"]["name"] == "ddp" and r["world_size"] == 2 for r in rows)
    for r in rows:  # the member really ran as 2 processes: rank 0 reports the world size
        assert "x world 2" in (sweep_dir / str(r["member"]) / "member.node0.log").read_text()
    # Different learning rates give different final losses, and the table shows them beside the swept value.
    losses = [r["metrics"]["final_train_loss"] for r in rows]
    assert losses[0] != losses[1]
    table = (sweep_dir / "summary.md").read_text()
    assert f"| 0 | train.lr=0.001 | ok | {losses[0]:.4f} |" in table
    assert f"| 1 | train.lr=0.01 | ok | {losses[1]:.4f} |" in table


def test_failed_member_is_reported_and_fails_the_sweep(cache_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\n{"question": \n' * 3)
    # A malformed data file passes the sweep's config checks and fails inside the member's torchrun job.
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "sweep.py"), "-m", "--nproc-per-node", "2",
                           f"hydra.sweep.dir={sweep_dir}", f"data.cache_dir={cache_dir}", *TINY,
                           f"data.path={bad}", "train.lr=1e-3"], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = json.loads((sweep_dir / "summary.jsonl").read_text())
    assert row["status"] == "failed" and row["exit_code"] == 2  # the worker's user-error code, through torchrun
