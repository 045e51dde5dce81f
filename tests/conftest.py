"""Shared test helpers: compose real configs from conf/, and run the real entry points in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

import pytest

REPO = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("FT_DIST_ASSETS", REPO.parent / "shared" / "assets"))
NEOX_TOKENIZER = ASSETS / "tokenizers" / "gpt-neox-20b"
LAMINI = ASSETS / "datasets" / "lamini_docs.jsonl"

# A GPT-NeoX (Pythia) architecture small enough for CPU tests; the tokenizer is the real one.
TINY_NEOX = [
    "model=pythia-70m", "model.from_config=true", f"model.tokenizer={NEOX_TOKENIZER}",
    "model.arch.hidden_size=64", "model.arch.num_hidden_layers=2", "model.arch.num_attention_heads=4",
    "model.arch.intermediate_size=256",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny from-config Llama saved as a pretrained dir, so every strategy and process loads identical weights."""
    from dist_utils import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def compose(overrides: Sequence[str] = (), name: str = "train"):
    """The config an entry point would run with these overrides (validated the same way)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import ft_dist.commands.startup as cli
    from ft_dist.config import validate

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(cli.CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=name, overrides=list(overrides))
    validate(cfg)
    return cfg


def compose_plan(overrides: Sequence[str] = ()):
    """The config ft-plan would run with these overrides (validated the same way)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import ft_dist.commands.startup as cli
    from ft_dist.commands.schema import validate_plan

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(cli.CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="plan", overrides=list(overrides))
    validate_plan(cfg)
    return cfg


def run_cli(script: str, args: List[str], timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run launch/<script>.py in a fresh interpreter, as a user would."""
    full_env = {**os.environ, "FT_DIST_NO_PROGRESS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "launch" / f"{script}.py"), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
