"""Config schemas of evaluation: the `eval` group used during training, and the ft-eval / ft-generate commands."""

from __future__ import annotations

from dataclasses import dataclass


MODES = ("eval", "compare", "mc")
JUDGES = ("f1", "none")
BASE = "base"
"""The name that stands for the base model (built from `model`) in `checkpoints`."""


@dataclass
class EvalConfig:
    """Task evaluation by generation on the test split."""

    max_new_tokens: int = 64
    batch_size: int = 32
    max_examples: int = 0
    """Evaluate on at most N test examples (0: all)."""
    during_training: int = 0
    """Test examples to generate and score at each periodic eval (train.eval_every); 0 turns it off."""
    before_training: bool = True
    """Measure the task metric on the base model first, for a before/after table."""
