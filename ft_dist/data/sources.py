"""Read instruction-response and chat records from files, folders, globs or HF datasets, mixed from several sources.

Records come out in one schema whatever the user's field names (`RECORD_FEATURES`): `prompt`, `context`,
`response` (for chat data: the last user turn and the last assistant turn) and `messages` (the turns; empty for
prompt/response data). Errors name the file and line (with a snippet of the bad line) and, for a missing field,
the fields that do exist and the key to set. With `data.on_error=skip` a bad line becomes a row with `status`
SKIPPED and its message in `error`, so the pipeline can count and report it without holding anything in memory.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from ft_dist.data.schema import HF_PREFIX, DataConfig
from ft_dist.errors import DataError

FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
OK, SKIPPED, EMPTY = 0, 1, 2
ROLES = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "human": "user",
    "gpt": "assistant",
    "tool": "tool",
}


def record_features() -> Any:
    """The Arrow schema of normalised records (a function: importing datasets is slow, keep it lazy)."""
    from datasets import Features, Value
    from datasets import List as ListFeature

    return Features(
        {
            "source_id": Value("int32"),
            "source": Value("string"),
            "source_line": Value("int64"),
            "prompt": Value("string"),
            "context": Value("string"),
            "response": Value("string"),
            "messages": ListFeature({"role": Value("string"), "content": Value("string")}),
            "status": Value("int8"),
            "error": Value("string"),
        }
    )


@dataclass(frozen=True)
class Source:
    """One configured source with its field names resolved (per-source values over the top-level ones)."""

    index: int
    name: str
    path: str
    weight: float
    hf_split: str
    hf_revision: Optional[str]
    prompt_field: str
    response_field: str
    context_field: Optional[str]
    messages_field: Optional[str]
    key_prefix: str
    """`data` or `data.sources[i]`: where a field name is set, for error messages."""


def configured_sources(data_cfg: DataConfig) -> List[Source]:
    """`data.sources` (or the single `data.path`) with inherited field names filled in."""

    def pick(src: Any, key: str) -> Any:
        own = getattr(src, key, None) if src is not None else None
        return own if own is not None else getattr(data_cfg, key)

    entries = list(data_cfg.sources) if data_cfg.sources else [None]
    out = []
    for i, src in enumerate(entries):
        path = src.path if src is not None else data_cfg.path
        assert path is not None  # validate_data: data.path is set whenever data.sources is empty
        out.append(
            Source(
                index=i,
                name=(src.name if src is not None and src.name else path),
                path=path,
                weight=float(src.weight) if src is not None else 1.0,
                hf_split=pick(src, "hf_split"),
                hf_revision=pick(src, "hf_revision"),
                prompt_field=pick(src, "prompt_field"),
                response_field=pick(src, "response_field"),
                context_field=pick(src, "context_field"),
                messages_field=pick(src, "messages_field"),
                key_prefix=f"data.sources[{i}]" if src is not None else "data",
            )
        )
    return out


def resolve_files(path: str) -> List[Path]:
    """The data files behind a file, folder (its files of known types, sorted) or glob (sorted matches)."""
    p = Path(path).expanduser()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in FORMATS)
        if not files:
            raise DataError(f"no {', '.join(FORMATS)} files in this folder", str(p))
    elif glob.has_magic(str(p)):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise DataError("the glob matches no files", str(p))
    else:
        raise DataError("no such file or folder", str(p))
    for f in files:
        if f.suffix.lower() not in FORMATS:
            raise DataError(f"unknown file type {f.suffix!r}; expected one of {', '.join(FORMATS)}", str(f))
    return files


def _snippet(text: str, width: int = 80) -> str:
    text = text.strip()
    return text if len(text) <= width else text[: width - 3] + "..."


Row = Tuple[int, Union[Dict[str, Any], DataError]]


def _read_jsonl(path: Path) -> Iterator[Row]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield (
                    lineno,
                    DataError(
                        f"not UTF-8 text (byte {err.start} of this line); re-encode the file as UTF-8",
                        str(path),
                        lineno,
                    ),
                )
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                yield (
                    lineno,
                    DataError(f"malformed JSON ({err.msg}, column {err.colno}): {_snippet(line)!r}", str(path), lineno),
                )


def _read_json(path: Path) -> Iterator[Row]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 text (byte {err.start}); re-encode the file as UTF-8", str(path)) from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        lines = text.splitlines()
        line = lines[err.lineno - 1] if lines else ""
        raise DataError(
            f"malformed JSON ({err.msg}, column {err.colno}): {_snippet(line)!r}", str(path), err.lineno
        ) from err
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list):
        raise DataError("expected a JSON list of objects", str(path))
    for i, row in enumerate(data, start=1):
        yield i, row


def _read_csv(path: Path) -> Iterator[Row]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            # csv.reader, not DictReader: a quoted field may span lines, and a record's line is where it starts
            # (DictReader's line_num is where it ends, and it skips blank lines before we can see where it began).
            reader = csv.reader(fh)
            fields = next(reader, None)
            start = reader.line_num + 1
            for values in reader:
                if values:  # blank lines skipped; missing values None (DictReader's semantics)
                    assert fields is not None  # a row after the header: the header was read
                    if len(values) > len(fields):  # the columns no longer line up: a comma in an unquoted value
                        message = (
                            f"{len(values)} values but the header has {len(fields)} columns; quote values "
                            "that contain commas"
                        )
                        yield start, DataError(message, str(path), start)
                    else:
                        row: Dict[Any, Any] = dict(zip(fields, values))
                        row.update({f: None for f in fields[len(values) :]})
                        yield start, row
                start = reader.line_num + 1
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 text (byte {err.start}); re-encode the file as UTF-8", str(path)) from err


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataError(f"not a readable Parquet file ({err})", str(path)) from err
    row_no = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            row_no += 1
            yield row_no, row


def _read_hf(name: str, split: str, revision: Optional[str]) -> Iterator[Row]:
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split=split, revision=revision)
    except Exception as err:  # hub/network/format errors all mean: this id cannot be read here
        raise DataError(
            f"could not load HF dataset {name!r} (split {split!r}, revision {revision!r}): "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err
    for i, row in enumerate(ds, start=1):
        yield i, row


def _rows(source: Source) -> Iterator[Tuple[str, int, Union[Dict[str, Any], DataError]]]:
    if source.path.startswith(HF_PREFIX):
        for lineno, row in _read_hf(source.path[len(HF_PREFIX) :], source.hf_split, source.hf_revision):
            yield source.path, lineno, row
        return
    readers = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}
    for f in resolve_files(source.path):
        if f.stat().st_size == 0:
            raise DataError("the file is empty", str(f))
        for lineno, row in readers[FORMATS[f.suffix.lower()]](f):
            yield str(f), lineno, row


_USUAL_PROMPTS = ("instruction", "prompt", "question", "input", "query", "text")
_USUAL_RESPONSES = ("output", "response", "completion", "answer", "target", "label")


def _missing(row: Dict[str, Any], name: str, key: str, where: str, lineno: int) -> DataError:
    present = ", ".join(sorted(map(str, row))) or "none"
    hint = ""
    if key.endswith("prompt_field") and any(k in row for k in ("messages", "conversations")):
        found: Optional[str] = "messages" if "messages" in row else "conversations"
        hint = f"; chat data? set data.messages_field={found} and data.template=chatml or tokenizer"
    else:  # the usual names of other datasets (Alpaca, prompt/completion, TRL, ...)
        usual = (
            _USUAL_PROMPTS
            if key.endswith("prompt_field")
            else _USUAL_RESPONSES
            if key.endswith("response_field")
            else ()
        )
        found = next((f for f in usual if f in row), None)
        hint = f"; this file looks like {key}={found}" if found else ""
    return DataError(f"missing field {name!r} (set {key}); fields present: {present}{hint}", where, lineno)


def _text(row: Dict[str, Any], name: str, key: str, where: str, lineno: int) -> str:
    if name not in row:
        raise _missing(row, name, key, where, lineno)
    value = row[name]
    return "" if value is None else str(value)


def normalise_messages(value: Any, where: str, lineno: int) -> List[Dict[str, str]]:
    """Turns as [{role, content}] with roles system/user/assistant/tool (ShareGPT's from/value accepted)."""
    if isinstance(value, str):  # CSV cells hold the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(f"messages field is not a JSON list ({err.msg})", where, lineno) from err
    if not isinstance(value, list):
        raise DataError(
            f"expected messages as a list of {{role, content}} objects, got {type(value).__name__}", where, lineno
        )
    out = []
    for turn in value:
        if not isinstance(turn, dict):
            raise DataError(f"expected each message to be an object, got {type(turn).__name__}", where, lineno)
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role is None or content is None and "content" not in turn:
            raise DataError(
                f"expected each message to have role and content; got fields {', '.join(sorted(turn))}", where, lineno
            )
        if str(role) not in ROLES:
            raise DataError(f"unknown message role {role!r}; expected one of {', '.join(ROLES)}", where, lineno)
        out.append({"role": ROLES[str(role)], "content": "" if content is None else str(content)})
    return out


def _chat_record(messages: List[Dict[str, str]]) -> Dict[str, Any]:
    """prompt/response of a conversation: its last user turn and last assistant turn (trailing turns dropped)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last < 0:
        return {"prompt": "", "context": "", "response": "", "messages": messages}
    prompt = next((m["content"] for m in reversed(messages[:last]) if m["role"] == "user"), "")
    return {"prompt": prompt, "context": "", "response": messages[last]["content"], "messages": messages[: last + 1]}


def _normalise(row: Any, source: Source, where: str, lineno: int) -> Dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"expected an object with fields, got {type(row).__name__}", where, lineno)
    if source.messages_field:
        if source.messages_field not in row:
            raise _missing(row, source.messages_field, f"{source.key_prefix}.messages_field", where, lineno)
        return _chat_record(normalise_messages(row[source.messages_field], where, lineno))
    context = (
        _text(row, source.context_field, f"{source.key_prefix}.context_field", where, lineno)
        if source.context_field
        else ""
    )
    return {
        "prompt": _text(row, source.prompt_field, f"{source.key_prefix}.prompt_field", where, lineno),
        "context": context,
        "response": _text(row, source.response_field, f"{source.key_prefix}.response_field", where, lineno),
        "messages": [],
    }


def iter_records(data_cfg: DataConfig) -> Iterator[Dict[str, Any]]:
    """Normalised records of every source, in order; bad lines raise, or (on_error=skip) come out as SKIPPED rows.

    A `datasets.Dataset.from_generator` generator: rows stream to Arrow files, nothing accumulates in memory.
    """
    skip = data_cfg.on_error == "skip"
    taken = 0
    for source in configured_sources(data_cfg):
        count = 0
        for where, lineno, row in _rows(source):
            base = {"source_id": source.index, "source": source.name, "source_line": lineno, "error": ""}
            try:
                if isinstance(row, DataError):
                    raise row
                rec = _normalise(row, source, where, lineno)
            except DataError as err:
                if not skip:
                    raise
                yield {
                    **base,
                    "prompt": "",
                    "context": "",
                    "response": "",
                    "messages": [],
                    "status": SKIPPED,
                    "error": str(err),
                }
                continue
            blank = not rec["response"].strip() or not (rec["prompt"].strip() or rec["messages"])
            count += 1
            taken += 1
            yield {**base, **rec, "status": EMPTY if blank else OK}
            if data_cfg.limit and taken >= data_cfg.limit:
                return
        if count == 0:
            raise DataError("no records found", source.path)


def content_fingerprint(data_cfg: DataConfig) -> str:
    """A hash of every source's bytes (or HF id, revision and split): part of the prepared-data cache key."""
    h = hashlib.sha256()
    for source in configured_sources(data_cfg):
        h.update(f"{source.name}|{source.weight}|".encode())
        if source.path.startswith(HF_PREFIX):
            h.update(f"{source.path}@{source.hf_revision}/{source.hf_split}".encode())
            continue
        for f in resolve_files(source.path):
            h.update(str(f).encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()
