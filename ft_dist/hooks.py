"""Test seams: named points in a run where a test can inject a fault (a stalled rank, a slow save, a NaN loss) or
observe what streams past (the final weights each rank gathers).

Nothing is installed in a real run, and nothing here reads the environment: a test installs hooks in the worker
process itself, with a small script that calls `install` and then runs launch/train.py (tests/dist_utils.py
`hooked_train_script`).

Points, and what the run passes:
- "after_step": after each optimizer step; `step` (steps done), `rank`.
- "nan_loss": before each step's forward; `step` (the step being taken), `rank`. A hook returning True makes
  that step's loss NaN on this rank (a real NaN, through backward and the optimizer step).
- "checkpoint_written": this rank's part of a checkpoint is on disk, the checkpoint is not complete yet;
  `step`, `rank`, `path` (the temporary dir).
- "final_unit": each unit (name -> full tensor) of the final model as this rank's gather yields it; `unit`,
  `rank`, `out_dir`. "final_units_done": after the last one; `rank`, `out_dir`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, DefaultDict, List

_HOOKS: DefaultDict[str, List[Callable[..., Any]]] = defaultdict(list)
POINTS = ("after_step", "nan_loss", "checkpoint_written", "final_unit", "final_units_done")


def install(point: str, hook: Callable[..., Any]) -> None:
    if point not in POINTS:
        raise ValueError(f"unknown hook point {point!r}; expected one of {', '.join(POINTS)}")
    _HOOKS[point].append(hook)


def fire(point: str, **kwargs: Any) -> List[Any]:
    """Call the hooks installed at `point`; their return values, in order of installation (none: [])."""
    return [hook(**kwargs) for hook in _HOOKS.get(point, ())]
