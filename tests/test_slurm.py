"""ft-dist on a real Slurm: slurmctld + slurmd + munged on localhost (slurm/local_cluster.sh), real sbatch/srun/scontrol,
real torchrun. The fixtures start the clusters when they are not already up (CI may start them) and stop only the
ones they started. One node (2 CPUs) and two emulated nodes n1/n2 whose names do not resolve.

Figures from one run on 2 cores: a 2-process job ~20 s, a 2-node job ~25 s, requeue-to-resume ~16 s.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from conftest import REPO
from dist_utils import env as proc_env
from dist_utils import assert_same_weights, logged_steps, wait_for

pytestmark = pytest.mark.slow
SCRIPT = REPO / "slurm" / "local_cluster.sh"
BASE = Path(os.environ.get("FT_DIST_SLURM_DIR", "/tmp/ft-dist-slurm"))
CTLD_PORT = {1: "6817", 2: "6827"}  # both clusters may run at once: distinct slurmctld ports (slurmd ports differ too)


def _cluster(nodes: int) -> Iterator[Dict[str, str]]:
    """The environment for client commands against a running local cluster of `nodes` nodes."""
    work = BASE / ("one" if nodes == 1 else "two")
    env = {**os.environ, "FT_DIST_SLURMCTLD_PORT": CTLD_PORT[nodes]}
    started = subprocess.run([str(SCRIPT), "status", "--dir", str(work)], env=env, capture_output=True).returncode != 0
    if started:
        up = subprocess.run([str(SCRIPT), "up", "--nodes", str(nodes), "--dir", str(work)], env=env,
                            capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, up.stderr
    yield {"SLURM_CONF": str(work / "slurm.conf")}
    if started:
        subprocess.run([str(SCRIPT), "down", "--dir", str(work)], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def slurm_one() -> Iterator[Dict[str, str]]:
    yield from _cluster(1)


@pytest.fixture(scope="session")
def slurm_two() -> Iterator[Dict[str, str]]:
    yield from _cluster(2)


def train_args(model_dir: Path, cache_dir: Path, steps: int, *extra: str) -> List[str]:
    return [f"model.name_or_path={model_dir}", "model.from_config=false", "model.tokenizer=embedded:char",
            f"data.cache_dir={cache_dir}", "data.limit=400", "data.test_size=40", f"train.max_steps={steps}",
            "train.log_every=1", "train.warmup_steps=0", "train.lr=1e-3", "train.micro_batch_size=2",
            "train.grad_accum=2", "eval.before_training=false", "eval.max_examples=4", "eval.max_new_tokens=4",
            "strategy=ddp", *extra]


def sbatch(slurm: Dict[str, str], run_dir: Path, launch: List[str], train: List[str]) -> str:
    """Write the job script with the project's generator and submit it; returns the job id."""
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "slurm.py"), f"run_dir={run_dir}", "submit=true",
                           *launch, "--", *train], cwd=REPO, env=proc_env(slurm), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return re.search(r"submitted job (\d+)", proc.stdout).group(1)


def job_state(slurm: Dict[str, str], job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=proc_env(slurm), capture_output=True, text=True)
    m = re.search(r"JobState=(\S+)", out.stdout)
    return m.group(1) if m else "UNKNOWN"


def wait_done(slurm: Dict[str, str], job: str, timeout: float = 300) -> str:
    """Poll until the job is no longer pending, running or requeued; return its final state."""
    end = time.time() + timeout
    while time.time() < end:
        state = job_state(slurm, job)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job], env=proc_env(slurm))
    raise AssertionError(f"job {job} still {job_state(slurm, job)} after {timeout} s")


STEPS = 30


@pytest.fixture(scope="module")
def two_task_run(slurm_one, model_dir, cache_dir, tmp_path_factory) -> Path:
    """One node, one task running torchrun with 2 processes: the uninterrupted reference for the tests below."""
    run = tmp_path_factory.mktemp("slurm-2proc")
    start = time.time()
    job = sbatch(slurm_one, run, ["cluster=local", "cluster.gpus_per_node=2"], train_args(model_dir, cache_dir, STEPS))
    state = wait_done(slurm_one, job)
    print(f"\n2-process sbatch job: {time.time() - start:.1f} s")
    log = (run / "slurm.log").read_text()
    assert state == "COMPLETED", log[-4000:]
    return run


def test_sbatch_job_trains_on_two_processes(two_task_run):
    log = (two_task_run / "slurm.log").read_text()
    assert "global batch 8 = micro 2 x accum 2 x world 2" in log
    assert "#SBATCH --signal=B:USR1@" in (two_task_run / "job.sbatch").read_text()
    steps = [json.loads(line) for line in (two_task_run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == list(range(1, STEPS + 1))
    assert (two_task_run / "final" / "model.safetensors").exists()


def test_two_node_job_rendezvous_and_trains(slurm_two, model_dir, cache_dir, two_task_run, tmp_path):
    # The emulated nodes' names do not resolve: the script must rendezvous on the NodeAddr, not the name.
    assert subprocess.run(["getent", "hosts", "n1"], capture_output=True).returncode != 0
    start = time.time()
    job = sbatch(slurm_two, tmp_path, ["cluster=local", "cluster.nodes=2", "cluster.gpus_per_node=1"],
                 train_args(model_dir, cache_dir, STEPS))
    state = wait_done(slurm_two, job)
    print(f"\n2-node sbatch job: {time.time() - start:.1f} s")
    log = (tmp_path / "slurm.log").read_text()
    assert state == "COMPLETED", log[-4000:]
    assert re.search(r"on n\[1-2\]; rendezvous 127\.0\.0\.1:\d+", log)
    assert log.count("global batch 8 = micro 2 x accum 2 x world 2") == 1  # rank 0 of the 2 nodes logs
    # Same global batch, same data order, same DDP arithmetic: 2 nodes x 1 == 1 node x 2.
    assert_same_weights(tmp_path, two_task_run, rtol=1e-5, atol=1e-6)


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_weights(slurm_one, model_dir, cache_dir, two_task_run,
                                                                   tmp_path):
    job = sbatch(slurm_one, tmp_path, ["cluster=local", "cluster.gpus_per_node=2"],
                 train_args(model_dir, cache_dir, STEPS))
    wait_for(lambda: logged_steps(tmp_path) >= 5, what="5 logged training steps")
    # What `--signal=B:USR1@<s>` does before the time limit: USR1 to the batch shell only.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=proc_env(slurm_one), check=True)
    state = wait_done(slurm_one, job, timeout=400)
    log = (tmp_path / "slurm.log").read_text()
    assert state == "COMPLETED", log[-5000:]
    assert "got SIGUSR1" in log and "requeueing job" in log and f"job {job} restart 1 " in log, log[-5000:]
    assert list((tmp_path / "checkpoints").glob("step-*/COMPLETE")), "no complete checkpoint was written"
    stamps = re.findall(r"\[ft-dist\] (\S+ \S+) (?:checkpointed; requeueing|job \d+ restart 1 )", log)
    if len(stamps) == 2:
        t0, t1 = (time.mktime(time.strptime(s, "%Y-%m-%d %H:%M:%S")) for s in stamps)
        print(f"\nrequeue to resume: {t1 - t0:.0f} s")
    assert_same_weights(tmp_path, two_task_run, rtol=1e-5, atol=1e-6)


def test_scancel_ends_the_job_without_a_requeue(slurm_one, model_dir, cache_dir, tmp_path):
    job = sbatch(slurm_one, tmp_path, ["cluster=local", "cluster.gpus_per_node=2"],
                 train_args(model_dir, cache_dir, 2000))
    wait_for(lambda: logged_steps(tmp_path) >= 2, what="2 logged training steps")
    subprocess.run(["scancel", job], env=proc_env(slurm_one), check=True)
    assert wait_done(slurm_one, job, timeout=120) == "CANCELLED"
    time.sleep(5)  # a requeue would show here: the job pending or running again
    log = (tmp_path / "slurm.log").read_text()
    assert job_state(slurm_one, job) == "CANCELLED" and "requeueing" not in log, log[-3000:]


def test_hydra_multirun_through_submitit_writes_summary(slurm_one, model_dir, cache_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    start = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "sweep.py"), "-m", "--nproc-per-node", "2",
                           "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=2", f"hydra.sweep.dir={sweep_dir}",
                           *train_args(model_dir, cache_dir, 3), "train.lr=1e-3,3e-3,1e-2"],
                          cwd=REPO, env=proc_env(slurm_one), capture_output=True, text=True, timeout=600)
    print(f"\n3-member submitit multirun: {time.time() - start:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (sweep_dir / "summary.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert all(r["slurm_job_id"] and r["world_size"] == 2 for r in rows)  # each member: a Slurm job of 2 processes
    assert sorted(r["config"]["train"]["lr"] for r in rows) == [1e-3, 3e-3, 1e-2]
    assert all(isinstance(r["metrics"]["eval_loss"], float) for r in rows)
    table = (sweep_dir / "summary.md").read_text()
    assert all(f"| {i} | train.lr=" in table for i in range(3))


def test_learning_curve_runs_through_the_slurm_launcher(slurm_one, model_dir, cache_dir, tmp_path):
    """`ft-sweep curve ... -- hydra/launcher=slurm`: every (model, fraction) run is a Slurm job, ft-eval scores each
    run on the one test split, and the curve is written."""
    saved = f"saved: model.name_or_path={model_dir} model.from_config=false model.tokenizer=embedded:char"
    args = [a for a in train_args(model_dir, cache_dir, 3) if not a.startswith(("model.", "strategy="))]
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "sweep.py"), "curve", "--dir", str(tmp_path / "c"),
                           "--fractions", "0.5,1.0", "--model", saved, "--", "hydra/launcher=slurm",
                           "hydra.launcher.cpus_per_task=1", *args],
                          cwd=REPO, env=proc_env(slurm_one), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "c" / "saved" / "summary.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "ok"] and all(r["slurm_job_id"] for r in rows), rows
    assert len({r["slurm_job_id"] for r in rows}) == 2  # one Slurm job per fraction
    points = json.loads((tmp_path / "c" / "curve.json").read_text())["points"]
    assert [p["status"] for p in points] == ["ok", "ok"], points
    small, full = sorted(points, key=lambda p: p["fraction"])
    assert small["examples"] * 2 == pytest.approx(full["examples"], abs=1)
    assert all(isinstance(p["eval_loss"], float) for p in points)
    assert (tmp_path / "c" / "curve.png").stat().st_size > 0
