"""The configs of ft-eval and ft-generate: a training run's config (the model, data and eval groups) plus what
each command adds. Here rather than in ft_dist/eval/schema.py, which ft_dist/config.py imports for the `eval`
group; registered by ft_dist/commands/schema.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ft_dist.config import RunConfig
from ft_dist.eval.schema import JUDGES, MODES
from ft_dist.settings import setting


@dataclass
class EvalRunConfig(RunConfig):
    """`ft-eval`: score models (the base, a finetuned `checkpoint`, or several `checkpoints`) on the test split."""

    mode: str = setting("eval", choices=MODES)
    """eval: loss, perplexity, generation metrics and error analysis, base vs finetuned (before/after).
    compare: the same for every model in `checkpoints`, one table with deltas, error counts and win rates.
    mc: only the multiple-choice benchmarks (`mc_tasks`, `mc_file`)."""
    checkpoint: Optional[str] = None
    """A finetuned model directory (a run dir or its final/); None evaluates the base model."""
    compare_base: bool = True
    """With a checkpoint, also evaluate the base model and print before/after."""
    checkpoints: List[str] = field(default_factory=list)
    """Models to compare (mode=compare): `base` and/or model/run directories; the first is the baseline of the
    deltas. Empty: [base, checkpoint]."""
    mc_tasks: List[str] = field(default_factory=list)
    """lm-eval task names (arc_easy, hellaswag, mmlu, truthfulqa_mc2, ...); their data comes from the HF hub."""
    mc_file: Optional[str] = None
    """A local multiple-choice JSONL of {question, choices, answer}, run as an lm-eval task (and instead of
    `mc_tasks` when their data is out of reach)."""
    mc_limit: Optional[int] = None
    """Score at most N items per multiple-choice task (None: all)."""
    mc_batch_size: int = 8
    judge: str = setting("f1", choices=JUDGES)
    """Pairwise preference judge for compare's win rates and Elo: f1 (higher token-F1 wins) | none."""
    error_analysis: bool = True
    """Tag each generated answer with error categories; write errors-<model>.jsonl and .md."""
    worst_examples: int = 20
    """Examples shown in the Markdown error report, worst first."""


@dataclass
class GenerateRunConfig(RunConfig):
    """`ft-generate`: answer prompts with a model through the data config's template."""

    checkpoint: Optional[str] = None
    prompt: Optional[str] = None
    """One prompt; None reads prompts from stdin, one per line."""
