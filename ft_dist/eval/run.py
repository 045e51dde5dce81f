"""`ft-eval` and `ft-generate`: score or query a base or finetuned model through the run's template."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict

from omegaconf import DictConfig

from ft_dist import dist
from ft_dist.checkpoint import atomic_write_text
from ft_dist.data.prepare import prepare_dataset
from ft_dist.data.templates import render_prompt
from ft_dist.errors import ConfigError
from ft_dist.eval.generation import generate as generate_texts
from ft_dist.eval.generation import task_metrics
from ft_dist.loop import evaluate_loss
from ft_dist.models import build_model, load_tokenizer
from ft_dist.strategies import build_strategy
from ft_dist.train import format_comparison, resolve_output_dir, seed_everything


def _checkpoint_dir(path: str) -> str:
    p = Path(path).expanduser()
    if (p / "final" / "config.json").exists():  # a run dir was given: use its final model
        p = p / "final"
    if not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
        raise ConfigError("checkpoint", f"expected a model directory with config.json (a run's final/), got {str(p)!r}")
    return str(p)


def _evaluate(cfg: DictConfig, path: Any, data: Any, world: dist.World) -> Dict[str, Any]:
    tokenizer = load_tokenizer(cfg.model, path)
    strategy = build_strategy(cfg, world)

    def make_model() -> Any:
        seed_everything(cfg.train.seed)  # a from-config base gets the same random init as the run's
        return build_model(cfg.model, tokenizer, path=path)

    strategy.setup(make_model, None)
    scores = evaluate_loss(strategy, data.test, tokenizer.pad_token_id, cfg.eval.batch_size)
    task = task_metrics(strategy.unwrapped(), tokenizer, data.test, cfg.eval, world.device)
    return {**task["scores"], **scores, "samples": task["samples"]}


def run(cfg: DictConfig) -> int:
    world = dist.init(cfg.device, cfg.strategy.backend)
    try:
        path = _checkpoint_dir(cfg.checkpoint) if cfg.checkpoint else None
        tokenizer = load_tokenizer(cfg.model, path)
        data = prepare_dataset(cfg.data, tokenizer)
        results: Dict[str, Any] = {}
        if path is None or cfg.compare_base:
            results["base"] = _evaluate(cfg, None, data, world)
        if path is not None:
            results["finetuned"] = _evaluate(cfg, path, data, world)
        if world.is_main:
            out_dir = resolve_output_dir(cfg)
            out_dir.mkdir(parents=True, exist_ok=True)
            summary = {k: {m: v for m, v in r.items() if m != "samples"} for k, r in results.items()}
            atomic_write_text(out_dir / "eval.json", json.dumps(summary, indent=2))
            if "finetuned" in summary:
                dist.log(format_comparison(summary.get("base"), summary["finetuned"]))
            else:
                dist.log(json.dumps(summary["base"], indent=2))
            dist.log(f"results: {out_dir / 'eval.json'}")
        return 0
    finally:
        dist.close()


def generate(cfg: DictConfig) -> int:
    world = dist.init(cfg.device, cfg.strategy.backend)
    try:
        path = _checkpoint_dir(cfg.checkpoint) if cfg.checkpoint else None
        tokenizer = load_tokenizer(cfg.model, path)
        seed_everything(cfg.train.seed)
        model = build_model(cfg.model, tokenizer, path=path).to(world.device)
        prompts = [cfg.prompt] if cfg.prompt is not None else [line.rstrip("\n") for line in sys.stdin if line.strip()]
        rendered = [render_prompt(cfg.data.template, p) for p in prompts]
        outs = generate_texts(model, tokenizer, rendered, cfg.eval.max_new_tokens, cfg.eval.batch_size, world.device,
                              progress=False)
        if world.is_main:
            for o in outs:
                print(o.text, flush=True)
        return 0
    finally:
        dist.close()
