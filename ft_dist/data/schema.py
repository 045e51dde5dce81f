"""Config schema of the `data` group (owned by the data pipeline; imported into ft_dist/config.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import MISSING

from ft_dist.errors import ConfigError


@dataclass
class DataConfig:
    """Where the instruction-response pairs come from and how they become token sequences."""

    name: str = MISSING
    path: str = MISSING
    """A JSONL/JSON/CSV/Parquet file, or `hf:<dataset id>` for a hub dataset."""
    hf_split: str = "train"
    hf_revision: Optional[str] = None
    prompt_field: str = "question"
    response_field: str = "answer"
    context_field: Optional[str] = None
    """Optional extra input appended to the prompt (Alpaca's `input`)."""
    template: str = "qa"
    """Prompt template name, see ft_dist/data/templates.py."""
    max_seq_len: int = 512
    overlong: str = "truncate"
    """truncate | drop: what to do with examples longer than max_seq_len."""
    test_size: float = 0.1
    """Share (0 < x < 1) or count (x >= 1) of examples held out for evaluation."""
    split_seed: int = 42
    limit: Optional[int] = None
    """Use only the first N examples (smoke runs)."""
    cache_dir: str = "~/.cache/ft-dist/data"


def validate_data(data: Any) -> None:
    """Value checks on `data.*` that types cannot express; raises ConfigError naming the key."""
    if data.overlong not in ("truncate", "drop"):
        raise ConfigError("data.overlong", f"expected one of truncate, drop, got {data.overlong!r}")
    if data.max_seq_len <= 0:
        raise ConfigError("data.max_seq_len", f"expected a value > 0, got {data.max_seq_len}")
    if not 0 < data.test_size and not (data.test_size >= 1 and float(data.test_size).is_integer()):
        raise ConfigError("data.test_size", f"expected a share in (0, 1) or a whole count >= 1, got {data.test_size}")
    if data.limit is not None and data.limit <= 0:
        raise ConfigError("data.limit", f"expected a positive count or null, got {data.limit}")
    path = data.path
    if not path.startswith("hf:") and not os.path.isfile(os.path.expanduser(path)):
        raise ConfigError("data.path", f"expected an existing data file or hf:<dataset id>, got {path!r} (no such file)")


def validate_data_run(cfg: Any) -> None:
    """Pre-flight checks of `ft-data` (conf/data.yaml)."""
    validate_data(cfg.data)
