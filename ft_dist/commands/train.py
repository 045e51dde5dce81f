"""`ft-train`: config -> data -> model -> strategy -> loop -> final model and before/after report.

This is the one place that wires the layers together; each step below is a call into its own module.
"""

from __future__ import annotations

import faulthandler
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, cast

from omegaconf import OmegaConf

from ft_dist import EXIT_REQUEUE, dist, dry_run, hooks
from ft_dist.checkpoint import CheckpointManager, atomic_write_text, config_yaml, save_final_model
from ft_dist.config import RunConfig
from ft_dist.data.prepare import PreparedData, prepare_dataset
from ft_dist.eval.compare import before_after_table
from ft_dist.eval.generation import task_metrics
from ft_dist.eval.schema import EvalConfig
from ft_dist.hf_weights import SAVE_DTYPES
from ft_dist.loop import LoopResult, train_loop
from ft_dist.models import ModelSpec, count_parameters, dequantized, load_tokenizer
from ft_dist.optim import build_optimizer
from ft_dist.phase_memory import PhaseMemory, format_phase_table
from ft_dist.planner.run_setup import format_self_check, self_check
from ft_dist.runtime import resolve_output_dir, seed_everything
from ft_dist.strategies import Strategy, build_strategy
from ft_dist.tracking import Tracker, scrub_secrets
from ft_dist.watchdog import Watchdog


def _observed(units: Any, out_dir: Path, rank: int) -> Any:
    """The final model's units as they stream past, shown to the "final_unit" test seam (ft_dist/hooks.py)."""
    for unit in units:
        hooks.fire("final_unit", unit=unit, rank=rank, out_dir=out_dir)
        yield unit
    hooks.fire("final_units_done", rank=rank, out_dir=out_dir)


def run(cfg: RunConfig) -> int:
    if cfg.dry_run.world_size:  # simulate the cluster job in this process (fake tensors, fake process group)
        return dry_run.run(cfg)
    # The watchdog (train.hang_timeout_s) names a stuck rank; collectives must not time out before it does.
    # A rank killed by a fatal signal (SIGSEGV, SIGABRT from native code) prints every Python thread's stack first.
    faulthandler.enable()
    world = dist.init(cfg.device, cfg.strategy.backend, min_timeout_s=cfg.train.hang_timeout_s + 120)
    dist.install_preemption_handlers()
    try:
        code = _train(cfg, world)
    except BaseException:
        # No barrier on the way out: the other ranks may never reach it, and the error must surface (torchrun
        # then ends them) rather than wait forever in close().
        dist.close(barrier=False)
        raise
    dist.close()
    return code


def _train(cfg: RunConfig, world: dist.World) -> int:
    out_dir = resolve_output_dir(cfg)
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", config_yaml(cfg))
    dist.log(f"run dir: {out_dir}")

    checkpoints = CheckpointManager(cfg, out_dir, world)  # finds and checks the checkpoint to resume, if any
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_dataset(cfg.data, tokenizer)
    dist.log(data.summary())

    strategy = build_strategy(cfg.strategy, cfg.train, world)
    memory = PhaseMemory(world.device)
    spec = ModelSpec(
        cfg.model,
        cfg.peft,
        tokenizer,
        seed=cfg.train.seed,
        compute_dtype=SAVE_DTYPES[cfg.train.precision],
        compile_blocks=cfg.train.compile,
    )
    seed_everything(cfg.train.seed)  # same random init on every rank and in every run
    with memory.phase("build"):
        strategy.setup(spec, lambda params: build_optimizer(params, cfg.train))
    counts = count_parameters(strategy.unwrapped())
    dist.log(
        f"model: {cfg.model.name}, {counts['total']:,} parameters, {counts['trainable']:,} trainable "
        f"({cfg.peft.method}), strategy {cfg.strategy.name}, precision {cfg.train.precision}, device {world.device}, "
        f"loss: {strategy.prepare_loss()}" + (", blocks torch.compiled for training steps" if cfg.train.compile else "")
    )

    container = scrub_secrets(OmegaConf.to_container(cfg, resolve=True))
    tracker = Tracker(out_dir, cfg.logger, container)
    report: Dict[str, Any] = {"parameters": counts, "data": data.record()}
    if cfg.eval.before_training:
        report["before"] = _before_training(cfg, strategy, tokenizer, data, memory, out_dir, checkpoints.resume_from)

    def sample_task_metric() -> Dict[str, float]:
        sample_cfg = cast(EvalConfig, OmegaConf.merge(cfg.eval, {"max_examples": cfg.eval.during_training}))
        model, synced = strategy.generation_model()
        scores = task_metrics(model, tokenizer, data.test, sample_cfg, world.device, synced=synced)["scores"]
        return {f"sample_{k}": v for k, v in scores.items() if isinstance(v, float)}

    seed_everything(cfg.train.seed)
    # Training is where ranks wait on each other step after step: a stalled one is named and the job ended.
    watchdog = (
        Watchdog(out_dir, world, cfg.train.hang_timeout_s, cfg.train.heartbeat_s)
        if world.distributed and cfg.train.hang_timeout_s
        else None
    )
    try:
        result = train_loop(
            cfg.train,
            cfg.eval.batch_size,
            strategy,
            data,
            tracker,
            tokenizer.pad_token_id,
            checkpoints,
            extra_eval=sample_task_metric if cfg.eval.during_training else None,
            memory=memory,
            padding_free=cfg.model.attn_implementation == "flash_attention_2",
            **({"progress": watchdog.progress} if watchdog else {}),
        )
    finally:
        if watchdog is not None:
            watchdog.stop()
    if result.preempted:
        tracker.close()
        if world.is_main:
            atomic_write_text(out_dir / "PREEMPTED", f"step {result.start_step + len(result.train_losses)}\n")
        return EXIT_REQUEUE
    if world.is_main and (out_dir / "PREEMPTED").exists():
        (out_dir / "PREEMPTED").unlink()
    return _finish(cfg, strategy, spec, tokenizer, data, memory, tracker, out_dir, result, report)


def _before_training(
    cfg: RunConfig,
    strategy: Strategy,
    tokenizer: Any,
    data: PreparedData,
    memory: PhaseMemory,
    out_dir: Path,
    resumed_from: Optional[Path],
) -> Dict[str, Any]:
    """The task metric of the base model, measured once per run (a resumed run reads the first attempt's)."""
    before_file = out_dir / "before.json"
    if resumed_from is not None and before_file.exists():
        return json.loads(before_file.read_text())
    model, synced = strategy.generation_model()
    with memory.phase("eval_before"):
        before = task_metrics(model, tokenizer, data.test, cfg.eval, strategy.world.device, synced=synced)
    if strategy.world.is_main:
        atomic_write_text(before_file, json.dumps(before["scores"]))
    dist.log(f"before finetuning: {json.dumps(before['scores'])}")
    return before["scores"]


def _finish(
    cfg: RunConfig,
    strategy: Strategy,
    spec: ModelSpec,
    tokenizer: Any,
    data: PreparedData,
    memory: PhaseMemory,
    tracker: Tracker,
    out_dir: Path,
    result: LoopResult,
    report: Dict[str, Any],
) -> int:
    """After the last step: the final eval, the HF model (streamed), memory per phase, eval.json and the table."""
    world = strategy.world
    strategy.release_optimizer()  # training is over: the final eval and save need the weights only
    model, synced = strategy.generation_model()
    with memory.phase("final_eval"):
        after = task_metrics(model, tokenizer, data.test, cfg.eval, world.device, synced=synced)
    after_scores = {**after["scores"], **{k: v for k, v in result.eval_history[-1].items() if k != "step"}}
    report.update(
        after=after_scores,
        train_seconds=result.seconds,
        tokens=result.tokens,
        steps=result.steps,
        final_train_loss=result.train_losses[-1] if result.train_losses else None,
        eval_history=result.eval_history,
    )

    final = out_dir / "final"
    twin = spec.build(meta=True)  # structure, config and LoRA layers for the writer; no memory
    with memory.phase("final_save"):
        save_final_model(
            _observed(strategy.gathered_units(), out_dir, world.rank),
            twin,
            tokenizer,
            cfg,
            final,
            write=world.is_main,
            max_shard_bytes=int(cfg.train.max_shard_gb * 2**30),
            dense=dequantized(strategy.unwrapped()) if spec.quantized else None,
        )
    records = memory.gather()
    report["memory"] = {"per_rank": records}
    # The planner's figure for this exact config beside the measured peak: every run is a validation point.
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
    try:
        check = self_check(cfg, world.size, local, world.device.type, records)
    except Exception as err:  # a planner gap must not fail a finished run; say so and keep the results
        dist.log(f"warning: planner self-check failed: {err}")
        check = None
    report["planner_check"] = check
    if world.is_main:
        atomic_write_text(out_dir / "memory.json", json.dumps({"unit": "bytes", "ranks": records}, indent=1))
        atomic_write_text(out_dir / "eval.json", json.dumps(report, indent=2))
        with (out_dir / "samples.jsonl").open("w") as fh:
            for s in after["samples"]:
                fh.write(json.dumps(s) + "\n")
        tracker.summary({f"final/{k}": v for k, v in after_scores.items() if isinstance(v, float)})
        if check:
            tracker.event(result.steps, "planner_check", **check)
            tracker.summary({f"planner_check/{k}": v for k, v in check.items()})
    dist.log(format_phase_table(records))
    dist.log(format_self_check(check))
    tracker.close()
    dist.log("\n" + before_after_table(report.get("before"), after_scores))
    dist.log(f"\nfinetuned model: {final}\nmetrics: {out_dir / 'metrics.jsonl'}")
    return 0
