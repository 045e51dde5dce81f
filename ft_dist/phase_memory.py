"""Peak memory of this rank, phase by phase (build, eval, train, save, resume, final save, export).

Memory per rank is a property ft-dist keeps and shows, so every phase of a run is measured on its own:
- host: the kernel's high-water mark of the resident set (VmHWM), reset at the start of each phase by writing 5 to
  /proc/self/clear_refs (Linux >= 4.0). It is exact (no sampling) and counts what the process really holds: heap,
  and the pages of memory-mapped files it touched (safetensors reads), but not the page cache of files it wrote.
- device: torch.cuda's peak allocated and reserved bytes, reset per phase.

`PhaseMemory.gather()` collects every rank's figures; ft-train writes them to `memory.json` in the run dir.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional

import torch

from ft_dist import dist

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(field: str) -> Optional[int]:
    try:
        with open(_STATUS) as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def host_rss_bytes() -> int:
    """This process's resident set now (heap + touched file pages)."""
    kib = _status_kib("VmRSS")
    return (kib or 0) * 1024


def host_peak_bytes() -> int:
    """The resident set's high-water mark since the process started or the last reset_host_peak()."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_host_peak() -> bool:
    """Set the high-water mark to the current RSS; False where the kernel does not allow it (then peaks only grow)."""
    try:
        with open(_CLEAR_REFS, "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PhaseMemory:
    """Per-phase peaks of this process; a phase that runs several times (eval) keeps its largest peak."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = host_rss_bytes()
        """RSS before any model exists: interpreter, torch, transformers, DeepSpeed, the process group."""
        self.phases: Dict[str, Dict[str, int]] = {}
        self.exact = True

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.exact = reset_host_peak() and self.exact
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            self._record(name)

    def _record(self, name: str) -> None:
        got = {"host_peak": host_peak_bytes()}
        if self.device.type == "cuda":
            got["device_allocated_peak"] = int(torch.cuda.max_memory_allocated(self.device))
            got["device_reserved_peak"] = int(torch.cuda.max_memory_reserved(self.device))
        old = self.phases.get(name, {})
        self.phases[name] = {k: max(v, old.get(k, 0)) for k, v in got.items()}

    def rank_record(self) -> Dict[str, Any]:
        return {"baseline": self.baseline, "phases": self.phases, "exact": self.exact}

    def gather(self) -> List[Dict[str, Any]]:
        """Every rank's record, in rank order, on every rank (a collective)."""

        return dist.all_gather_objects(self.rank_record())


def format_phase_table(records: List[Dict[str, Any]], model_bytes: Optional[int] = None) -> str:
    """One line per phase: the largest peak over ranks (host, and device when there is one)."""
    if not records:
        return ""
    names: List[str] = []
    for r in records:
        names += [n for n in r["phases"] if n not in names]
    gib = 2**30
    head = f"{'phase':<14}{'host peak GiB':>15}" + (
        f"{'GPU alloc GiB':>15}" if "device_allocated_peak" in next(iter(records[0]["phases"].values()), {}) else ""
    )
    lines = [
        f"memory per rank (max over {len(records)} ranks; baseline {max(r['baseline'] for r in records) / gib:.2f} GiB"
        + (f"; full model states {model_bytes / gib:.2f} GiB" if model_bytes else "")
        + ")",
        head,
    ]
    for n in names:
        host = max(r["phases"].get(n, {}).get("host_peak", 0) for r in records)
        line = f"{n:<14}{host / gib:>15.2f}"
        dev = [r["phases"].get(n, {}).get("device_allocated_peak") for r in records]
        if any(d is not None for d in dev):
            line += f"{max(d or 0 for d in dev) / gib:>15.2f}"
        lines.append(line)
    return "\n".join(lines)
