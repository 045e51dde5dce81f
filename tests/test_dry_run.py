"""The dry run: the real job's config and strategy code on a fake process group, under fake tensors.

Faithful: on a model small enough to hold, the same dry run on real tensors allocates exactly what the fake one
reports, category by category (FSDP2 and ZeRO-3). At scale (7B on 8 ranks here; 13B and 70B in bench/scale.py):
the model states per rank are what the sharding implies and what the planner predicts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import pytest

from conftest import compose, run_cli
from ft_dist.errors import ConfigError

pytestmark = pytest.mark.slow

SMALL = ["model=llama-2-7b", "model.arch.num_hidden_layers=2", "model.arch.hidden_size=512",
         "model.arch.intermediate_size=1408", "model.arch.num_attention_heads=8", "model.arch.num_key_value_heads=8",
         "train.precision=bf16", "train.micro_batch_size=1", "data.max_seq_len=256", "dry_run.world_size=4"]


def dry_run(tmp: Path, *args: str) -> dict:
    proc = run_cli("train", [*args, f"output_dir={tmp}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fake process group" in proc.stdout
    return json.loads((tmp / "dry_run.json").read_text())


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_fake_tensors_report_what_real_tensors_allocate(strategy, tmp_path):
    fake = dry_run(tmp_path / "fake", *SMALL, f"strategy={strategy}")
    real = dry_run(tmp_path / "real", *SMALL, f"strategy={strategy}", "dry_run.fake_tensors=false")
    assert fake["fake_tensors"] and not real["fake_tensors"]
    for part in ("train_peak", "save_peak", "model_states"):
        assert fake[part] == real[part], part  # to the byte
    # Fake tensors free an optimizer's temporaries later: the optimizer step's figure is an upper bound.
    assert fake["optimizer_step_peak"]["Total"] >= real["optimizer_step_peak"]["Total"]
    assert fake["collectives"] == real["collectives"] or strategy == "zero3"  # ZeRO-3 broadcasts real init values
    assert fake["train_peak"]["Total"] > 0 and fake["collectives"]["all_gather"]["count"] > 0


def test_7b_on_8_ranks_matches_the_sharding_and_the_planner(tmp_path):
    r = dry_run(tmp_path, "model=llama-2-7b", "strategy=fsdp", "dry_run.world_size=8", "train.precision=bf16",
                "train.micro_batch_size=1", "data.max_seq_len=1024")
    p, n = r["parameters"], 8
    assert p == 6_738_415_616
    states = r["model_states"]
    # FSDP2 with fp32 master weights: 4 B of parameter, 4 B of gradient and 8 B of Adam per parameter, over 8 ranks
    # (FSDP pads each tensor's rows to a multiple of 8: within 0.1 %).
    assert states["params"] == pytest.approx(4 * p / n, rel=1e-3)
    assert states["grads"] == pytest.approx(4 * p / n, rel=1e-3)
    assert states["optimizer"] == pytest.approx(8 * p / n, rel=1e-3)
    assert abs(r["planner"]["model_states_vs_measured"]) < 0.10
    # One all-gather per unit in forward and again in backward, one reduce-scatter per unit; all in bf16/fp32 halves.
    ag, rs = r["collectives"]["all_gather"], r["collectives"]["reduce_scatter"]
    assert ag["full_bytes"] == pytest.approx(2 * 2 * p, rel=0.02) and rs["full_bytes"] == pytest.approx(4 * p, rel=0.02)
    assert r["save_peak"]["checkpoint_bytes"] == pytest.approx(12 * p / n, rel=1e-3)  # this rank's shards only


@pytest.mark.parametrize("overrides,key", [
    (["dry_run.world_size=8"], "strategy"),                                   # strategy=single: nothing to shard
    (["dry_run.world_size=8", "strategy=zero3_offload"], "strategy"),
    (["dry_run.world_size=8", "strategy=fsdp", "dry_run.gpus_per_node=3"], "dry_run.gpus_per_node"),
    (["dry_run.world_size=1", "strategy=fsdp"], "dry_run.world_size"),
])
def test_a_job_the_dry_run_cannot_simulate_is_refused_naming_the_key(overrides: List[str], key: str):
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    assert info.value.key == key
