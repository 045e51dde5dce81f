"""Atomic writes: a file or a directory appears whole or not at all.

Everything is written into a temporary sibling and renamed into place, so a crash mid-write leaves either the
previous complete output or nothing, never a half-written file that loads wrongly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def temp_dir(parent: Path, prefix: str) -> Path:
    """A new directory in `parent` with the permissions a plain mkdir would give (0777 less the umask).

    tempfile.mkdtemp makes 0700 directories, which would leave a model that teammates and serving jobs cannot read
    once it is renamed into place.
    """
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def _plain_modes(root: Path) -> None:
    """Give everything under `root` a plain open()'s / mkdir's mode: some writers (safetensors' save_file, via a
    temp file) create 0600 files."""
    umask = _umask()
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temp dir; on success it replaces `target` (the old one is removed only after the new one is in place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(target.parent, f".{target.name}.tmp-")
    try:
        yield tmp
        _plain_modes(tmp)
        old: Optional[Path] = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
