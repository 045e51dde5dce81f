"""The runs of a learning curve (`ft-sweep curve`): one sweep over data.fraction per model, then ft-eval per run.

Each model is one Hydra multirun through `launch/sweep.py -m` (ft_dist/cluster/sweep.py), so members are the same
multi-process jobs as any sweep, here one after another or as Slurm jobs (`hydra/launcher=slurm`), and every
member of every model is in one W&B group. Then each finished run is scored by `launch/eval.py checkpoint=<run>`
(in this process's machine, one after another) on the test split its own config.yaml names, which data.fraction
never changes. `collect` reads back what each run and its evaluation wrote, for ft_dist/eval/curve.py to tabulate.
Nothing here imports torch.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ft_dist.errors import ConfigError
from ft_dist.runtime import CONF_DIR, REPO_ROOT

EVAL_DIR = "curve-eval"
"""Where each run's ft-eval writes, inside the run dir."""
EVAL_PASSTHROUGH = ("eval.", "device=", "error_analysis=")
"""Overrides of the curve that ft-eval takes too (the rest are training's or the launcher's)."""


@dataclass
class CurveModel:
    """One model of the curve: a label and the training overrides that select it."""

    label: str
    overrides: List[str]


def parse_model(text: str) -> CurveModel:
    """`--model tiny` (a conf/model option, labelled by its name) or `--model "LABEL: override override ..."`
    (any training overrides, e.g. `tiny-4l: model.arch.num_hidden_layers=4`, or `p: model=pythia-70m ...`)."""
    label, sep, rest = text.partition(":")
    label = label.strip()
    if not sep:
        option = label
        if not (CONF_DIR / "model" / f"{option}.yaml").is_file():
            known = " ".join(sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))
            raise ConfigError("--model", f"expected a model option ({known}) or 'LABEL: overrides...', got {text!r}")
        return CurveModel(option, [f"model={option}"])
    if not re.fullmatch(r"[\w.+-]+", label):
        raise ConfigError("--model", f"expected a label of letters, digits, . + - _ before ':', got {label!r}")
    overrides = rest.split()
    if not overrides or not all("=" in o for o in overrides):
        raise ConfigError("--model", f"expected key=value training overrides after '{label}:', got {rest.strip()!r}")
    return CurveModel(label, overrides)


def parse_models(texts: Sequence[str]) -> List[CurveModel]:
    """The models of the curve, at least one, labels unique."""
    if not texts:
        raise ConfigError("--model", "expected at least one model: --model tiny [--model 'LABEL: overrides']")
    models = [parse_model(t) for t in texts]
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise ConfigError("--model", f"expected distinct labels, got {labels} (name them 'LABEL: overrides')")
    return models


def parse_fractions(text: str) -> List[float]:
    """`0.1,0.3,1.0` -> sorted distinct shares, each in (0, 1]."""
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ConfigError(
            "--fractions", f"expected comma-separated numbers in (0, 1], e.g. 0.1,0.3,1.0; got {text!r}"
        ) from None
    if not values:
        raise ConfigError("--fractions", "expected at least one share in (0, 1], e.g. 0.1,0.3,1.0")
    bad = [v for v in values if not 0 < v <= 1]
    if bad:
        raise ConfigError(
            "--fractions", f"expected shares of the training data in (0, 1] (data.fraction), got {bad[0]}"
        )
    return values


def training_overrides(overrides: Sequence[str]) -> List[str]:
    """The overrides that configure training (Hydra's own, e.g. hydra/launcher=slurm, are the sweep's)."""
    return [o for o in overrides if not o.startswith("hydra")]


def model_sweep_command(
    model: CurveModel,
    fractions: Sequence[float],
    common: Sequence[str],
    sweep_dir: Path,
    group: str,
    nproc: Optional[int],
) -> List[str]:
    """The `launch/sweep.py -m` line that trains one model at every fraction (Hydra expands data.fraction)."""
    cmd = [sys.executable, str(REPO_ROOT / "launch" / "sweep.py"), "-m"]
    if nproc is not None:
        cmd += ["--nproc-per-node", str(nproc)]
    added = [] if any(o.startswith("logger.group=") for o in common) else [f"logger.group={group}"]
    if not any(o.startswith("eval.before_training=") for o in common):
        added.append("eval.before_training=false")  # the base model is no point on the curve; ft-eval scores
    # The model's overrides last but one: they may set what the common ones set (e.g. train.lr per model).
    return cmd + [
        f"hydra.sweep.dir={sweep_dir}",
        *common,
        *model.overrides,
        *added,
        "data.fraction=" + ",".join(repr(f) for f in fractions),
    ]


def run_logged(cmd: List[str], log: Path) -> int:
    """Run one step of the curve (a model's sweep, a run's ft-eval), its output appended to `log`; its exit code."""
    with log.open("a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        return subprocess.run(cmd, cwd=REPO_ROOT, stdout=fh, stderr=subprocess.STDOUT).returncode


def evaluate_run(run_dir: Path, common: Sequence[str], log: Path) -> int:
    """`ft-eval checkpoint=<run>` on the run's own model, data and test split; writes <run>/curve-eval/eval.json."""
    passed = [o for o in common if o.startswith(EVAL_PASSTHROUGH)]
    cmd = [
        sys.executable,
        str(REPO_ROOT / "launch" / "eval.py"),
        f"checkpoint={run_dir}",
        f"output_dir={run_dir / EVAL_DIR}",
        "compare_base=false",  # the curve compares finetuned runs; the base model is no point on it
        *passed,
    ]
    return run_logged(cmd, log)


def members(sweep_dir: Path) -> List[Dict[str, Any]]:
    """The rows of one model's sweep summary (member.json + resolved config + metrics), in member order."""
    summary = sweep_dir / "summary.jsonl"
    if not summary.exists():
        return []
    return [json.loads(line) for line in summary.read_text().splitlines() if line.strip()]


def _json(path: Path) -> Dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def point(model: str, row: Dict[str, Any]) -> Dict[str, Any]:
    """One run as a curve point: what the run says it trained on (eval.json's data record) and ft-eval's scores."""
    run_dir = Path(row["run_dir"])
    trained = _json(run_dir / "eval.json")
    scored = _json(run_dir / EVAL_DIR / "eval.json").get("finetuned")
    config = row.get("config") or {}
    data = trained.get("data") or {}
    status = "failed" if row["status"] != "ok" else ("eval_failed" if scored is None else "ok")
    return {
        "model": model,
        "fraction": float((config.get("data") or {}).get("fraction", 1.0)),
        "examples": data.get("train"),
        "test_examples": data.get("test"),
        "test_digest": data.get("test_digest"),
        "train_digest": data.get("train_digest"),
        "parameters": (trained.get("parameters") or {}).get("total"),
        "scores": scored or {},
        "run_dir": str(run_dir),
        "status": status,
    }


def check_same_test_split(points: Sequence[Dict[str, Any]]) -> None:
    """Every evaluated run must have held out the same test examples, or the curve compares different exams."""
    digests = {p["test_digest"] for p in points if p["status"] == "ok"}
    if len(digests) > 1:
        raise ConfigError(
            "data",
            f"expected every run of the curve to share one test split, found {len(digests)} "
            "(key digests differ): keep data.test_size, data.split_seed and the data the same for every model",
        )
