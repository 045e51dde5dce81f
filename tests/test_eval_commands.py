"""ft-eval through its real entry points on a briefly finetuned demo run.

One short demo-config run (120 steps, a generation sample at each periodic eval) is the finetuned model; its base
is the same architecture at its seeded random init (step 0). 120 steps teach the tiny model the answer format and
vocabulary (cities, jobs, names), not yet the copying: on all 200 test examples it gets a few answers right, the
base none; hundreds of steps more cost minutes on busy cores. On them: the sample metrics logged during training, compare
(table, deltas, error counts, win rates), the error reports, multiple choice through lm-eval, the one-line config
errors, and `torchrun --nproc_per_node 2` giving exactly the single-process result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO, compose, run_cli

MC_FILE = REPO / "tests" / "data" / "mc_items.jsonl"
EVAL_STEPS = (40, 80)
DEMO = ["train.max_steps=120", "train.eval_every=40", "train.eval_batches=1", "train.log_every=40",
        "eval.during_training=8", "eval.before_training=false", "eval.max_examples=24", "eval.max_new_tokens=16"]
EVAL = ["eval.max_examples=0", "eval.max_new_tokens=16"]  # all 200 test examples; the longest answer is 14 chars
N_TEST = 200
SAMPLE_KEYS = ("sample_exact_match", "sample_normalized_match", "sample_token_f1", "sample_rouge_l")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("demo-run")
    proc = run_cli("train", [f"output_dir={out}", f"data.cache_dir={cache_dir}", *DEMO])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def compare_args(demo_run: Path, cache_dir: Path, out: Path) -> list:
    return ["mode=compare", f"checkpoints=[base,{demo_run}]", f"output_dir={out}", f"data.cache_dir={cache_dir}", *EVAL]


@pytest.fixture(scope="module")
def compared(demo_run, cache_dir, tmp_path_factory):
    """`ft-eval compare` (as mode=compare) on the base and the finetuned demo model: (output dir, process)."""
    out = tmp_path_factory.mktemp("compare")
    proc = run_cli("eval", compare_args(demo_run, cache_dir, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generation_sample_is_logged_at_each_eval_step(demo_run):
    evals = {m["step"]: m for m in read_jsonl(demo_run / "metrics.jsonl") if "eval_loss" in m}
    for step in EVAL_STEPS:
        assert all(0.0 <= evals[step][key] <= 1.0 for key in SAMPLE_KEYS), evals[step]
    # 8 sampled answers per eval: each score is a multiple of 1/8 (exact and normalised match are 0/1 per answer).
    assert all(evals[s]["sample_exact_match"] * 8 == int(evals[s]["sample_exact_match"] * 8) for s in EVAL_STEPS)


def test_compare_shows_the_finetuned_model_better(compared, demo_run):
    out, proc = compared
    table = json.loads((out / "compare.json").read_text())
    name = demo_run.name
    assert table["models"] == ["base", name]
    base, tuned = table["rows"]
    assert tuned["token_f1"] > base["token_f1"] or tuned["exact_match"] > base["exact_match"], (base, tuned)
    assert tuned["eval_loss"] < base["eval_loss"] and tuned["eval_loss Δ"] == pytest.approx(
        tuned["eval_loss"] - base["eval_loss"])
    assert tuned["token_f1 Δ"] == pytest.approx(tuned["token_f1"] - base["token_f1"]) and base["token_f1 Δ"] is None
    assert table["win_rates"][name]["win_rate"] > 0.5 > table["win_rates"]["base"]["win_rate"]
    assert table["elo"][name] > table["elo"]["base"]
    assert "| model | eval_loss | eval_loss Δ |" in proc.stdout and f"| {name} | {tuned['eval_loss']:.4f} |" in proc.stdout
    assert "Pairwise preferences" in proc.stdout and (out / "compare.md").read_text() in proc.stdout


def test_error_reports_count_what_the_jsonl_lists(compared, demo_run):
    out, proc = compared
    summary = json.loads((out / "eval.json").read_text())
    rows = {row["model"]: row for row in json.loads((out / "compare.json").read_text())["rows"]}
    for model in ("base", demo_run.name):
        tagged = read_jsonl(out / f"errors-{model}.jsonl")
        counts = Counter(tag["category"] for example in tagged for tag in example["tags"])
        assert {c: counts.get(c, 0) for c in summary[model]["errors"]} == summary[model]["errors"]
        assert all(rows[model][c] == n for c, n in summary[model]["errors"].items())  # the table shows the same
        markdown = (out / f"errors-{model}.md").read_text()
        assert markdown.startswith(f"# Error analysis ({N_TEST} answers") and "| category | count | share |" in markdown
        assert len(read_jsonl(out / f"samples-{model}.jsonl")) == N_TEST
        assert str(out / f"errors-{model}.md") in proc.stdout  # the file written, not a placeholder
    # The random-init base babbles to max_new_tokens; the finetuned model stops at EOS after a short answer.
    assert summary["base"]["errors"]["truncated"] > 0 == summary[demo_run.name]["errors"]["truncated"]
    assert sum(summary["base"]["errors"].values()) > sum(summary[demo_run.name]["errors"].values())
    assert "error categories (base -> " in proc.stdout


def test_model_names_and_one_line_config_errors(demo_run, cache_dir):
    from ft_dist.commands.eval import models_to_evaluate

    cfg = compose(["mode=compare", f"checkpoints=[base,{demo_run},{demo_run / 'final'}]"], name="eval")
    final = str(demo_run / "final")
    assert models_to_evaluate(cfg) == [("base", None), (demo_run.name, final), (f"{demo_run.name}-2", final)]
    cfg = compose([f"checkpoint={demo_run}", "compare_base=false"], name="eval")
    assert models_to_evaluate(cfg) == [("finetuned", final)]
    for args, key in ((["mode=bogus"], "mode"), (["mode=compare", "checkpoints=[base]"], "checkpoints")):
        proc = run_cli("eval", [*args, f"data.cache_dir={cache_dir}"], timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith(f"error: config error: {key}: ")


def test_multiple_choice_through_the_command_reports_the_harness_numbers(demo_run, cache_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ft_dist.eval.multiple_choice import load_items, score_multiple_choice

    # arc_easy's data is on the hub, out of reach here: the command warns and scores the local file instead.
    env = {"HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = run_cli("eval", ["mode=mc", f"checkpoint={demo_run}", "compare_base=false", f"mc_file={MC_FILE}",
                            "mc_tasks=[arc_easy]", f"output_dir={tmp_path / 'mc'}", f"data.cache_dir={cache_dir}"],
                   env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: lm-eval task data not reachable" in proc.stdout
    reported = json.loads((tmp_path / "mc" / "eval.json").read_text())["finetuned"]["mc"]["mc_items"]
    harness = json.loads((tmp_path / "mc" / "mc-finetuned.json").read_text())["mc_items"]
    assert reported["n"] == 5 and "| finetuned | mc_items |" in proc.stdout
    for metric in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert reported[metric] == harness[f"{metric},none"]  # the harness's own numbers, as it computed them
    # The native scorer on the same saved model and items picks the same answers.
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(demo_run / "final")
    native = score_multiple_choice(model, AutoTokenizer.from_pretrained(demo_run / "final"), load_items(MC_FILE))
    assert (native["metrics"]["acc"], native["metrics"]["acc_norm"]) == (reported["acc"], reported["acc_norm"])


def test_torchrun_two_ranks_give_the_single_process_result(compared, demo_run, cache_dir, tmp_path):
    single, _ = compared
    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "launch" / "eval.py"), *compare_args(demo_run, cache_dir, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FT_DIST_NO_PROGRESS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((d / "eval.json").read_text()) for d in (single, out))
    for model in ("base", demo_run.name):
        for key in ("exact_match", "normalized_match", "token_f1", "rouge_l", "examples", "errors"):
            assert two[model][key] == one[model][key], (model, key)
        # Loss sums are reduced in another order across ranks: equal up to float rounding.
        assert two[model]["eval_loss"] == pytest.approx(one[model]["eval_loss"], rel=1e-6)
        samples = f"samples-{model}.jsonl"
        assert (out / samples).read_text() == (single / samples).read_text()  # every answer, in order
    assert proc.stdout.count("| model |") == 2  # rank 0 alone printed the table (and the preferences)
