"""`ft-eval` and `ft-generate`: score or query base and finetuned models through the run's template.

ft-eval modes (`mode=`):
- eval (default): the base model and/or a finetuned `checkpoint`: loss, perplexity, generation metrics, error
  analysis (and multiple choice when `mc_file` / `mc_tasks` are set), printed as a before/after table.
- compare: the same for every model in `checkpoints` (`base` and/or model dirs), one table with deltas, error
  counts and, with a judge, win rates and Elo ratings.
- mc: only the multiple-choice benchmarks, through lm-eval.

Outputs in `output_dir`: eval.json (metrics per model), samples-<model>.jsonl, errors-<model>.jsonl and .md (the
error report), mc-<model>.json (lm-eval's raw results) and, for compare, compare.json and compare.md.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple, cast

from ft_dist import dist
from ft_dist.checkpoint import atomic_write_text
from ft_dist.commands.schema import validate_eval_run
from ft_dist.data.prepare import prepare_dataset
from ft_dist.data.templates import render_prompt
from ft_dist.errors import ConfigError
from ft_dist.eval import compare
from ft_dist.eval.error_analysis import CATEGORIES, write_report
from ft_dist.eval.generation import generate as generate_texts
from ft_dist.eval.run_schema import EvalRunConfig, GenerateRunConfig
from ft_dist.eval.schema import BASE
from ft_dist.eval.suite import ModelResult, evaluate_model, vocabulary_of
from ft_dist.models import build_model, load_tokenizer
from ft_dist.runtime import resolve_output_dir, seed_everything

FINETUNED = "finetuned"


def _checkpoint_dir(path: str, key: str = "checkpoint") -> str:
    """The model dir of a run dir or model dir; ConfigError naming `key` when there is no model there."""
    p = Path(path).expanduser()
    if (p / "final" / "config.json").exists():  # a run dir was given: use its final model
        p = p / "final"
    if not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
        raise ConfigError(key, f"expected a model directory with config.json (a run's final/), got {str(p)!r}")
    return str(p)


def _label(path: str) -> str:
    """A short name for a model dir in tables and file names: the run dir's name for `<run>/final`."""
    p = Path(path).expanduser().resolve()
    return p.parent.name if p.name == "final" else p.name


def models_to_evaluate(cfg: EvalRunConfig) -> List[Tuple[str, Optional[str]]]:
    """(name, model dir or None for the base) of every model the mode evaluates, the baseline first."""
    if cfg.mode == "compare":
        # validate_eval_run: compare without `checkpoints` needs `checkpoint` set
        entries = list(cfg.checkpoints) or [BASE, cast(str, cfg.checkpoint)]
        models: List[Tuple[str, Optional[str]]] = []
        for entry in entries:
            path = None if entry == BASE else _checkpoint_dir(entry, "checkpoints")
            label = BASE if path is None else _label(path)
            # Two runs may share a dir name (x/run and y/run): number the later ones, names key the outputs.
            name, taken, i = label, {n for n, _ in models}, 2
            while name in taken:
                name, i = f"{label}-{i}", i + 1
            models.append((name, path))
        return models
    path = _checkpoint_dir(cfg.checkpoint) if cfg.checkpoint else None
    models = [(BASE, None)] if path is None or cfg.compare_base else []
    return models + ([(FINETUNED, path)] if path is not None else [])


def _file_name(model: str) -> str:
    return re.sub(r"[^\w.-]", "_", model)


def write_outputs(out_dir: Path, results: List[ModelResult]) -> None:
    """eval.json and the per-model samples, error reports and lm-eval results (rank 0)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {r.name: r.summary() for r in results}
    atomic_write_text(out_dir / "eval.json", json.dumps(summary, indent=2))
    for r in results:
        stem = _file_name(r.name)
        if r.samples:
            text = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in r.samples)
            atomic_write_text(out_dir / f"samples-{stem}.jsonl", text)
        if r.errors is not None:
            write_report(r.errors, out_dir / f"errors-{stem}.jsonl", out_dir / f"errors-{stem}.md")
        if r.mc_raw:
            atomic_write_text(out_dir / f"mc-{stem}.json", json.dumps(r.mc_raw, indent=2, default=str))


def _error_line(results: List[ModelResult]) -> str:
    shown = [r for r in results if r.errors is not None]
    if not shown:
        return ""
    names = " -> ".join(r.name for r in shown)
    # every r in `shown` has errors (filtered above)
    counts = ", ".join(
        f"{c} " + " -> ".join(str(cast(Dict[str, Any], r.errors)["counts"][c]) for r in shown) for c in CATEGORIES
    )
    return f"error categories ({names}, of {cast(Dict[str, Any], shown[-1].errors)['n']} answers): {counts}"


def _mc_table(results: List[ModelResult]) -> str:
    rows = [{"model": r.name, "task": task, **m} for r in results for task, m in r.mc.items()]
    return compare.format_table(rows)


def report(cfg: EvalRunConfig, results: List[ModelResult], vocabulary: Optional[Set[str]], out_dir: Path) -> None:
    """Print the mode's table and write compare.json / compare.md for mode=compare (rank 0)."""
    if cfg.mode == "compare":
        judge = compare.f1_judge if cfg.judge == "f1" else None
        outputs = {r.name: r.samples for r in results}
        table = compare.compare_models(outputs, {r.name: r.table_metrics() for r in results}, judge, vocabulary)
        text = compare.format_comparison(table)
        atomic_write_text(out_dir / "compare.json", json.dumps(table, indent=2))
        atomic_write_text(out_dir / "compare.md", text)
        dist.log(text)
    elif cfg.mode == "mc":
        dist.log(_mc_table(results))
    else:
        by_name = {r.name: r for r in results}
        if FINETUNED in by_name:
            before = by_name[BASE].table_metrics() if BASE in by_name else None
            dist.log(compare.before_after_table(before, by_name[FINETUNED].table_metrics()))
        else:
            dist.log(json.dumps(by_name[BASE].summary(), indent=2))
        if any(r.mc for r in results):
            dist.log(_mc_table(results))
    line = _error_line(results)
    if line:
        dist.log(line)
        written = ", ".join(str(out_dir / f"errors-{_file_name(r.name)}.md") for r in results if r.errors is not None)
        dist.log(f"error reports: {written} (worst examples; .jsonl beside each: every tagged answer)")
    dist.log(f"results: {out_dir / 'eval.json'}")


def run(cfg: EvalRunConfig) -> int:
    validate_eval_run(cfg)
    world = dist.init(cfg.device, cfg.strategy.backend)
    try:
        out_dir = resolve_output_dir(cfg)  # on every rank: it is a collective under torchrun
        results: List[ModelResult] = []
        vocabulary: Optional[Set[str]] = None
        for name, path in models_to_evaluate(cfg):
            tokenizer = load_tokenizer(cfg.model, path)
            data = prepare_dataset(cfg.data, tokenizer)  # cached per tokenizer: a second model reuses it
            if vocabulary is None and cfg.error_analysis and cfg.mode != "mc" and world.is_main:
                vocabulary = vocabulary_of(data)
            dist.log(f"evaluating {name}: {path or 'base model ' + cfg.model.name}")
            results.append(evaluate_model(cfg, name, path, tokenizer, data, world, vocabulary))
        if world.is_main:
            write_outputs(out_dir, results)
            report(cfg, results, vocabulary, out_dir)
        return 0
    finally:
        dist.close()


def generate(cfg: GenerateRunConfig) -> int:
    world = dist.init(cfg.device, cfg.strategy.backend)
    try:
        path = _checkpoint_dir(cfg.checkpoint) if cfg.checkpoint else None
        tokenizer = load_tokenizer(cfg.model, path)
        seed_everything(cfg.train.seed)
        model = build_model(cfg.model, tokenizer, path=path).to(world.device)
        prompts = [cfg.prompt] if cfg.prompt is not None else [line.rstrip("\n") for line in sys.stdin if line.strip()]
        rendered = [render_prompt(cfg.data.template, p) for p in prompts]
        outs = generate_texts(
            model, tokenizer, rendered, cfg.eval.max_new_tokens, cfg.eval.batch_size, world.device, progress=False
        )
        if world.is_main:
            for o in outs:
                print(o.text, flush=True)
        return 0
    finally:
        dist.close()
