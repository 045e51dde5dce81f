"""Config composition and validation: every group option composes; user mistakes fail fast with one line."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
from omegaconf import open_dict
from omegaconf.errors import ValidationError

from conftest import REPO, compose, run_cli
from ft_dist.config import validate
from ft_dist.errors import ConfigError
from ft_dist.settings import check_fields, setting


@pytest.mark.parametrize("group", ["model", "data", "train", "strategy", "peft", "logger", "eval"])
def test_every_group_option_composes(group):
    for option in sorted((REPO / "conf" / group).glob("*.yaml")):
        overrides = [f"{group}={option.stem}"]
        if group == "data" and "???" in option.read_text():
            overrides.append(f"data.path={REPO / 'ft_dist/assets/demo_extraction.jsonl'}")
        if option.stem == "qlora":  # it quantizes pretrained weights: not the tiny default built from config
            overrides.append("model=pythia-70m")
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


@pytest.mark.parametrize("overrides,key,alternative", [
    (["train.optimizer=adamw_8bit", "strategy=fsdp"], "train.optimizer", "use train.optimizer=adamw"),
    (["train.optimizer=paged_adamw", "strategy=zero3_offload"], "train.optimizer", "strategy=ddp or single"),
    (["train.loss=chunked", "+model.arch.n_embd=32", "model.arch.model_type=gpt2"], "train.loss", "train.loss=auto"),
    (["peft=qlora"], "peft.method", "peft=lora"),  # the tiny default is built from config: nothing to quantize
    (["peft=qlora", "model=pythia-70m", "strategy=zero3_offload"], "strategy", "strategy=zero3"),
    (["peft=qlora", "model=pythia-70m", "strategy=fsdp", "strategy.cpu_offload=true"], "strategy.cpu_offload",
     "cpu_offload=false"),
])
def test_unsupported_memory_saver_combinations_name_the_key_and_the_alternative(overrides, key, alternative):
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    assert info.value.key == key and alternative in str(info.value) and "\n" not in str(info.value)


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


def test_cache_key_and_resume_fingerprint_follow_the_field_declarations():
    """One rule over the schema's fields decides what identifies a run; a new field enters both unless it says it
    does not (it used to take an allowlist of data fields, where a new field silently stayed out of the key)."""
    from ft_dist.checkpoint import config_fingerprint
    from ft_dist.data.schema import DataConfig
    from ft_dist.settings import identity

    cfg = compose()
    base = config_fingerprint(cfg)
    # Cadence and where things run do not identify a run; what it computes does.
    assert config_fingerprint(compose(["train.log_every=3", "data.num_proc=2", "train.hang_timeout_s=60"])) == base
    assert config_fingerprint(compose(["train.lr=1e-4"])) != base
    assert config_fingerprint(compose(["data.max_seq_len=64"])) != base

    @dataclasses.dataclass
    class Extended(DataConfig):
        new_knob: int = 7
        new_label: str = setting("x", identity=False)

    keys = identity(Extended, {f.name: 0 for f in dataclasses.fields(Extended)})
    assert "new_knob" in keys and "new_label" not in keys and "max_seq_len" in keys and "cache_dir" not in keys


@dataclasses.dataclass
class _Inner:
    mode: str = setting("a", choices=("a", "b"))
    size: int = setting(1, positive=True)


@dataclasses.dataclass
class _Outer:
    inner: _Inner = dataclasses.field(default_factory=_Inner)


def test_declared_choices_and_ranges_are_checked_under_their_dotted_key():
    check_fields(_Outer, _Outer())
    for bad, key in ((_Inner(mode="c"), "inner.mode"), (_Inner(size=0), "inner.size")):
        with pytest.raises(ConfigError) as info:
            check_fields(_Outer, _Outer(inner=bad))
        assert info.value.key == key
