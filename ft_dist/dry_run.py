"""The real cluster job, simulated in one CPU process: `ft-train ... dry_run.world_size=64`.

The same config builds the same strategy code (ft_dist/strategies) as rank 0 of `world_size` ranks, on a fake
process group (torch's `fake` backend: collectives return at once) and under FakeTensorMode (tensors have shapes,
dtypes and devices but no storage). So a 70B model on 64 ranks costs this process a few hundred MB, and what the
job would allocate per rank is measured, not estimated:
- the model is built on meta, sharded, given (fake) storage and an optimizer exactly as in a real run;
- `dry_run.steps` training steps run the loop's forward/backward on a batch of the configured shape, then the
  strategy's gradient clipping and optimizer step, under torch's FSDPMemTracker (per-category peaks);
- the steady-state step's collectives are counted by CommDebugMode and their bytes read at the dispatcher;
- the save path runs too: the checkpoint state dict, and the block-by-block gather of the final HF save.
The report puts the planner's prediction for the same config beside the measurement and names the differences.

What is not simulated: the CPU kernels stand in for the GPU's (so attention is CPU SDPA), and the CUDA context,
the allocator's reserve and NCCL's buffers are GPU-only terms the planner adds analytically. The loss scaler and
the non-finite-gradient check of a real step are host syncs on values a fake tensor does not have; they are
skipped (neither allocates), and so is gradient clipping, whose memory is one norm per tensor but which torch's
tracker misattributes on fake DTensors. `dry_run.fake_tensors=false` runs the same job on real tensors, clipping
included, to check the fake figures on a model small enough to hold (tests/test_dry_run.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, Iterator, cast

import torch
from omegaconf import OmegaConf

from ft_dist import dist
from ft_dist.atomic_io import atomic_write_text
from ft_dist.config import ModelConfig, RunConfig
from ft_dist.loop import forward_backward
from ft_dist.models import ModelSpec
from ft_dist.optim import build_optimizer
from ft_dist.planner.activations import activation_phases
from ft_dist.planner.memory import estimate_memory, model_states
from ft_dist.planner.params import architecture
from ft_dist.planner.run_setup import setup_of
from ft_dist.strategies import build_strategy

GIB = 2**30


class CollectiveBytes:
    """Counts the c10d collectives a step issues and their sizes, at the dispatcher (CommDebugMode counts only)."""

    # op -> (name, index of the full-size buffer, index of this rank's part)
    _OPS = {
        "_allgather_base_": ("all_gather", 0, 1),
        "_reduce_scatter_base_": ("reduce_scatter", 1, 0),
        "allreduce_": ("all_reduce", 0, 0),
        "broadcast_": ("broadcast", 0, 0),
        "allgather_": ("all_gather", 0, 1),
        "reduce_scatter_": ("reduce_scatter", 1, 0),
    }

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        stats: Dict[str, Dict[str, int]] = defaultdict(lambda: {"count": 0, "full_bytes": 0, "rank_bytes": 0})
        ops = self._OPS

        def nbytes(x: Any) -> int:
            if isinstance(x, (list, tuple)):
                return sum(nbytes(t) for t in x)
            return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                if getattr(func, "namespace", "") == "c10d":
                    spec = ops.get(func.__name__.split(".")[0])
                    if spec is not None:
                        name, full, part = spec
                        s = stats[name]
                        s["count"] += 1
                        s["full_bytes"] += nbytes(args[full])
                        s["rank_bytes"] += nbytes(args[part])
                return func(*args, **(kwargs or {}))

        self.mode, self.stats = Mode(), stats


def _peak(tracker: Any) -> Dict[str, int]:
    snap = tracker.get_tracker_snapshot("peak")
    cats = max(snap.values(), key=lambda c: c.get("Total", 0))
    return {str(getattr(k, "value", k)): int(v) for k, v in cats.items()}


def _local_bytes(tensors: Any) -> int:
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def _batch(cfg: RunConfig, vocab: int) -> Dict[str, torch.Tensor]:
    """One micro-batch of the configured shape with every row full (the most tokens a step can hold): packed rows
    carry position_ids, as the loop's collate builds them; unpacked full rows need no padding mask, so attention
    takes the causal kernel path a GPU run takes (a CPU trace of a padding mask would fall back to materialising
    seq x seq attention, which GPU kernels never do)."""
    mb, seq = cfg.train.micro_batch_size, cfg.data.max_seq_len
    ids = torch.randint(0, vocab, (mb, seq))
    if cfg.data.packing:
        return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(seq).repeat(mb, 1)}
    return {"input_ids": ids, "labels": ids.clone()}


@contextlib.contextmanager
def _fake_process_group(world_size: int) -> Iterator[dist.World]:
    import torch.distributed as tdist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    # DeepSpeed reads the rank from the environment, as a launcher would have set it.
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    tdist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    world = dist.World(rank=0, local_rank=0, size=world_size, device=torch.device("cpu"), launched=True)
    dist.set_world(world)
    try:
        yield world
    finally:
        dist.close()
        dist.set_world(dist.World())
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def planner_setup(cfg: RunConfig) -> Any:
    """The planner's TrainingSetup for exactly this run (tensor bytes only: device=cpu, no CUDA terms)."""

    dr = cfg.dry_run
    return setup_of(cfg, dr.world_size, min(dr.gpus_per_node, dr.world_size), device="cpu")


def simulate(cfg: RunConfig) -> Dict[str, Any]:
    """Build, train `dry_run.steps` steps and run the save path of the configured job as rank 0; the report."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    t0 = time.time()
    _single_sequences_under_fake_tensors(packed=bool(cfg.data.packing))
    model_cfg = cast(
        ModelConfig, OmegaConf.merge(cfg.model, {"from_config": True})
    )  # the architecture; nothing is read
    report: Dict[str, Any] = {
        "model": cfg.model.name,
        "strategy": _strategy_name(cfg),
        "world_size": cfg.dry_run.world_size,
        "precision": cfg.train.precision,
        "peft": cfg.peft.method,
        "micro_batch": cfg.train.micro_batch_size,
        "seq_len": cfg.data.max_seq_len,
        "grad_accum": cfg.train.grad_accum,
        "gradient_checkpointing": bool(cfg.model.gradient_checkpointing),
        "fake_tensors": bool(cfg.dry_run.fake_tensors),
    }
    real = not cfg.dry_run.fake_tensors
    # Under the fake process group the per-location warning registry is re-armed between calls (any change of the
    # filters does that), so a 70B ZeRO-3 step printed the same torch deprecation thousands of times. Show each once.
    warnings.simplefilter("once")
    with _fake_process_group(cfg.dry_run.world_size) as world, _deepspeed_on_fake_tensors(not real):
        dist.device_mesh("cpu")  # outside FakeTensorMode, where creating a mesh cannot run
        fake = contextlib.nullcontext() if real else FakeTensorMode(allow_non_fake_inputs=True)
        strategy = build_strategy(cfg.strategy, cfg.train, world)
        strategy.fake_mode = fake
        spec = ModelSpec(model_cfg, cfg.peft, None, seed=cfg.train.seed)
        strategy.setup(spec, lambda params: build_optimizer(params, cfg.train))
        params = list(strategy.unwrapped().parameters())
        report["parameters"] = sum(getattr(p, "ds_numel", 0) or p.numel() for p in params)
        report["trainable"] = sum(getattr(p, "ds_numel", 0) or p.numel() for p in params if p.requires_grad)
        report["build_seconds"] = round(time.time() - t0, 1)
        with fake:
            _train_steps(cfg, strategy, world, real, report)
    report["planner"] = _planner_side(cfg, report)
    report["seconds"] = round(time.time() - t0, 1)
    return report


def _strategy_name(cfg: RunConfig) -> str:
    return "fsdp" if cfg.strategy.name == "fsdp" else f"zero{cfg.strategy.zero_stage}"


def _tracker(strategy: Any) -> Any:
    """FSDP2: FSDPMemTracker (sharded/unsharded params, all-gather and reduce-scatter buffers); ZeRO-3: MemTracker
    told about DeepSpeed's flat fp32 partitions, which no module owns."""
    if _is_fsdp(strategy):
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

        return FSDPMemTracker(strategy.root, strategy.optimizer)
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    zero = strategy.engine.optimizer
    tracker.track_external(strategy.engine.module, strategy.optimizer, *zero.fp32_partitioned_groups_flat)
    return tracker


def _is_fsdp(strategy: Any) -> bool:
    return hasattr(strategy, "root")


def _train_steps(cfg: RunConfig, strategy: Any, world: dist.World, real: bool, report: Dict[str, Any]) -> None:
    """The loop's forward/backward on full batches of the configured shape, then the strategy's optimizer step."""
    from torch.distributed.tensor.debug import CommDebugMode

    model = strategy.unwrapped()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    batches = [_batch(cfg, base.config.vocab_size) for _ in range(cfg.train.grad_accum)]
    comm, sizes = CommDebugMode(), CollectiveBytes()
    params = list(model.parameters())
    n_tokens = float(sum(b["input_ids"].numel() for b in batches) * world.size)
    t1 = time.time()
    for step in range(cfg.dry_run.steps):
        # The last step is the steady state (optimizer states exist): its forward/backward and its optimizer step
        # are measured each under its own tracker, which starts from what is resident (params, states, inputs).
        last = step == cfg.dry_run.steps - 1
        tracker: Any = _tracker(strategy) if last else contextlib.nullcontext()
        if last and _is_fsdp(strategy):
            tracker.track_inputs(tuple(b["input_ids"] for b in batches))
        with tracker, comm if last else contextlib.nullcontext(), sizes.mode if last else contextlib.nullcontext():
            forward_backward(strategy, batches, n_tokens)
        if last:
            report["train_peak"] = _peak(tracker)
            grads = _local_bytes(p.grad for p in params if p.grad is not None)
        tracker = _tracker(strategy) if last else contextlib.nullcontext()
        with tracker:
            if _is_fsdp(strategy):
                if real:  # clipping is a global norm (a host sync); on fake tensors torch's clip mis-tracks
                    trainable = [p for p in params if p.requires_grad]  # and its memory is a norm per tensor
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.train.max_grad_norm or float("inf"))
                strategy.optimizer.step()
                strategy.optimizer.zero_grad(set_to_none=True)
            else:
                strategy.engine.step()  # clipping and the step, as in a real run (the norm is not read)
        if last:
            # Upper bound under fake tensors: they release an optimizer's per-tensor temporaries later than real
            # tensors do (tests/test_dry_run.py measures both).
            report["optimizer_step_peak"] = _peak(tracker)
    report["step_seconds"] = round((time.time() - t1) / cfg.dry_run.steps, 1)
    if _is_fsdp(strategy):
        opt_states = _local_bytes(
            v
            for s in strategy.optimizer.state.values()
            for v in s.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0
        )
        report["model_states"] = {"params": _local_bytes(params), "grads": grads, "optimizer": opt_states}
    else:
        report["model_states"] = _zero3_states(strategy)
    report["collectives"] = {k: dict(v) for k, v in sizes.stats.items()}
    report["collective_counts"] = {str(k): int(v) for k, v in comm.get_comm_counts().items()}
    report["save_peak"] = _save_path(strategy)


def _zero3_states(strategy: Any) -> Dict[str, int]:
    """ZeRO-3's own buffers on this rank: 16-bit partitions, fp32 master partitions, Adam moments, the fp32
    gradient partition."""
    zero = strategy.engine.optimizer
    params = list(strategy.engine.module.parameters())
    lp = _local_bytes(p.ds_tensor for p in params)
    master = _local_bytes(zero.fp32_partitioned_groups_flat)
    moments = _local_bytes(
        v for s in strategy.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0
    )
    grads = (
        _local_bytes([zero.grad_partitions_flat_buffer])
        if getattr(zero, "grad_partitions_flat_buffer", None) is not None
        else 4 * sum(p.ds_tensor.numel() for p in params if p.requires_grad)
    )
    return {"params": lp + master, "grads": grads, "optimizer": moments}


@contextlib.contextmanager
def _deepspeed_on_fake_tensors(active: bool) -> Iterator[None]:
    """DeepSpeed ZeRO-3 runs on fake tensors once two checks that read tensor values are bypassed: the
    non-finite gradient-norm test (a host sync on the norm) and the cross-rank agreement on the order of gathered
    parameters (an all-reduce whose result it reads). Neither allocates; both are restored afterwards."""
    if not active:
        yield
        return
    try:
        import deepspeed.runtime.zero.partitioned_param_coordinator as coordinator
        import deepspeed.runtime.zero.stage3 as stage3
    except ImportError:  # no DeepSpeed installed: only FSDP2 dry runs
        yield
        return
    import torch._dynamo  # noqa: F401  (imported later under zero.Init's patched Tensor.__new__ it fails)

    saved = (stage3.is_invalid_grad_norm, coordinator.assert_ints_same_as_other_ranks)
    stage3.is_invalid_grad_norm = lambda norm: False
    coordinator.assert_ints_same_as_other_ranks = lambda ints: None
    try:
        yield
    finally:
        stage3.is_invalid_grad_norm, coordinator.assert_ints_same_as_other_ranks = saved


def _save_path(strategy: Any) -> Dict[str, int]:
    """The checkpoint state dict (each rank's own shards) and the final save's gathers, under a fresh tracker."""
    tracker = _tracker(strategy)
    with tracker:
        state = strategy.checkpoint_state()
        for unit in strategy.gathered_units():
            del unit
    out = _peak(tracker)
    out["checkpoint_bytes"] = _state_bytes(state)
    return out


def _state_bytes(obj: Any) -> int:
    """Bytes of this rank's tensors in a (nested) checkpoint state: DTensor and ShardedTensor local parts."""
    if isinstance(obj, dict):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v) for v in obj)
    if hasattr(obj, "local_shards"):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in obj.local_shards())
    if isinstance(obj, torch.Tensor) and obj.dim() > 0:
        return _local_bytes([obj])
    return 0


def _planner_side(cfg: RunConfig, report: Dict[str, Any]) -> Dict[str, Any]:
    """The planner's figures for the same config, and the differences, each with its reason."""
    arch = architecture(cast(Dict[str, Any], OmegaConf.to_container(cfg.model.arch, resolve=True)))
    setup = planner_setup(cfg)
    states = model_states(arch, setup)
    peak = estimate_memory(arch, setup)
    acts = activation_phases(arch, setup)
    measured_states = sum(report["model_states"].values())
    planned_states = states.params + states.grads + states.optimizer
    named: Dict[str, int] = {}
    if setup.deepspeed:
        # DeepSpeed's estimators (which the planner follows) add the largest module gathered in 16 bit to both
        # params and grads: a working set, not a partition. And they count an fp32 gradient partition, where
        # DeepSpeed >= 0.1x accumulates bf16/fp16 gradients in the 16-bit dtype (fp32 only inside the step).
        named["largest_module_gathered"] = int(4 * arch.largest_layer_params)
        named["gradient_partition_fp32_vs_16bit"] = int(report["model_states"]["grads"]) if setup.mixed else 0
        planned_states -= named["largest_module_gathered"] + named["gradient_partition_fp32_vs_16bit"]
    tp = report["train_peak"]
    measured_acts = tp.get("Activation", 0) + tp.get("Temp", 0)
    planned_acts = peak.activations + peak.logits
    return {
        "params": int(states.params),
        "grads": int(states.grads),
        "optimizer": int(states.optimizer),
        "model_states": int(planned_states),
        "model_states_vs_measured": planned_states / measured_states - 1,
        "activations_saved": int(acts.saved),
        "logits": int(acts.logits),
        "peak_phase": peak.peak_phase,
        "activations_at_peak": int(planned_acts),
        "activations_vs_measured": planned_acts / max(measured_acts, 1) - 1,
        "peak_tensors": int(peak.total),
        "peak_vs_measured": peak.total / max(tp.get("Total", 1), 1) - 1,
        "named_differences": named,
        "not_in_the_planner": {
            "gathered_units": tp.get("Unsharded Param", 0) + tp.get("All Gather", 0),
            "reduce_scatter_buffers": tp.get("Reduce Scatter", 0) + tp.get("Unsharded Grad", 0),
        },
    }


def _single_sequences_under_fake_tensors(packed: bool) -> None:
    """transformers inspects position_ids to detect packed sequences; a fake tensor has no values, so it would assume
    packing and build a 4-D mask that an unpacked real run never builds (+4.9 GiB of activations on 70B). Tell it
    what the run does."""
    if packed:
        return
    import transformers.masking_utils as masking

    masking.find_packed_sequence_indices = lambda position_ids: None


def format_report(r: Dict[str, Any]) -> str:
    """The console table: measured per-rank peak by component, collectives, and the planner beside them."""
    g = lambda b: f"{b / GIB:8.2f}"  # noqa: E731
    tp, pl, st = r["train_peak"], r["planner"], r["model_states"]
    step = r.get("optimizer_step_peak", {})
    lines = [
        f"dry run: {r['model']} ({r['parameters']:,} parameters, {r['trainable']:,} trainable), {r['strategy']} "
        f"on {r['world_size']} ranks, {r['precision']}, micro-batch {r['micro_batch']} x seq {r['seq_len']} "
        f"x accum {r['grad_accum']}{', activation checkpointing' if r['gradient_checkpointing'] else ''} "
        f"({r['seconds']} s; fake tensors, fake process group)",
        "per-rank peak of a training step's forward and backward (torch's memory tracker, GiB):",
    ]
    lines += [f"  {k:<16}{g(v)}" for k, v in tp.items() if v and k != "Total"]
    lines.append(
        f"  {'total':<16}{g(tp['Total'])}   (forward/backward; optimizer step "
        f"{g(step.get('Total', 0)).strip()} GiB{', an upper bound on fake tensors' if r['fake_tensors'] else ''})"
    )
    lines.append(
        f"  save path peak {g(r['save_peak']['Total']).strip()} GiB, "
        f"checkpoint {g(r['save_peak']['checkpoint_bytes']).strip()} GiB written by this rank"
    )
    lines.append("collectives per step (this rank):")
    for name, c in r["collectives"].items():
        lines.append(
            f"  {name:<16}{c['count']:6d} calls, {c['full_bytes'] / 1e9:9.2f} GB gathered/reduced, "
            f"{c['rank_bytes'] / 1e9:8.2f} GB this rank's part"
        )
    lines.append(f"{'':<26}{'dry run':>10}{'planner':>10}{'diff':>9}")
    ms, ps = sum(st.values()), pl["model_states"]
    lines.append(f"  {'model states GiB':<24}{g(ms):>10}{g(ps):>10}{100 * pl['model_states_vs_measured']:+8.1f}%")
    ma = tp.get("Activation", 0) + tp.get("Temp", 0)
    lines.append(
        f"  {'activations GiB':<24}{g(ma):>10}{g(pl['activations_at_peak']):>10}"
        f"{100 * pl['activations_vs_measured']:+8.1f}%"
    )
    lines.append(
        f"  {'step peak GiB':<24}{g(tp['Total']):>10}{g(pl['peak_tensors']):>10}{100 * pl['peak_vs_measured']:+8.1f}%"
    )
    for term, nbytes in pl.get("named_differences", {}).items():
        lines.append(f"  planner term set aside for the comparison: {term.replace('_', ' ')} {nbytes / GIB:.2f} GiB")
    extra = pl["not_in_the_planner"]
    if any(extra.values()):
        lines.append(
            f"  the planner leaves out FSDP's gathered units ({extra['gathered_units'] / GIB:.2f} GiB) and "
            f"reduce-scatter buffers ({extra['reduce_scatter_buffers'] / GIB:.2f} GiB) in its tensor figure "
            "(it counts them as communication buffers on GPUs)"
        )
    return "\n".join(lines)


def run(cfg: RunConfig) -> int:
    """`ft-train ... dry_run.world_size=N`: simulate, print, and write dry_run.json in the output dir."""
    report = simulate(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "dry_run.json", json.dumps(report, indent=1))
    print(format_report(report), flush=True)
    print(f"report: {out / 'dry_run.json'}", flush=True)
    return 0
