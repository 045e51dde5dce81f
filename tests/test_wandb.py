"""W&B from real runs, offline: the files are read back with wandb's own reader (`wandb leet inspect --json`).

Only global rank 0 talks to W&B, so a 2-process run makes exactly one run; W&B being absent never stops training;
a W&B sweep's agent runs in the launching process and starts 2-process trials. There is no W&B server here and no
stand-in speaking its protocol on PyPI, so the agent is the offline one (ft_dist/cluster/wandb_sweep.py): the search
is done locally, while each trial's command, environment and parameter file are built as wandb's agent builds them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml

from conftest import REPO
from dist_utils import env, single, torchrun

WANDB_CLI = str(Path(sys.executable).parent / "wandb")
TINY = ["data.limit=200", "data.test_size=20", "train.max_steps=3", "train.log_every=1", "eval.before_training=false",
        "eval.max_examples=4", "eval.max_new_tokens=4"]


def offline_env(tmp: Path) -> Dict[str, str]:
    e = env({"WANDB_DIR": str(tmp), "WANDB_CACHE_DIR": str(tmp / "cache"), "WANDB_CONFIG_DIR": str(tmp / "config")})
    e.pop("WANDB_API_KEY", None)
    e.pop("WANDB_MODE", None)  # the default (logger.mode=auto) must choose offline by itself
    return e


def records(run_file: Path) -> List[Dict[str, Any]]:
    """Every record of a .wandb transaction log, decoded by wandb itself."""
    out = subprocess.run([WANDB_CLI, "leet", "inspect", "--json", str(run_file)], capture_output=True, text=True,
                         timeout=120, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def offline_runs(root: Path) -> List[Path]:
    return sorted(root.rglob("offline-run-*/run-*.wandb"))


@pytest.mark.slow
def test_two_process_run_writes_one_offline_run_with_metrics_and_config(cache_dir, tmp_path):
    out = tmp_path / "run"
    proc = torchrun([f"data.cache_dir={cache_dir}", *TINY, "strategy=ddp", "logger=wandb", "train.lr=2e-3",
                     f"output_dir={out}"], extra_env=offline_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = offline_runs(out)
    assert len(runs) == 1, runs  # rank 1 never calls wandb.init
    recs = records(runs[0])
    run = next(r["run"] for r in recs if r["type"] == "run")
    config = run["config"]["update"]
    assert config["train"]["lr"] == 2e-3 and config["strategy"]["name"] == "ddp"
    history = [r["history"]["item"] for r in recs if r["type"] == "history"]
    assert [h["_step"] for h in history if "loss" in h] == [1, 2, 3]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "memory_gb"} <= set(history[0])
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["loss"] for h in history if "loss" in h] == pytest.approx([m["loss"] for m in logged if "loss" in m])
    summary = {k: v for r in recs if r["type"] == "summary" for k, v in r["summary"]["update"].items()}
    assert isinstance(summary["final/eval_loss"], float)
    # `wandb sync` finds it as a run to upload (--dry-run: no server here).
    dry = subprocess.run([WANDB_CLI, "sync", "--dry-run", str(runs[0].parent)], capture_output=True, text=True,
                         timeout=120, env=offline_env(tmp_path))
    assert dry.returncode == 0 and runs[0].parent.name in dry.stdout + dry.stderr, dry.stdout + dry.stderr


@pytest.mark.slow
def test_training_finishes_when_wandb_is_absent(cache_dir, tmp_path):
    shadow = tmp_path / "shadow" / "wandb"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('wandb is not installed')\n")  # as if uninstalled
    out = tmp_path / "run"
    proc = single([f"data.cache_dir={cache_dir}", *TINY, "logger=wandb", f"output_dir={out}"],
                  extra_env={**offline_env(tmp_path), "PYTHONPATH": str(shadow.parent)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B did not start" in proc.stdout + proc.stderr
    assert (out / "final" / "model.safetensors").exists() and not offline_runs(out)


def test_sweep_yaml_from_hydra_sweep_spec():
    from ft_dist.cluster.wandb_sweep import sweep_config, suggestions

    grid = sweep_config(["train.lr=1e-4,3e-4", "peft.r=choice(4,8)", "model=tiny"], nproc_per_node=2)
    assert grid["parameters"] == {"train.lr": {"values": [1e-4, 3e-4]}, "peft.r": {"values": [4, 8]}}
    assert "model=tiny" in grid["command"] and "strategy=ddp" in grid["command"]
    assert grid["command"][-1] == "${args_no_hyphens}" and "--nproc_per_node" in grid["command"]
    assert len(list(suggestions(grid, None))) == 4
    rand = sweep_config(["train.lr=tag(log,interval(1e-5,1e-3))"], method="random")
    assert rand["parameters"]["train.lr"] == {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3}
    draws = [s["train.lr"] for s in suggestions(rand, 5)]
    assert len(draws) == 5 and all(1e-5 <= d <= 1e-3 for d in draws)
    with pytest.raises(ValueError, match="grid search needs discrete values"):
        sweep_config(["train.lr=interval(1e-5,1e-3)"])


@pytest.mark.slow
def test_sweep_agent_drives_two_multiprocess_trials(cache_dir, tmp_path):
    sweep_file, runs_dir = tmp_path / "sweep.yaml", tmp_path / "trials"
    launch = [sys.executable, str(REPO / "launch" / "sweep.py"), "wandb"]
    gen = subprocess.run([*launch, "yaml", "--nproc-per-node", "2", "--runs-dir", str(runs_dir), "-o", str(sweep_file),
                          "--", f"data.cache_dir={cache_dir}", *TINY, "train.lr=1e-3,1e-2"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr
    agent = subprocess.run([*launch, "agent", str(sweep_file), "--count", "2"], cwd=REPO, env=offline_env(tmp_path),
                           capture_output=True, text=True, timeout=600)
    assert agent.returncode == 0, agent.stdout[-3000:] + agent.stderr[-3000:]
    assert agent.stdout.count("x world 2") == 2  # both trials ran as 2-process jobs
    trials = json.loads(agent.stdout[agent.stdout.rindex("\n[\n") + 1:])
    assert [t["values"]["train.lr"] for t in trials] == [1e-3, 1e-2]
    for trial in trials:
        runs = offline_runs(runs_dir / trial["run_id"])
        assert len(runs) == 1  # one W&B run per trial, created by rank 0 only; no rank created a sweep
        run = next(r["run"] for r in records(runs[0]) if r["type"] == "run")
        assert run["run_id"] == trial["run_id"] and run["sweep_id"] == trial["sweep_id"]
        assert run["run_group"] == trial["sweep_id"]  # grouped by sweep
        assert run["config"]["update"]["train"]["lr"] == trial["values"]["train.lr"]
    assert len(list(tmp_path.glob("wandb/sweep-*/config-*.yaml"))) == 2  # the agent's parameter files, one a trial
    assert yaml.safe_load(sweep_file.read_text())["method"] == "grid"
