"""Config schemas of evaluation: the `eval` group used during training, and the ft-eval / ft-generate commands."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore

from ft_dist.errors import ConfigError

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


def register(cs: ConfigStore) -> None:
    from ft_dist.config import RunConfig

    @dataclass
    class EvalRunConfig(RunConfig):
        """`ft-eval`: score models (the base, a finetuned `checkpoint`, or several `checkpoints`) on the test split."""

        mode: str = "eval"
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
        judge: str = "f1"
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

    cs.store(name="eval_schema", node=EvalRunConfig)
    cs.store(name="generate_schema", node=GenerateRunConfig)


def validate_eval_run(cfg: Any) -> None:
    """ft-eval's own checks, on top of `ft_dist.config.validate`; raises ConfigError naming the key."""
    from ft_dist.config import validate

    validate(cfg)
    if cfg.mode not in MODES:
        raise ConfigError("mode", f"expected one of {', '.join(MODES)}, got {cfg.mode!r}")
    if cfg.judge not in JUDGES:
        raise ConfigError("judge", f"expected one of {', '.join(JUDGES)}, got {cfg.judge!r}")
    if cfg.mode == "compare" and len(cfg.checkpoints) < 2 and not (cfg.checkpoint and not cfg.checkpoints):
        raise ConfigError("checkpoints", "mode=compare needs two or more models, e.g. checkpoints=[base,runs/X]")
    if cfg.mode == "mc" and not cfg.mc_tasks and not cfg.mc_file:
        raise ConfigError("mc_file", "mode=mc needs mc_file=<items.jsonl> or mc_tasks=[arc_easy,...]")
    if cfg.mc_file and not Path(cfg.mc_file).expanduser().is_file():
        raise ConfigError("mc_file", f"expected a {{question, choices, answer}} JSONL file, got {cfg.mc_file!r}")
    if cfg.mc_limit is not None and cfg.mc_limit <= 0:
        raise ConfigError("mc_limit", f"expected a positive count or null, got {cfg.mc_limit}")
    if cfg.mc_batch_size <= 0:
        raise ConfigError("mc_batch_size", f"expected a value > 0, got {cfg.mc_batch_size}")
    if cfg.worst_examples < 0:
        raise ConfigError("worst_examples", f"expected a value >= 0, got {cfg.worst_examples}")
