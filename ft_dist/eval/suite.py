"""The full evaluation of one model: loss and perplexity, generation metrics, error analysis, multiple choice.

`evaluate_model` is what ft-eval runs per model (base, finetuned, or each checkpoint of a comparison). Under
torchrun every rank holds a full copy of the model: the loss batches and the generation prompts are sharded over
ranks and gathered, error analysis and the lm-eval benchmarks run on rank 0 (lm-eval is handed a model object, which
it evaluates in one process).
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, cast

from ft_dist import dist
from ft_dist.config import RunConfig
from ft_dist.data.prepare import PreparedData
from ft_dist.eval.error_analysis import build_vocabulary, error_report
from ft_dist.eval.generation import task_metrics
from ft_dist.eval.harness import TaskDataUnreachable, run_harness
from ft_dist.eval.loss import evaluate_loss
from ft_dist.eval.run_schema import EvalRunConfig
from ft_dist.models import ModelSpec
from ft_dist.strategies.single import SingleDevice

MC_TABLE_METRICS = ("acc", "acc_norm")
"""Multiple-choice metrics shown in comparison tables (their stderrs stay in eval.json)."""


@dataclass
class ModelResult:
    """Everything measured on one model; `summary()` is its entry in eval.json."""

    name: str
    metrics: Dict[str, float] = field(default_factory=dict)
    """eval_loss, eval_perplexity, exact_match, normalized_match, token_f1, rouge_l, examples."""
    samples: List[Dict[str, Any]] = field(default_factory=list)
    """Per test example: prompt, reference, prediction, truncated."""
    errors: Optional[Dict[str, Any]] = None
    """`error_report` of the samples (rank 0)."""
    mc: Dict[str, Dict[str, Optional[float]]] = field(default_factory=dict)
    """Multiple-choice metrics per task, as lm-eval computed them."""
    mc_raw: Dict[str, Any] = field(default_factory=dict)
    """lm-eval's own results dict, written beside the report so the numbers can be traced to the harness."""
    seconds: Dict[str, float] = field(default_factory=dict)

    def summary(self) -> Dict[str, Any]:
        out: Dict[str, Any] = dict(self.metrics)
        if self.errors is not None:
            out["errors"] = self.errors["counts"]
        if self.mc:
            out["mc"] = self.mc
        out["seconds"] = self.seconds
        return out

    def table_metrics(self) -> Dict[str, float]:
        """The numbers a comparison table shows: float metrics and each task's accuracies."""
        values = {k: v for k, v in self.metrics.items() if isinstance(v, float)}
        for task, metrics in self.mc.items():
            # cast: the filter skips the None values
            values.update(
                {f"{task}/{m}": float(cast(float, metrics[m])) for m in MC_TABLE_METRICS if metrics.get(m) is not None}
            )
        return values


def vocabulary_of(data: PreparedData) -> Set[str]:
    """The misspelling detector's known words: training prompts and responses, and the test references."""
    return build_vocabulary(chain(data.train["prompt"], data.train["response"], data.test["response"]))


def load_replica(cfg: RunConfig, path: Optional[str], tokenizer: Any, world: dist.World) -> SingleDevice:
    """The model on this rank's device, whole: evaluation shards the data, not the model.

    The single-device strategy is used on every rank (it refuses to be *built* by `build_strategy` under torchrun,
    where training needs a data-parallel engine); it gives evaluate_loss the model, the world and autocast.
    """
    replica = SingleDevice(cfg.strategy, cfg.train, world)

    # A from-config base gets the same random init as the run's, on every rank.
    replica.setup(ModelSpec(cfg.model, None, tokenizer, seed=cfg.train.seed, path=path), None)
    return replica


def _task_name(path: str) -> str:
    # The file's stem as an lm-eval task name (letters, digits, underscores), so results read "<file>/acc".
    return re.sub(r"\W", "_", Path(path).stem).lower() or "local_mc"


def multiple_choice(cfg: EvalRunConfig, model: Any, tokenizer: Any) -> Dict[str, Any]:
    """Run the named lm-eval tasks and/or the local items file on `model`; {"metrics": ..., "results": ...}.

    Named tasks whose data cannot be reached (no hub access, no cache) are skipped with a warning when a local file
    is given, and are an error otherwise.
    """
    metrics: Dict[str, Any] = {}
    results: Dict[str, Any] = {}
    common = dict(tokenizer=tokenizer, batch_size=cfg.mc_batch_size, limit=cfg.mc_limit)
    if cfg.mc_tasks:
        try:
            out = run_harness(model, tasks=list(cfg.mc_tasks), **common)
            metrics.update(out["metrics"])
            results.update(out["results"])
        except TaskDataUnreachable as err:
            if not cfg.mc_file:
                raise
            dist.log(f"warning: {err}; scoring only mc_file")
    if cfg.mc_file:
        with tempfile.TemporaryDirectory(prefix="ft-dist-mc-") as task_dir:
            out = run_harness(
                model, items_path=cfg.mc_file, task_dir=task_dir, task_name=_task_name(cfg.mc_file), **common
            )
        metrics.update(out["metrics"])
        results.update(out["results"])
    return {"metrics": metrics, "results": results}


def evaluate_model(
    cfg: EvalRunConfig,
    name: str,
    path: Optional[str],
    tokenizer: Any,
    data: PreparedData,
    world: dist.World,
    vocabulary: Optional[Set[str]],
) -> ModelResult:
    """Evaluate one model as cfg.mode says: mode=mc runs only the benchmarks, the others everything configured."""
    result = ModelResult(name)
    clock = time.perf_counter()
    replica = load_replica(cfg, path, tokenizer, world)
    model = replica.unwrapped()
    result.seconds["load"] = time.perf_counter() - clock
    if cfg.mode != "mc":
        clock = time.perf_counter()
        result.metrics.update(evaluate_loss(replica, data.test, tokenizer.pad_token_id, cfg.eval.batch_size))
        result.seconds["loss"] = time.perf_counter() - clock
        clock = time.perf_counter()
        task = task_metrics(model, tokenizer, data.test, cfg.eval, world.device)
        result.metrics.update(task["scores"])
        result.samples = task["samples"]
        result.seconds["generate"] = time.perf_counter() - clock
        if cfg.error_analysis and world.is_main:
            clock = time.perf_counter()
            result.errors = error_report(result.samples, vocabulary, worst=cfg.worst_examples)
            result.seconds["errors"] = time.perf_counter() - clock
    if (cfg.mc_tasks or cfg.mc_file) and world.is_main:
        clock = time.perf_counter()
        mc = multiple_choice(cfg, model, tokenizer)
        result.mc, result.mc_raw = mc["metrics"], mc["results"]
        result.seconds["mc"] = time.perf_counter() - clock
    result.seconds["total"] = sum(result.seconds.values())
    return result
