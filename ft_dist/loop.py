"""THE training loop: one loop for every strategy (single, DDP, FSDP2, DeepSpeed) and for full or LoRA finetuning.

Per optimizer step: take this rank's micro-batches of the global batch, forward under the strategy's autocast,
backward with gradient sync only on the last micro-batch, then let the strategy clip and step. The loss of every
micro-batch is a sum over its response tokens divided by the token count of the whole global batch, so the
step's loss and gradient are the exact per-token mean over the global batch, however it is split over ranks and
accumulation steps.

A step reads the device once: the loss and gradient norm stay on the device until the step's one all-reduce, whose
result (with the token counts and every rank's stop/save requests) is the only thing copied back to the host. The
batches were collated ahead by the data loader (ft_dist/data/loader.py) and go up without blocking.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ft_dist import dist, hooks
from ft_dist.checkpoint import CHECKPOINTS, CheckpointManager
from ft_dist.config import TrainConfig
from ft_dist.data.batching import GlobalBatchSampler, to_device
from ft_dist.data.loader import StepDataset, step_batches
from ft_dist.data.prepare import PreparedData
from ft_dist.errors import TrainingDiverged
from ft_dist.eval.loss import evaluate_loss
from ft_dist.flops import TrainingFlops, peak_flops, training_flops
from ft_dist.optim import build_scheduler
from ft_dist.phase_memory import PhaseMemory
from ft_dist.strategies.base import Strategy
from ft_dist.tracking import Tracker


@dataclass
class LoopResult:
    steps: int
    start_step: int = 0
    preempted: bool = False
    skipped_steps: int = 0
    train_losses: List[float] = field(default_factory=list)
    eval_history: List[Dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0


def total_steps(train_cfg: TrainConfig, steps_per_epoch: int) -> int:
    if train_cfg.max_steps > 0:
        return int(train_cfg.max_steps)
    return max(1, math.ceil(train_cfg.epochs * steps_per_epoch))


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process: allocated GPU memory, or the CPU process's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def forward_backward(
    strategy: Strategy, batches: List[Dict[str, torch.Tensor]], n_global: float, poison: bool = False
) -> torch.Tensor:
    """Forward and backward over one optimizer step's micro-batches (gradient sync on the last one only).

    Returns the step's loss on this rank as a device tensor (no host sync here). Each micro-batch's loss is its
    response-token sum over the global batch's token count, so the summed loss is the exact per-token mean.
    `poison` (tests) multiplies the loss by NaN, to drive the non-finite guard through backward and step.
    """
    total = torch.zeros((), device=strategy.world.device)
    for a, batch in enumerate(batches):
        loss = strategy.loss(batch, n_global)
        loss = loss * float("nan") if poison else loss
        # Data-parallel engines average gradients over replicas; scale so the result is the global-token mean.
        strategy.backward(loss * strategy.dp_size, sync=a == len(batches) - 1)
        total = total + loss.detach().float()
    return total


class _NonfiniteGuard:
    """Counts steps whose loss or gradient is NaN/Inf (their update is skipped) and stops the run after
    `train.nonfinite_limit` in a row, with a checkpoint of the weights from before the first bad one."""

    def __init__(self, tc: TrainConfig, strategy: Strategy, checkpoints: CheckpointManager) -> None:
        self.limit, self.strategy, self.checkpoints = tc.nonfinite_limit, strategy, checkpoints
        self.in_a_row = 0
        self.skipped = 0

    def update(self, loss: float, norm: Optional[float]) -> float:
        """Apply the step unless its loss or gradient norm is NaN/Inf (the update is then dropped); returns the
        gradient norm (from the engine where it clips inside its step, NaN if it never stepped)."""
        apply = math.isfinite(loss) and (norm is None or math.isfinite(norm))
        if apply or self.strategy.can_skip_steps:  # an engine that cannot skip is never asked to (check() stops)
            seen = self.strategy.step(apply=apply)
            norm = seen if seen is not None else norm
        return float("nan") if norm is None else norm

    def check(self, done: int, loss: float, grad_norm: float) -> bool:
        """Whether step `done` updated the weights; raises TrainingDiverged at the limit."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        # The update was skipped (torch-native strategies skip a non-finite gradient themselves), so the weights
        # are still those from before the first bad step: that is what a stop checkpoints.
        self.in_a_row += 1
        self.skipped += 1
        dist.log(
            f"step {done}: non-finite loss {loss} / grad norm {grad_norm}: update skipped ({self.in_a_row} in a row)"
        )
        if self.in_a_row >= self.limit or not self.strategy.can_skip_steps:
            first_bad = done - self.in_a_row + 1
            if first_bad > 1:
                self.checkpoints.save(first_bad - 1)
            raise TrainingDiverged(
                f"training diverged: {self.in_a_row} steps in a row with NaN/Inf loss or gradients "
                f"(first at step {first_bad}); lower train.lr or check the data. The weights "
                f"from before step {first_bad} are in {self.checkpoints.out_dir / CHECKPOINTS}"
            )
        return False


class _Throughput:
    """Tokens/s, TFLOP/s and MFU per device over the steps since the last log line, and the ETA from this
    attempt's rate. FLOPs are the model's (ft_dist/flops.py): non-pad tokens, each sequence's own attention span."""

    def __init__(self, start_step: int, steps: int, flops: TrainingFlops, peak: Optional[float], world: int) -> None:
        self.start_step, self.steps, self.flops, self.peak, self.world = start_step, steps, flops, peak, world
        self.start = self.window_start = time.time()
        self.window_tokens = self.window_flops = 0.0
        self.last: Dict[str, float] = {}

    def add(self, tokens: float, seq_sq: float) -> None:
        self.window_tokens += tokens
        self.window_flops += self.flops.step(tokens, seq_sq)

    def take(self, done: int) -> Dict[str, float]:
        now = time.time()
        seconds = max(now - self.window_start, 1e-9)
        flops_per_s = self.window_flops / seconds / self.world
        rates = {
            "tokens_per_s": self.window_tokens / seconds,
            "tokens_per_s_per_gpu": self.window_tokens / seconds / self.world,
            "tflops_per_gpu": flops_per_s / 1e12,
            **({"mfu": flops_per_s / self.peak} if self.peak else {}),
            "eta_s": (now - self.start) / (done - self.start_step) * (self.steps - done),
        }
        self.window_tokens = self.window_flops = 0.0
        self.window_start = now
        self.last = rates
        return rates

    def postfix(self) -> Dict[str, str]:
        """What the progress bar shows beside loss and lr, from the last log line."""
        if not self.last:
            return {}
        shown = {"tok/s/gpu": f"{self.last['tokens_per_s_per_gpu']:.0f}"}
        if "mfu" in self.last:
            shown["mfu"] = f"{100 * self.last['mfu']:.1f}%"
        return shown


def memory_metrics(device: torch.device) -> Dict[str, float]:
    """Peak memory beside the throughput: allocated and reserved GiB on a GPU, the process's max RSS on a CPU."""
    if device.type != "cuda":
        return {"memory_gb": memory_gb(device)}
    return {"memory_gb": memory_gb(device), "memory_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}


def train_loop(
    tc: TrainConfig,
    eval_batch_size: int,
    strategy: Strategy,
    data: PreparedData,
    tracker: Tracker,
    pad_id: int,
    checkpoints: CheckpointManager,
    extra_eval: Optional[Callable[[], Dict[str, float]]] = None,
    memory: Optional[PhaseMemory] = None,
    progress: Callable[..., None] = lambda phase, step=None: None,
    padding_free: bool = False,
) -> LoopResult:
    """Train for `tc`'s steps; `extra_eval` adds metrics (e.g. a generation sample) at each periodic eval.

    `memory` records the peak of each phase (train steps, eval, save, resume) on this rank; `progress(phase, step)`
    is told where the rank is between units of work (the hang watchdog's heartbeat). `checkpoints` resumes the
    run and decides when to save: every `train.save_every` steps / `train.save_minutes` minutes, and at the first
    step boundary after a preemption signal on any rank, after which the result says `preempted` (exit 85).
    `padding_free` lays each micro-batch out as one row for flash-attention's variable-length kernels.

    Over 80 lines on purpose: this is the one loop every strategy runs, and a step reads top to bottom here
    (data, forward/backward, the one all-reduce, update, log, eval, checkpoint); what is not the step itself is
    in the helpers above.
    """
    world = strategy.world
    sampler = GlobalBatchSampler(len(data.train), tc.micro_batch_size, tc.grad_accum, world.size, world.rank, tc.seed)
    steps = total_steps(tc, sampler.steps_per_epoch)
    scheduler = build_scheduler(strategy.optimizer, tc, steps)
    result = LoopResult(steps=steps)
    memory = memory or PhaseMemory(world.device)
    checkpoints.bind(strategy, scheduler, sampler.global_batch, memory, progress)
    start_step = result.start_step = checkpoints.restore(tracker)
    dist.log(
        f"training: {steps} steps, global batch {sampler.global_batch} = micro {tc.micro_batch_size} x accum "
        f"{tc.grad_accum} x world {world.size}, {len(data.train)} train / {len(data.test)} test examples"
    )
    strategy.model.train()
    tracker.start_progress(steps, initial=start_step)
    peak = peak_flops(world.device, tc.precision, tc.peak_tflops)
    throughput = _Throughput(start_step, steps, training_flops(strategy.unwrapped()), peak, world.size)
    guard = _NonfiniteGuard(tc, strategy, checkpoints)
    # Collated ahead, in the sampler's order: the data a step sees does not depend on when it was collated.
    dataset = StepDataset(data.train, sampler, pad_id, flatten=padding_free)
    pipeline = step_batches(dataset, range(start_step, steps), tc.num_workers, pin=world.device.type == "cuda")
    try:
        for step in range(start_step, steps):
            done = step + 1
            progress("data", done)
            ahead = next(pipeline)
            assert ahead.step == step, f"data pipeline out of order: got step {ahead.step} for step {step}"
            with memory.phase("train"):
                progress("forward/backward", done)
                batches = [to_device(b, world.device) for b in ahead.batches]
                poison = any(hooks.fire("nan_loss", step=done, rank=world.rank))
                loss_on_device = forward_backward(strategy, batches, ahead.n_global, poison=poison)
                norm_on_device = strategy.clip_gradients(tc.max_grad_norm)
                progress("loss all-reduce and optimizer step", done)
                # The step's one host sync: one all-reduce carries the loss, the token counts and every rank's stop/save
                # requests, and the (already global) gradient norm rides along, so the update is decided on the host.
                flags = [float(dist.preemption_signalled()), float(checkpoints.due_by_time())]
                loss, tokens, seq_sq, preempt, due, *norm = dist.step_sums(
                    [loss_on_device], [float(ahead.tokens), float(ahead.seq_sq), *flags], kept=norm_on_device
                )
                grad_norm = guard.update(loss, norm[0] if norm else None)
            lr = scheduler.get_last_lr()[0]
            if guard.check(done, loss, grad_norm):
                scheduler.step()
            result.skipped_steps = guard.skipped
            result.train_losses.append(loss)
            result.tokens += int(tokens)
            throughput.add(tokens, seq_sq)
            if done % tc.log_every == 0 or done == steps:
                metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm, **throughput.take(done)}
                tracker.log(done, {**metrics, "elapsed_s": tracker.elapsed(), **memory_metrics(world.device)})
            tracker.advance(1, {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", **throughput.postfix()})
            progress("after step", done)
            hooks.fire("after_step", step=done, rank=world.rank)
            if (tc.eval_every and done % tc.eval_every == 0) or done == steps:
                progress("eval", done)
                with memory.phase("eval"):
                    ev = evaluate_loss(
                        strategy, data.test, pad_id, eval_batch_size, tc.eval_batches if done != steps else 0
                    )
                    if extra_eval is not None and done != steps:
                        ev.update(extra_eval())
                result.eval_history.append({**ev, "step": done})
                tracker.log(done, ev)
                dist.log(
                    f"step {done}/{steps}: eval_loss {ev['eval_loss']:.4f} (perplexity {ev['eval_perplexity']:.2f})"
                )
            checkpoints.after_step(done, preempted=bool(preempt), due=bool(due))
            if preempt:
                dist.log(
                    f"preempted ({dist.preemption_source()}): checkpoint saved at step {done}; exiting with code 85 "
                    "(requeue; train.resume=auto continues)"
                )
                result.preempted = True
                break
    finally:  # a stop before the end (preemption, divergence) ends the collating workers or thread
        pipeline.close()
    if start_step >= steps:  # resumed a run that had already finished: just report where it stands
        with memory.phase("eval"):
            ev = evaluate_loss(strategy, data.test, pad_id, eval_batch_size)
        result.eval_history.append({**ev, "step": steps})
    result.seconds = time.time() - throughput.start
    return result
