"""The data pipeline: records -> template -> split -> tokenize -> cached Arrow dataset.

The prepared dataset is cached under `data.cache_dir/<key>`, the key hashing the source's content, the tokenizer
and every setting that changes the result. A preparation is written to a temporary directory and renamed into
place only when complete, so a failed or killed run never leaves a half-written cache. In a distributed run rank 0
prepares while the others wait at a barrier, then everyone memory-maps the same files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

from ft_dist import dist
from ft_dist.data.sources import content_fingerprint, read_records
from ft_dist.data.split import split_train_test
from ft_dist.data.templates import render_prompt
from ft_dist.data.tokenize import tokenize_batch
from ft_dist.errors import DataError, UserError

CACHE_VERSION = 1
_SETTINGS = ("prompt_field", "response_field", "context_field", "template", "max_seq_len", "overlong",
             "test_size", "split_seed", "limit", "hf_split", "hf_revision")


@dataclass
class PreparedData:
    """Tokenized train and test splits (with their raw text columns) and what preparation did."""

    train: Any
    test: Any
    stats: Dict[str, Any]
    cache_path: Path


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    state += f"|bos={tokenizer.bos_token_id}|eos={tokenizer.eos_token_id}"
    return hashlib.sha256(state.encode()).hexdigest()


def cache_key(data_cfg: Any, tokenizer: Any) -> str:
    settings = {k: getattr(data_cfg, k) for k in _SETTINGS}
    blob = json.dumps([CACHE_VERSION, content_fingerprint(data_cfg), tokenizer_fingerprint(tokenizer), settings], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _build(data_cfg: Any, tokenizer: Any, target: Path) -> None:
    from datasets import Dataset, DatasetDict, disable_progress_bars

    disable_progress_bars()
    records = []
    for rec in read_records(data_cfg):
        records.append(rec)
        if data_cfg.limit and len(records) >= data_cfg.limit:
            break
    ds = Dataset.from_list(records)
    ds = ds.map(lambda b: {"prompt_text": [render_prompt(data_cfg.template, p, c) for p, c in zip(b["prompt"], b["context"])]},
                batched=True)
    train, test = split_train_test(ds, data_cfg.test_size, data_cfg.split_seed)
    parts = {}
    for name, part in (("train", train), ("test", test)):
        part = part.map(tokenize_batch, batched=True, fn_kwargs=dict(
            tokenizer=tokenizer, max_seq_len=data_cfg.max_seq_len, overlong=data_cfg.overlong))
        parts[name] = part
    stats = {
        "records": len(ds),
        "train": sum(parts["train"]["keep"]),
        "test": sum(parts["test"]["keep"]),
        "truncated": sum(parts["train"]["truncated"]) + sum(parts["test"]["truncated"]),
        "dropped": (len(parts["train"]) - sum(parts["train"]["keep"])) + (len(parts["test"]) - sum(parts["test"]["keep"])),
    }
    parts = {k: v.filter(lambda b: b["keep"], batched=True) for k, v in parts.items()}
    if stats["train"] == 0:
        raise DataError("no training examples left after filtering (all empty or dropped as over-long)", data_cfg.path)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        DatasetDict(parts).save_to_disk(str(tmp / "data"))
        (tmp / "stats.json").write_text(json.dumps(stats))
        os.replace(tmp, target)  # atomic: the cache entry appears complete or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_dataset(data_cfg: Any, tokenizer: Any) -> PreparedData:
    """Load the prepared splits from cache, building them first (on rank 0) when absent."""
    from datasets import load_from_disk

    cache_root = Path(os.path.expanduser(data_cfg.cache_dir))
    cache_root.mkdir(parents=True, exist_ok=True)
    target = cache_root / cache_key(data_cfg, tokenizer)
    error = None
    with dist.main_first():
        if dist.is_main() and not target.exists():
            try:
                _build(data_cfg, tokenizer, target)
            except UserError as err:  # other ranks must not hang at the barrier: they learn of it below
                error = err
    if error is not None:
        raise error
    if not target.exists():
        raise DataError("data preparation failed on rank 0 (see its message)", data_cfg.path)
    parts = load_from_disk(str(target / "data"))
    stats = json.loads((target / "stats.json").read_text())
    return PreparedData(train=parts["train"], test=parts["test"], stats=stats, cache_path=target)
