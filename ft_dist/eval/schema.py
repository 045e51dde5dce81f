"""Config schemas of evaluation: the `eval` group used during training, and the ft-eval / ft-generate commands."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore


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


def register(cs: ConfigStore) -> None:
    from ft_dist.config import RunConfig

    @dataclass
    class EvalRunConfig(RunConfig):
        """`ft-eval`: score a model (base, or a finetuned `checkpoint`) on the test split."""

        checkpoint: Optional[str] = None
        """A finetuned model directory (a run's final/); None evaluates the base model."""
        compare_base: bool = True
        """With a checkpoint, also evaluate the base model and print before/after."""

    @dataclass
    class GenerateRunConfig(RunConfig):
        """`ft-generate`: answer prompts with a model through the data config's template."""

        checkpoint: Optional[str] = None
        prompt: Optional[str] = None
        """One prompt; None reads prompts from stdin, one per line."""

    cs.store(name="eval_schema", node=EvalRunConfig)
    cs.store(name="generate_schema", node=GenerateRunConfig)
