"""The data pipeline: sources -> records -> filter, dedup -> split -> mix -> tokenize -> pack -> cached Arrow dataset.

Every stage streams through Arrow files (`Dataset.from_generator`, then `map`/`select`), so memory does not grow
with the dataset; per-example bookkeeping (hashes, lengths, source ids) lives in numpy arrays of a few bytes per
example. The prepared dataset is cached under `data.cache_dir/<key>`, the key hashing the sources' content, the
tokenizer and every setting that changes the result. A preparation is built in a temporary directory and renamed
into place only when complete, so a failed or killed run never leaves anything in the cache, and two jobs racing
on one key both end with the same complete entry. In a distributed run rank 0 (or, with cache_scope=node, each
node's local rank 0) prepares while the others wait at a barrier, then every rank memory-maps the same files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator

import numpy as np

from ft_dist import dist
from ft_dist.atomic_io import temp_dir
from ft_dist.data.mix import weighted_indices
from ft_dist.data.pack import pack_batch, packing_efficiency
from ft_dist.data.schema import DataConfig
from ft_dist.data.sources import (
    EMPTY,
    OK,
    SKIPPED,
    configured_sources,
    content_fingerprint,
    iter_records,
    record_features,
)
from ft_dist.data.split import add_keys, first_occurrences, keys_digest, nested_subset, overlap, split_train_test
from ft_dist.data.templates import chat_template_for
from ft_dist.data.tokenize import EncodeSettings, encode_batch
from ft_dist.errors import DataError, UserError
from ft_dist.settings import identity

CACHE_VERSION = 3  # 3: stats.json has the splits' key digests
_INTERNAL = ("messages", "status", "error", "key", "keep")
HISTOGRAM_BINS = 20


@dataclass
class PreparedData:
    """Tokenized train and test splits (with their raw text columns) and what preparation did."""

    train: Any
    test: Any
    stats: Dict[str, Any]
    cache_path: Path

    def summary(self) -> str:
        """The one line a run prints about its data; whatever was left out is counted, and skipped lines named."""
        s = self.stats
        line = (
            f"data: {s['records']} records -> {s['train']} train / {s['test']} test, {s['truncated']} truncated, "
            f"{s['dropped']} dropped as over-long"
        )
        if s.get("fraction"):
            f = s["fraction"]
            line += f"; data.fraction={f['fraction']}: {f['kept']} of {f['of']} training examples kept"
        removed = [f"{s[k]} {k}" for k in ("empty", "duplicates") if s.get(k)]
        if s.get("skipped"):
            removed.insert(
                0, f"{s['skipped']} bad lines skipped (data.on_error=skip; first: {s['skipped_examples'][0]})"
            )
        if removed:
            line += "; not used: " + ", ".join(removed)
        return f"{line} (cache {self.cache_path.name})"

    def record(self) -> Dict[str, Any]:
        """What a run keeps about its data in eval.json: the split sizes as prepared (after data.fraction,
        filtering and over-long drops) and each split's key digest, so runs can be checked to share a test split."""
        s = self.stats
        keys = ("train", "test", "train_digest", "test_digest", "fraction")
        return {**{k: s.get(k) for k in keys}, "cache": self.cache_path.name}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    state += (
        f"|bos={tokenizer.bos_token_id}|eos={tokenizer.eos_token_id}|chat={getattr(tokenizer, 'chat_template', None)}"
    )
    return hashlib.sha256(state.encode()).hexdigest()


def cache_key(data_cfg: DataConfig, tokenizer: Any) -> str:
    # Every field that identifies the prepared data (ft_dist/settings.py), except where the records come from:
    # those enter below as each source's settings and its content's fingerprint.
    settings = identity(DataConfig, data_cfg, skip=("path", "sources"))
    sources = [dataclasses.asdict(s) for s in configured_sources(data_cfg)]
    blob = json.dumps(
        [CACHE_VERSION, content_fingerprint(data_cfg), tokenizer_fingerprint(tokenizer), settings, sources],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def column(ds: Any, name: str) -> np.ndarray:
    """A numeric column as a numpy array (respecting any select/shuffle index mapping)."""
    # One Arrow `take` on the one column. datasets' own indexing of an index-mapped (selected, split) dataset
    # gathers row by row, through a Python list and one slice object per row, so its memory grows with the dataset
    # (~0.5 KB per example); `_indices` is where datasets has kept that mapping since 1.0.
    values = ds.data.column(name)
    if ds._indices is not None:
        values = values.take(ds._indices.column(0))
    return values.to_numpy()


def _user_error(err: BaseException | None) -> UserError | None:
    """The DataError a generator raised, from inside the exception datasets wraps it in."""
    while err is not None:
        if isinstance(err, UserError):
            return err
        err = err.__cause__ or err.__context__
    return None


def _read(data_cfg: DataConfig, work: Path, key: str) -> Any:
    from datasets import Dataset

    try:
        return Dataset.from_generator(
            iter_records,
            features=record_features(),
            cache_dir=str(work / "records"),
            gen_kwargs={"data_cfg": data_cfg},
            fingerprint=f"{key}-records",
        )
    except Exception as err:  # datasets wraps a generator's exception in DatasetGenerationError
        found = _user_error(err)
        if found is not None:
            raise found from None
        raise


def _length_summary(lengths: np.ndarray, max_seq_len: int) -> Dict[str, Any]:
    # Bins cover the data's own range (whole tokens each), not 0..max_seq_len, where short data fills 2-3 bars;
    # the cut-off is kept beside them for the table and the plot to mark.
    lo, hi = (int(lengths.min()), int(lengths.max())) if len(lengths) else (0, max_seq_len)
    width = max(1, -(-(hi - lo + 1) // HISTOGRAM_BINS))
    counts, edges = np.histogram(lengths, bins=lo + width * np.arange(-(-(hi - lo + 1) // width) + 1))
    pct = {f"p{q}": int(np.percentile(lengths, q)) for q in (5, 25, 50, 75, 95, 99)} if len(lengths) else {}
    return {
        "min": int(lengths.min()) if len(lengths) else 0,
        "max": int(lengths.max()) if len(lengths) else 0,
        "mean": round(float(lengths.mean()), 1) if len(lengths) else 0.0,
        **pct,
        "histogram": {"edges": [int(e) for e in edges], "counts": counts.tolist(), "max_seq_len": max_seq_len},
    }


def _build(data_cfg: DataConfig, tokenizer: Any, target: Path) -> None:
    """Read, filter, dedup, split, tokenize (and pack) into a temp dir, then rename it to `target`.

    Over 80 lines on purpose: the pipeline's stages run in this order and each feeds the counts of the data
    report; split over functions they would pass the dataset and the stats dict back and forth.
    """
    from datasets import DatasetDict, disable_progress_bars

    disable_progress_bars()
    key = target.name
    num_proc = data_cfg.num_proc if data_cfg.num_proc > 1 else None
    tmp = temp_dir(target.parent, target.name + ".tmp-")
    try:
        work = tmp / "work"
        ds = _read(data_cfg, work, key)
        status = column(ds, "status")
        skipped_at = np.flatnonzero(status == SKIPPED)
        stats: Dict[str, Any] = {
            "records": int((status != SKIPPED).sum()),
            "skipped": len(skipped_at),
            "skipped_examples": list(ds.select(skipped_at[:5])["error"]),
            "empty": int((status == EMPTY).sum()) if data_cfg.drop_empty else 0,
        }
        ds = ds.select(np.flatnonzero(status == OK) if data_cfg.drop_empty else np.flatnonzero(status != SKIPPED))
        ds = ds.map(add_keys, batched=True, num_proc=num_proc, new_fingerprint=f"{key}-keys")
        stats["duplicates"] = 0
        if data_cfg.dedup:
            first = first_occurrences(column(ds, "key"))
            stats["duplicates"] = len(ds) - len(first)
            ds = ds.select(first)
        if len(ds) < 2:
            raise DataError(
                f"{len(ds)} examples left after filtering ({stats['empty']} empty, {stats['duplicates']} "
                f"duplicates, {stats['skipped']} skipped); need at least 2 for a train/test split",
                configured_sources(data_cfg)[0].path,
            )
        train, test = split_train_test(ds, data_cfg.test_size, data_cfg.split_seed)
        stats["train_test_overlap"] = overlap(column(train, "key"), column(test, "key"))
        # The test split is fixed above; data.fraction thins the training examples only, before any reweighting,
        # so it counts distinct examples and every fraction is scored on these same test examples.
        stats["test_digest"] = keys_digest(column(test, "key"))
        if data_cfg.fraction < 1:
            kept = nested_subset(len(train), data_cfg.fraction, data_cfg.split_seed)
            stats["fraction"] = {"fraction": data_cfg.fraction, "kept": len(kept), "of": len(train)}
            train = train.select(kept)
        stats["train_digest"] = keys_digest(column(train, "key"))
        sources = configured_sources(data_cfg)
        if any(s.weight != 1.0 for s in sources):
            train = train.select(
                weighted_indices(column(train, "source_id"), [s.weight for s in sources], data_cfg.split_seed)
            )
        settings = EncodeSettings(
            template=data_cfg.template,
            chat_template=_chat_template(data_cfg, tokenizer),
            system_prompt=data_cfg.system_prompt,
            train_on_prompt=data_cfg.train_on_prompt,
            max_seq_len=data_cfg.max_seq_len,
            truncation_side=data_cfg.truncation_side,
            overlong=data_cfg.overlong,
        )
        parts = {}
        stats.update(truncated=0, dropped=0)
        for name, part in (("train", train), ("test", test)):
            part = part.map(
                encode_batch,
                batched=True,
                num_proc=num_proc,
                new_fingerprint=f"{key}-{name}-tokens",
                fn_kwargs={"tokenizer": tokenizer, "settings": settings},
            )
            keep = column(part, "keep").astype(bool)
            stats["truncated"] += int(column(part, "truncated").sum())
            stats["dropped"] += int((~keep).sum())
            parts[name] = part.select(np.flatnonzero(keep)).remove_columns(list(_INTERNAL))
        _summarise(parts, sources, data_cfg, stats)
        if stats["train"] == 0:
            raise DataError(
                "no training examples left after filtering (all empty, duplicates or dropped as over-long)",
                sources[0].path,
            )
        if data_cfg.packing:
            train = parts["train"]
            parts["train"] = train.map(
                pack_batch,
                batched=True,
                batch_size=data_cfg.pack_window,
                num_proc=num_proc,
                remove_columns=train.column_names,
                fn_kwargs={"capacity": data_cfg.max_seq_len},
                new_fingerprint=f"{key}-packed",
            )
            rows = column(parts["train"], "length")
            stats["packing"] = {
                "rows": len(rows),
                "examples": stats["train"],
                "efficiency": round(packing_efficiency(rows, data_cfg.max_seq_len), 4),
            }
        # Small shards: save_to_disk materialises one shard at a time from index-mapped (selected) datasets, and the
        # default 500 MB shard would make peak memory grow with the dataset up to that size.
        DatasetDict(parts).save_to_disk(str(tmp / "data"), max_shard_size="32MB")
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
        shutil.rmtree(work, ignore_errors=True)
        _publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _chat_template(data_cfg: DataConfig, tokenizer: Any) -> str | None:
    """Chat rendering for chat data, and for prompt/response data with template=tokenizer."""
    if (
        data_cfg.messages_field
        or data_cfg.template == "tokenizer"
        or any(s.messages_field for s in configured_sources(data_cfg))
    ):
        return chat_template_for(
            data_cfg.template if data_cfg.template in ("chatml", "tokenizer") else "chatml", tokenizer
        )
    return None


def _summarise(parts: Dict[str, Any], sources: Any, data_cfg: DataConfig, stats: Dict[str, Any]) -> None:
    """Counts, per-source counts, token lengths and the share of loss tokens of the (unpacked) splits."""
    lengths = {n: column(p, "length") for n, p in parts.items()}
    loss = {n: column(p, "num_loss_tokens") for n, p in parts.items()}
    stats["train"], stats["test"] = len(parts["train"]), len(parts["test"])
    stats["per_source"] = {
        s.name: {n: int((column(p, "source_id") == s.index).sum()) for n, p in parts.items()} for s in sources
    }
    all_lengths = np.concatenate(list(lengths.values()))
    stats["tokens"] = int(all_lengths.sum())
    stats["loss_tokens"] = int(sum(v.sum() for v in loss.values()))
    stats["loss_token_share"] = round(stats["loss_tokens"] / max(stats["tokens"], 1), 4)
    stats["lengths"] = _length_summary(all_lengths, data_cfg.max_seq_len)


def _publish(tmp: Path, target: Path) -> None:
    """Rename the finished build into place; if another job got there first, keep theirs (same key, same content)."""
    try:
        os.replace(tmp, target)  # atomic: the cache entry appears complete or not at all
    except OSError:
        if not (target / "stats.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def builder_first(scope: str) -> Iterator[bool]:
    """Yield True on the process that prepares (global rank 0, or each node's local rank 0 for scope=node).

    The others wait at a barrier until every builder is done; barriers are collective, so every rank passes
    exactly one, before (waiters) or after (builders) the work.
    """
    first = dist.world().local_rank == 0 if scope == "node" else dist.is_main()
    if not first:
        dist.barrier()
    yield first
    if first:
        dist.barrier()


def prepare_dataset(data_cfg: DataConfig, tokenizer: Any) -> PreparedData:
    """Load the prepared splits from cache, building them first (on rank 0 / local rank 0) when absent."""
    from datasets import load_from_disk

    cache_root = Path(os.path.expanduser(data_cfg.cache_dir))
    cache_root.mkdir(parents=True, exist_ok=True)
    target = cache_root / cache_key(data_cfg, tokenizer)
    error = None
    with builder_first(data_cfg.cache_scope) as builds:
        if builds and not target.exists():
            try:
                _build(data_cfg, tokenizer, target)
            except UserError as err:  # other ranks must not hang at the barrier: they learn of it below
                error = err
    if error is not None:
        raise error
    if not target.exists():
        raise DataError("data preparation failed on the preparing rank (see its message)", str(target))
    parts = load_from_disk(str(target / "data"))
    stats = json.loads((target / "stats.json").read_text())
    return PreparedData(train=parts["train"], test=parts["test"], stats=stats, cache_path=target)
