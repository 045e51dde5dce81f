"""Test seams: named points in a run where a test can inject a fault (a stalled rank, a slow step).

Nothing is installed in a real run, and nothing here reads the environment: a test installs a hook in the worker
process itself, e.g. with a small script that calls `install` and then runs launch/train.py (tests/test_hang.py).

Points fired by the loop:
- "after_step": after each optimizer step, with `step` (steps done) and `rank`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, DefaultDict, List

_HOOKS: DefaultDict[str, List[Callable[..., None]]] = defaultdict(list)
POINTS = ("after_step",)


def install(point: str, hook: Callable[..., None]) -> None:
    if point not in POINTS:
        raise ValueError(f"unknown hook point {point!r}; expected one of {', '.join(POINTS)}")
    _HOOKS[point].append(hook)


def fire(point: str, **kwargs: Any) -> None:
    for hook in _HOOKS.get(point, ()):
        hook(**kwargs)
