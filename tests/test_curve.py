"""Learning curves (`ft-sweep curve`): data.fraction as nested subsets of one training split, scored on one test
split, and the curve itself from real ft-train runs (through the sweep launcher), real ft-eval and real W&B offline
files. The full demo-size curve (minutes) is measured by the command in docs/evaluation.md, not here."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from conftest import compose, run_cli
from test_wandb import offline_env, offline_runs, records

CI_RUN = ["data.limit=400", "data.test_size=40", "train.max_steps=3", "train.log_every=1", "eval.max_examples=8",
          "eval.max_new_tokens=8"]
MODELS = ["--model", "tiny", "--model", "tiny-4l: model.arch.num_hidden_layers=4"]


@pytest.mark.parametrize("args, key, expected", [
    (["--fractions", "0.1,1.5", "--model", "tiny"], "--fractions", "in (0, 1]"),
    (["--fractions", "0,1", "--model", "tiny"], "--fractions", "in (0, 1]"),
    (["--fractions", "a,b", "--model", "tiny"], "--fractions", "comma-separated numbers"),
    (["--fractions", "0.5"], "--model", "at least one model"),
    (["--model", "tiny2"], "--model", "expected a model option (llama-2-13b"),
    (["--model", "tiny", "--model", "tiny"], "--model", "distinct labels"),
    (["--model", "big: model.arch.num_hiden_layers=4"], "model.arch.num_hiden_layers",
     "did you mean 'model.arch.num_hidden_layers'"),
])
def test_bad_curve_input_fails_in_one_line_before_any_run(tmp_path, args, key, expected):
    proc = run_cli("sweep", ["curve", "--dir", str(tmp_path / "c"), *args], timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert f"{key}: " in lines[0] and expected in lines[0], lines[0]
    assert not (tmp_path / "c").exists()  # nothing started


def test_data_fraction_is_validated_and_part_of_the_run_identity():
    from ft_dist.checkpoint import config_fingerprint

    for bad in ("0", "1.01", "-0.5"):
        proc = run_cli("train", [f"data.fraction={bad}"], timeout=60)
        assert proc.returncode == 2 and proc.stderr.strip().startswith(
            "error: config error: data.fraction: expected a share in (0, 1]"), proc.stderr
    # A checkpoint trained on another fraction is another run: resume compares the fingerprint.
    assert config_fingerprint(compose(["data.fraction=0.5"]))["data.fraction"] == 0.5
    assert config_fingerprint(compose([]))["data.fraction"] == 1.0


def test_nested_subset_is_deterministic_and_nested():
    from ft_dist.data.split import nested_subset

    small, mid, full = (set(nested_subset(1000, f, seed=42).tolist()) for f in (0.1, 0.3, 1.0))
    assert (len(small), len(mid), len(full)) == (100, 300, 1000)
    assert small < mid < full
    assert nested_subset(1000, 0.3, seed=42).tolist() == sorted(mid)  # same seed, same subset
    assert set(nested_subset(1000, 0.3, seed=7).tolist()) != mid
    assert len(nested_subset(5, 0.01, seed=0)) == 1  # never an empty training set


def _points(values, params=(1000, 4000)):
    from ft_dist.eval.curve import CurvePoint

    return [CurvePoint(model, f, n, m, 2.0 - m, p, f"runs/{model}-{f}")
            for (model, p), series in zip((("small", params[0]), ("large", params[1])), values)
            for f, n, m in series]


def test_fit_and_reading_say_what_the_points_support():
    from ft_dist.eval.curve import fit_trend, reading

    trend = fit_trend([100, 200, 400, 800], [0.1, 0.2, 0.3, 0.4])
    assert trend.per_doubling == pytest.approx(0.1) and trend.r2 == pytest.approx(1.0)
    assert fit_trend([100, 100], [0.1, 0.3]) is None  # one size: no trend
    rising = _points([[(0.25, 100, 0.1), (0.5, 200, 0.2), (1.0, 400, 0.3)],
                      [(0.25, 100, 0.2), (0.5, 200, 0.35), (1.0, 400, 0.5)]])
    text = reading(rising, "exact_match")
    assert "doubling the data adds ~0.100 exact_match" in text[0]
    assert "the larger model, large (4,000 parameters), is ahead of small (1,000) by 0.200 exact_match" in text[2]
    noisy = _points([[(0.25, 100, 0.3), (0.5, 200, 0.1), (1.0, 400, 0.32)], [(1.0, 400, 0.2)]])
    text = reading(noisy, "exact_match")
    assert "no clear trend" in text[0] and "too few evaluated sizes (1)" in text[1]
    assert "the larger model, large (4,000 parameters), is behind small (1,000) by 0.120 exact_match" in text[2]


def test_figure_has_axis_labels_legend_and_log_x():
    from ft_dist.eval.curve import curve_figure

    fig = curve_figure(_points([[(0.5, 200, 0.2), (1.0, 400, 0.3)], [(0.5, 200, 0.3), (1.0, 400, 0.5)]]),
                       "exact_match", "t")
    metric_ax, loss_ax = fig.axes
    assert metric_ax.get_xscale() == "log" and loss_ax.get_xscale() == "log"
    assert metric_ax.get_xlabel() == "training examples (log scale)" and metric_ax.get_ylabel() == "exact_match"
    assert loss_ax.get_ylabel() == "eval loss (test split)"
    assert [t.get_text() for t in metric_ax.get_xticklabels()] == ["200", "400"]  # the measured sizes, plain
    legend = [t.get_text() for t in metric_ax.get_legend().get_texts()]
    assert {"small", "large"} <= set(legend) and any("per doubling" in t for t in legend)
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["small", "large"]


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.mark.slow
def test_curve_runs_trains_evaluates_and_groups_in_wandb(cache_dir, tmp_path):
    from datasets import load_from_disk

    from ft_dist.data.split import example_key

    out = tmp_path / "curve"
    proc = run_cli("sweep", ["curve", "--fractions", "0.1,0.3,1.0", *MODELS, "--dir", str(out), "--",
                             *CI_RUN, "logger=wandb", f"data.cache_dir={cache_dir}"],
                   env=offline_env(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    curve = json.loads((out / "curve.json").read_text())
    points = curve["points"]
    assert [(p["model"], p["fraction"], p["status"]) for p in points] == [
        (m, f, "ok") for m in ("tiny", "tiny-4l") for f in (0.1, 0.3, 1.0)]
    # 400 records, 40 held out: 360 training examples, of which each fraction keeps round(f * 360).
    assert [p["examples"] for p in points] == [36, 108, 360] * 2
    assert points[3]["parameters"] > points[0]["parameters"]
    assert set(curve["trends"]) == {"tiny", "tiny-4l"} and len(curve["reading"]) == 3
    for p in points:  # the metric is ft-eval's, written by ft-eval in the run dir
        scored = json.loads((out / p["model"] / p["run_dir"].rsplit("/", 1)[1] / "curve-eval" / "eval.json")
                            .read_text())["finetuned"]
        assert p["metric"] == scored["exact_match"] and p["eval_loss"] == scored["eval_loss"]
    # The prepared data behind each run: one test split for all, nested training subsets (by example keys).
    test_keys, train_keys, caches = set(), [], set()
    for p in points[:3]:
        record = json.loads((out / "tiny" / p["run_dir"].rsplit("/", 1)[1] / "eval.json").read_text())["data"]
        parts = load_from_disk(str(cache_dir / record["cache"] / "data"))
        keys = [{example_key(r["prompt"], r["context"], r["response"], []) for r in part} for part in
                (parts["train"], parts["test"])]
        test_keys.add(frozenset(keys[1]))
        caches.add(record["cache"])  # the fraction is part of the prepared-data cache key
        train_keys.append(keys[0])
        assert len(parts["train"]) == record["train"] == p["examples"]
    assert len(test_keys) == 1 and len(next(iter(test_keys))) == 40 and len(caches) == 3
    assert train_keys[0] < train_keys[1] < train_keys[2]
    assert len({p_["run_dir"] for p_ in points}) == 6
    log = (out / "tiny" / "0" / "member.node0.log").read_text()
    assert "data.fraction=0.1: 36 of 360 training examples kept" in log
    # Outputs: the table and reading, and a PNG of a readable size.
    md = (out / "curve.md").read_text()
    assert "| tiny-4l | 0.3000 | 108 |" in md and "## Reading" in md
    width, height = _png_size(out / "curve.png")
    assert width >= 1000 and height >= 400 and (out / "curve.png").stat().st_size > 20_000
    # W&B: six runs, one per member, all in the curve's group.
    runs = offline_runs(out)
    assert len(runs) == 6, runs
    groups = {next(r["run"] for r in records(f) if r["type"] == "run").get("run_group") for f in runs}
    assert groups == {out.name}
    assert np.isfinite([p["eval_loss"] for p in points]).all()
