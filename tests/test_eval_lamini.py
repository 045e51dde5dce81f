"""bench/eval_lamini.py, the timed full evaluation on lamini_docs, run as a user runs it on a few examples."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from conftest import ASSETS, REPO


def test_lamini_bench_runs_the_full_evaluation(tmp_path, cache_dir):
    out = tmp_path / "bench"
    env = {**os.environ, "FT_DIST_ASSETS": str(ASSETS), "FT_DIST_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "eval_lamini.py"), "--examples", "8", "--arch", "tiny",
                           "--max-new-tokens", "16", "--cache-dir", str(cache_dir), "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    timing = re.search(r"lamini full evaluation: 8 examples, tiny from config, max_new_tokens 16: ([\d.]+) s", proc.stdout)
    assert timing and 0 < float(timing.group(1)) < 600, proc.stdout
    result = json.loads((out / "eval" / "eval.json").read_text())["base"]
    # Every part of the full evaluation ran: loss, generation metrics, error analysis, multiple choice.
    assert result["examples"] == 8 and result["eval_perplexity"] > 1.0
    assert set(result["seconds"]) >= {"loss", "generate", "errors", "mc"}
    assert sum(result["errors"].values()) > 0 and result["mc"]["mc_items"]["n"] == 5
    assert (out / "eval" / "errors-base.md").read_text().startswith("# Error analysis (8 answers")
    assert f"errors {result['errors']}" in proc.stdout
