"""Read instruction-response records from JSONL / JSON / CSV / Parquet files or HF datasets.

Records come out as `{"source_line", "prompt", "context", "response"}` whatever the user's field names. Errors name the file and
line (with a snippet of the bad line) and, for a missing field, the fields that do exist and the key to set.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from ft_dist.errors import DataError

FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
HF_PREFIX = "hf:"


def _snippet(text: str, width: int = 80) -> str:
    text = text.strip()
    return text if len(text) <= width else text[: width - 3] + "..."


def _read_jsonl(path: Path) -> Iterator[tuple]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"not UTF-8 text (byte {err.start} of this line); re-encode the file as UTF-8", str(path), lineno)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"malformed JSON ({err.msg}, column {err.colno}): {_snippet(line)!r}", str(path), lineno)
            yield lineno, row


def _read_json(path: Path) -> Iterator[tuple]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 text (byte {err.start}); re-encode the file as UTF-8", str(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        line = text.splitlines()[err.lineno - 1] if text.splitlines() else ""
        raise DataError(f"malformed JSON ({err.msg}, column {err.colno}): {_snippet(line)!r}", str(path), err.lineno)
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list):
        raise DataError("expected a JSON list of objects", str(path))
    for i, row in enumerate(data, start=1):
        yield i, row


def _read_csv(path: Path) -> Iterator[tuple]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            for row in reader:
                yield reader.line_num, row
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 text (byte {err.start}); re-encode the file as UTF-8", str(path))


def _read_parquet(path: Path) -> Iterator[tuple]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataError(f"not a readable Parquet file ({err})", str(path))
    row_no = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            row_no += 1
            yield row_no, row


def _read_hf(name: str, split: str, revision: Optional[str]) -> Iterator[tuple]:
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split=split, revision=revision)
    except Exception as err:  # hub/network/format errors all mean: this id cannot be read here
        raise DataError(f"could not load HF dataset {name!r} (split {split!r}): {str(err).splitlines()[0]}")
    for i, row in enumerate(ds, start=1):
        yield i, row


def _rows(path: str, data_cfg: Any) -> Iterator[tuple]:
    if path.startswith(HF_PREFIX):
        yield from _read_hf(path[len(HF_PREFIX):], data_cfg.hf_split, data_cfg.hf_revision)
        return
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError("no such file (data.path)", str(p))
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise DataError(f"unknown file type {p.suffix!r}; expected one of {', '.join(FORMATS)}", str(p))
    if p.stat().st_size == 0:
        raise DataError("the file is empty", str(p))
    yield from {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}[fmt](p)


def _field(row: Dict[str, Any], name: str, key: str, where: str, lineno: int) -> str:
    if name not in row:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise DataError(f"missing field {name!r} (set {key}); fields present: {present}", where, lineno)
    value = row[name]
    return "" if value is None else str(value)


def read_records(data_cfg: Any) -> Iterator[Dict[str, str]]:
    """Yield normalised records from `data.path`, in file order."""
    where = data_cfg.path
    count = 0
    for lineno, row in _rows(data_cfg.path, data_cfg):
        if not isinstance(row, dict):
            raise DataError(f"expected an object with fields, got {type(row).__name__}", where, lineno)
        count += 1
        yield {
            "source_line": lineno,
            "prompt": _field(row, data_cfg.prompt_field, "data.prompt_field", where, lineno),
            "context": _field(row, data_cfg.context_field, "data.context_field", where, lineno) if data_cfg.context_field else "",
            "response": _field(row, data_cfg.response_field, "data.response_field", where, lineno),
        }
    if count == 0:
        raise DataError("no records found", where)


def content_fingerprint(data_cfg: Any) -> str:
    """A hash of the source's bytes (or the HF id and revision), part of the prepared-data cache key."""
    import hashlib

    if data_cfg.path.startswith(HF_PREFIX):
        return f"{data_cfg.path}@{data_cfg.hf_revision}/{data_cfg.hf_split}"
    h = hashlib.sha256()
    p = Path(data_cfg.path).expanduser()
    if not p.is_file():
        raise DataError("no such file (data.path)", str(p))
    with p.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def list_fields(records: List[Dict[str, Any]]) -> List[str]:
    return sorted({k for r in records for k in r})
