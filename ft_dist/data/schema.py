"""Config schema of the `data` group and of `ft-data` (owned by the data pipeline; imported into ft_dist/config.py).

Nothing here imports torch or datasets: these checks run in the CLI's pre-flight, before any heavy import.
"""

import glob
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING

from ft_dist.errors import ConfigError
from ft_dist.settings import check_fields, setting

TEMPLATE_NAMES = ("qa", "alpaca", "chatml", "plain", "tokenizer")
HF_PREFIX = "hf:"


@dataclass
class SourceConfig:
    """One entry of `data.sources`: a file, folder, glob or `hf:<id>`, with a mixing weight.

    Field names left null inherit the top-level `data.*` value, so a mix of same-schema files only lists paths.
    """

    path: str = MISSING
    """A JSONL/JSON/CSV/Parquet file, a folder (its files of those types), a glob, or `hf:<dataset id>`."""
    weight: float = 1.0
    """How often each training example of this source is used: 0.5 = a seeded half, 2 = twice. The test split is
    never reweighted (one row per held-out example)."""
    name: Optional[str] = None
    """Label in reports; default: the path."""
    hf_split: Optional[str] = None
    hf_revision: Optional[str] = None
    prompt_field: Optional[str] = None
    response_field: Optional[str] = None
    context_field: Optional[str] = None
    messages_field: Optional[str] = None


@dataclass
class DataConfig:
    """Where the instruction-response pairs come from and how they become token sequences."""

    name: str = setting(MISSING, identity=False)
    """A label for run names and reports."""
    path: Optional[str] = MISSING
    """A JSONL/JSON/CSV/Parquet file, a folder, a glob, or `hf:<dataset id>`. Null when `sources` is set."""
    sources: List[SourceConfig] = field(default_factory=list)
    """Several sources mixed with weights; when set, `path` must be null."""
    hf_split: str = "train"
    """Split of an `hf:` dataset."""
    hf_revision: Optional[str] = None
    """Git revision (branch, tag, commit) of an `hf:` dataset; pin it for reproducible runs."""
    prompt_field: str = "question"
    response_field: str = "answer"
    context_field: Optional[str] = None
    """Optional extra input appended to the prompt (Alpaca's `input`)."""
    messages_field: Optional[str] = None
    """Chat data: the field holding a list of {role, content} turns (also ShareGPT {from, value}). When set, the
    prompt/response fields are not used; templates `chatml` or `tokenizer` render the turns."""
    system_prompt: Optional[str] = None
    """Chat templates: a system message put first when an example has none."""
    template: str = setting("qa", choices=TEMPLATE_NAMES)
    """qa | alpaca | chatml | plain (named, see ft_dist/data/templates.py) | tokenizer (the tokenizer's own chat
    template, via apply_chat_template)."""
    train_on_prompt: bool = False
    """Also put the loss on prompt tokens (on every turn for chat data). Off: responses / assistant turns only."""
    max_seq_len: int = 512
    """Longest example in tokens (also the packed row length)."""
    truncation_side: str = setting("right", choices=("right", "left"))
    """right | left: which end of an over-long example is cut (left keeps the response, cuts the prompt's start)."""
    overlong: str = setting("truncate", choices=("truncate", "drop"))
    """truncate | drop: what to do with examples longer than max_seq_len."""
    packing: bool = False
    """Pack several training examples per row of max_seq_len (best-fit decreasing), positions restarting per
    example so attention never crosses examples. The test split is never packed."""
    pack_window: int = 2000
    """Examples packed together at a time: bounds memory on huge sets at the cost of a partial last row per window."""
    dedup: bool = True
    """Remove exact duplicates (after lower-casing and collapsing whitespace) before the split."""
    drop_empty: bool = True
    """Drop examples whose prompt or response is blank (counted as `empty`)."""
    on_error: str = setting("raise", choices=("raise", "skip"))
    """raise | skip: on a malformed line or a record missing a field, stop naming file:line, or skip and count it."""
    test_size: float = 0.1
    """Share (0 < x < 1) or count (x >= 1) of examples held out for evaluation."""
    split_seed: int = 42
    fraction: float = 1.0
    """Share (0 < x <= 1) of the training examples kept, taken after the test split is held out, so every fraction
    is scored on the same test split. Nested: one permutation seeded by `split_seed` orders the training examples
    and the first round(x * n) are kept, so a smaller fraction is a subset of every larger one (learning curves,
    `ft-sweep curve`)."""
    limit: Optional[int] = None
    """Use only the first N records (smoke runs)."""
    num_proc: int = setting(1, identity=False)
    """Processes for tokenization (datasets.map num_proc)."""
    cache_dir: str = setting("~/.cache/ft-dist/data", identity=False)
    cache_scope: str = setting("global", choices=("global", "node"), identity=False)
    """global: rank 0 prepares into a cache every node sees | node: each node's local rank 0 prepares into a
    node-local cache_dir."""


def _check_path(path: str, key: str) -> None:
    if path.startswith(HF_PREFIX):
        if len(path) == len(HF_PREFIX):
            raise ConfigError(key, "expected hf:<dataset id>, got an empty id")
        return
    p = os.path.expanduser(path)
    if os.path.isfile(p) or os.path.isdir(p):
        return
    if glob.has_magic(p):
        if not glob.glob(p, recursive=True):
            raise ConfigError(key, f"expected the glob {path!r} to match files, it matches none")
        return
    raise ConfigError(
        key, f"expected an existing data file, folder, glob or hf:<dataset id>, got {path!r} (no such file)"
    )


def validate_data(data: Any) -> None:
    """Value checks on `data.*` that types cannot express; raises ConfigError naming the key."""
    check_fields(DataConfig, data, "data.")
    if data.max_seq_len <= 1:
        raise ConfigError("data.max_seq_len", f"expected a value > 1, got {data.max_seq_len}")
    if not (0 < data.test_size < 1 or (data.test_size >= 1 and float(data.test_size).is_integer())):
        raise ConfigError("data.test_size", f"expected a share in (0, 1) or a whole count >= 1, got {data.test_size}")
    if not 0 < data.fraction <= 1:
        raise ConfigError("data.fraction", f"expected a share in (0, 1] of the training examples, got {data.fraction}")
    if data.limit is not None and data.limit <= 0:
        raise ConfigError("data.limit", f"expected a positive count or null, got {data.limit}")
    for key in ("num_proc", "pack_window"):
        if getattr(data, key) < 1:
            raise ConfigError(f"data.{key}", f"expected a value >= 1, got {getattr(data, key)}")
    if data.messages_field and data.template not in ("chatml", "tokenizer"):
        raise ConfigError(
            "data.template", f"expected chatml or tokenizer for chat data (data.messages_field), got {data.template!r}"
        )
    if data.sources:
        if data.path is not None:
            raise ConfigError("data.path", "expected null when data.sources is set (set one or the other)")
        for i, src in enumerate(data.sources):
            if not src.weight > 0:
                raise ConfigError(f"data.sources[{i}].weight", f"expected a weight > 0, got {src.weight}")
            _check_path(src.path, f"data.sources[{i}].path")
    else:
        if data.path is None:
            raise ConfigError("data.path", "expected a data file, folder, glob or hf:<dataset id> (or data.sources)")
        _check_path(data.path, "data.path")
