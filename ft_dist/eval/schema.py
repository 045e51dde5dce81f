"""Config schema of evaluation: the `eval` group (ft-eval's and ft-generate's own fields: ft_dist/commands/schema.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ft_dist.settings import setting

MODES = ("eval", "compare", "mc")
JUDGES = ("f1", "none")
BASE = "base"
"""The name that stands for the base model (built from `model`) in `checkpoints`."""


@dataclass
class EvalConfig:
    """Task evaluation by generation on the test split."""

    max_new_tokens: int = setting(64, positive=True)
    batch_size: int = setting(32, positive=True)
    max_examples: int = setting(0, non_negative=True)
    """Evaluate on at most N test examples (0: all)."""
    during_training: int = 0
    """Test examples to generate and score at each periodic eval (train.eval_every); 0 turns it off."""
    before_training: bool = True
    """Measure the task metric on the base model first, for a before/after table."""
