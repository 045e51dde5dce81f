"""Config composition and validation: every group option composes; user mistakes fail fast with one line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from omegaconf import open_dict
from omegaconf.errors import ValidationError

from conftest import REPO, compose, run_cli
from ft_dist.config import validate
from ft_dist.errors import ConfigError


@pytest.mark.parametrize("group", ["model", "data", "train", "strategy", "peft", "logger", "eval"])
def test_every_group_option_composes(group):
    for option in sorted((REPO / "conf" / group).glob("*.yaml")):
        overrides = [f"{group}={option.stem}"]
        if group == "data" and "???" in option.read_text():
            overrides.append(f"data.path={REPO / 'ft_dist/assets/demo_extraction.jsonl'}")
        cfg = compose(overrides)
        assert cfg[group] is not None


def test_defaults_are_the_embedded_demo():
    cfg = compose()
    assert cfg.model.name == "tiny" and cfg.model.tokenizer == "embedded:char"
    assert Path(cfg.data.path).is_file() and cfg.data.path.startswith(str(REPO))
    assert cfg.train.micro_batch_size > 0 and cfg.strategy.name == "single"


def test_override_reaches_the_typed_node():
    cfg = compose(["train.lr=1e-4", "train.micro_batch_size=4", "peft=lora", "peft.r=8"])
    assert cfg.train.lr == 1e-4 and cfg.train.micro_batch_size == 4 and cfg.peft.method == "lora" and cfg.peft.r == 8


def test_wrong_type_is_rejected_at_composition():
    with pytest.raises(Exception) as info:
        compose(["train.lr=fast"])
    assert isinstance(info.value.__cause__ or info.value, ValidationError)


@pytest.mark.parametrize("override,key", [
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("train.optimizer=adam", "train.optimizer"),
    ("data.overlong=wrap", "data.overlong"),
    ("train.max_steps=0", "train.max_steps"),
    ("peft.dropout=1.5", "peft.dropout"),
    ("data.path=/no/such/file.jsonl", "data.path"),
    ("strategy.offload_optimizer=nvme", "strategy.offload_optimizer"),
    ("train.hang_timeout_s=5", "train.hang_timeout_s"),  # under 3 heartbeats: a healthy rank would look stuck
])
def test_impossible_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        compose([override])
    assert info.value.key == key


@pytest.mark.parametrize("arg,key", [
    ("modle=tiny", "modle"),
    ("train.lr=fast", "train.lr"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("model=nope", "model"),
])
def test_cli_mistakes_exit_fast_with_one_line(arg, key):
    start = time.time()
    proc = run_cli("train", [arg], timeout=30)
    elapsed = time.time() - start
    assert proc.returncode != 0
    assert elapsed < 10
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert key in lines[0] and "Traceback" not in proc.stderr
    assert proc.stdout.strip() == ""


def test_misspelt_key_suggests_the_right_one():
    proc = run_cli("train", ["train.lerning_rate=1"], timeout=30)
    assert proc.returncode == 2
    assert "train.lerning_rate" in proc.stderr


def test_validate_rejects_missing_arch_type():
    cfg = compose()
    with open_dict(cfg):
        cfg.model.arch.pop("model_type")
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert info.value.key == "model.arch.model_type"
