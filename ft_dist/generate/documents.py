"""Input documents: folders and globs of .txt/.md/.html/.jsonl, read as (document id, text) in a fixed order."""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Set

from ft_dist.errors import ConfigError, DataError

SUFFIXES = (".txt", ".md", ".html", ".htm", ".jsonl")


@dataclass(frozen=True)
class Document:
    doc_id: str
    """The file, plus `:<line>` for a .jsonl record."""
    text: str


def input_files(inputs: List[str]) -> List[Path]:
    """Every input file, sorted and unique; one ConfigError line when there is none."""
    found: Set[Path] = set()
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found.update(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        else:
            found.update(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).suffix.lower() in SUFFIXES)
    if not found:
        raise ConfigError(
            "inputs", f"no {'/'.join(SUFFIXES)} files in {', '.join(inputs) or '[]'}; point it at documents"
        )
    return sorted(found)


def html_text(html: str) -> str:
    """Visible text of an HTML page (BeautifulSoup; scripts and styles dropped)."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript"]):
        tag.decompose()
    return "\n".join(line.strip() for line in soup.get_text("\n").splitlines() if line.strip())


def read_documents(files: List[Path], text_field: str) -> List[Document]:
    """The documents of `files`; a .jsonl line without `text_field` is a DataError naming file:line."""
    docs: List[Document] = []
    for f in files:
        raw = f.read_text(encoding="utf-8", errors="replace")
        if f.suffix.lower() == ".jsonl":
            for lineno, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"not JSON ({err.msg})", str(f), lineno) from err
                if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                    raise DataError(f"expected a string field {text_field!r} (set text_field)", str(f), lineno)
                docs.append(Document(f"{f}:{lineno}", row[text_field]))
        elif f.suffix.lower() in (".html", ".htm"):
            docs.append(Document(str(f), html_text(raw)))
        else:
            docs.append(Document(str(f), raw))
    return [d for d in docs if d.text.strip()]
