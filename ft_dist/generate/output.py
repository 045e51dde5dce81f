"""Append-only progress and the merged output.

Each rank appends one line per finished batch of chunks to `<output>.parts/rank-<r>.jsonl`: every chunk of the
batch with its parsed pairs, per-pair verdicts and counts, in one write + flush + fsync, so a SIGKILL leaves whole
lines and at most one cut-off last line, which the next run removes before appending. The chunks done are the
union of all parts files, whatever world size wrote them. The output itself is rebuilt from the parts by rank 0
(chunk order, duplicate filters in that order) and written atomically: it is either the old file or the new one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List

from ft_dist.atomic_io import atomic_write_text
from ft_dist.errors import ConfigError


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def report_path(output: Path) -> Path:
    return output.with_name(output.name + ".report.json")


def repair(path: Path) -> None:
    """Cut a last line that a crash left without its newline (an incomplete record)."""
    if not path.exists():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with path.open("r+b") as fh:
            fh.truncate(end)
            os.fsync(fh.fileno())


def read_parts(output: Path) -> List[Dict[str, Any]]:
    """Every complete chunk record of every parts file (cut-off last lines repaired first)."""
    records: List[Dict[str, Any]] = []
    for f in sorted(parts_dir(output).glob("rank-*.jsonl")):
        repair(f)
        for line in f.read_text().splitlines():
            records.extend(json.loads(line)["chunks"])
    return records


def append_batch(path: Path, chunk_records: List[Dict[str, Any]]) -> None:
    """One line for a finished batch, written whole and synced before the next batch starts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"chunks": chunk_records}, ensure_ascii=False) + "\n"
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def write_jsonl(path: Path, rows: Iterable[Dict[str, Any]]) -> None:
    """The whole file at once, atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def claim(output: Path, settings: Dict[str, Any]) -> None:
    """Rank 0, before generating: the parts dir records the settings it was generated with; other settings would
    mix replies of two configs in one output, so they are refused in one line."""
    record = parts_dir(output) / "settings.json"
    if record.exists():
        before = json.loads(record.read_text())
        if before != settings:
            changed = sorted(
                f"{part}.{k}"
                for part in settings
                for k in settings[part]
                if before.get(part, {}).get(k) != settings[part][k]
            )
            raise ConfigError(
                "output",
                f"{output} was generated with other settings ({', '.join(changed) or 'layout'}); resume with the same "
                f"ones, or write to another output (or remove {parts_dir(output)})",
            )
        return
    parts_dir(output).mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, json.dumps(settings, indent=2, sort_keys=True) + "\n")
