"""User-facing errors. Each renders as one line that names what is wrong and what was expected.

Entry points catch `UserError` and print `str(err)` without a traceback: a user mistake is not a bug.
"""

from __future__ import annotations

from typing import Optional


class UserError(Exception):
    """A mistake in the user's config or data; shown as one line, exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    def __init__(self, key: str, expected: str):
        self.key = key
        super().__init__(f"config error: {key}: {expected}")


class DataError(UserError):
    def __init__(self, message: str, path: Optional[str] = None, line: Optional[int] = None):
        where = f"{path}:{line}: " if path and line else (f"{path}: " if path else "")
        super().__init__(f"data error: {where}{message}")


class TrainingDiverged(UserError):
    """Loss or gradients stayed NaN/Inf; exit code ft_dist.EXIT_DIVERGED."""

    exit_code = 3
