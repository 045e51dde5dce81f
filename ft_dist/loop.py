"""THE training loop: one loop for every strategy (single, DDP, FSDP2, DeepSpeed) and for full or LoRA finetuning.

Per optimizer step: take this rank's micro-batches of the global batch, forward under the strategy's autocast,
backward with gradient sync only on the last micro-batch, then let the strategy clip and step. The loss of every
micro-batch is a sum over its response tokens divided by the token count of the whole global batch, so the
step's loss and gradient are the exact per-token mean over the global batch, however it is split over ranks and
accumulation steps.
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
from ft_dist.data.batching import GlobalBatchSampler, collate, count_real_tokens, examples_from_rows, to_device
from ft_dist.data.prepare import PreparedData
from ft_dist.errors import TrainingDiverged
from ft_dist.eval.loss import evaluate_loss
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

    def update(self, loss: float, max_grad_norm: float) -> float:
        """The optimizer step for this loss (skipped when it is not finite); the gradient norm (NaN if skipped)."""
        if math.isfinite(loss):
            return self.strategy.step(max_grad_norm)
        if self.strategy.can_skip_steps:
            self.strategy.skip_step()
        return float("nan")

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
    """Tokens per second over the steps since the last log line, and the ETA from this attempt's rate."""

    def __init__(self, start_step: int, steps: int) -> None:
        self.start_step, self.steps = start_step, steps
        self.start = self.window_start = time.time()
        self.window_tokens = 0.0

    def add(self, tokens: float) -> None:
        self.window_tokens += tokens

    def take(self, done: int) -> Dict[str, float]:
        now = time.time()
        rates = {
            "tokens_per_s": self.window_tokens / max(now - self.window_start, 1e-9),
            "eta_s": (now - self.start) / (done - self.start_step) * (self.steps - done),
        }
        self.window_tokens, self.window_start = 0.0, now
        return rates


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
) -> LoopResult:
    """Train for `tc`'s steps; `extra_eval` adds metrics (e.g. a generation sample) at each periodic eval.

    `memory` records the peak of each phase (train steps, eval, save, resume) on this rank; `progress(phase, step)`
    is told where the rank is between units of work (the hang watchdog's heartbeat). `checkpoints` resumes the
    run and decides when to save: every `train.save_every` steps / `train.save_minutes` minutes, and at the first
    step boundary after a preemption signal on any rank, after which the result says `preempted` (exit 85).

    Over 80 lines on purpose: this is the one loop every strategy runs, and a step reads top to bottom here
    (data, forward/backward, the one all-reduce, update, log, eval, checkpoint); what is not the step itself is
    in the helpers above.
    """
    world = strategy.world
    sampler = GlobalBatchSampler(len(data.train), tc.micro_batch_size, tc.grad_accum, world.size, world.rank, tc.seed)
    steps = total_steps(tc, sampler.steps_per_epoch)
    scheduler = build_scheduler(strategy.optimizer, tc, steps)
    num_loss_tokens = data.train["num_loss_tokens"]
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
    guard, throughput = _NonfiniteGuard(tc, strategy, checkpoints), _Throughput(start_step, steps)
    for step in range(start_step, steps):
        done = step + 1
        progress("data", done)
        # Every rank can count the global batch's loss tokens from the precomputed column: no communication.
        n_global = sum(num_loss_tokens[i] for i in sampler.global_indices(step))
        cpu_batches = [collate(examples_from_rows(data.train[rows]), pad_id) for rows in sampler.micro_batches(step)]
        with memory.phase("train"):
            progress("forward/backward", done)
            batches = [to_device(b, world.device) for b in cpu_batches]
            poison = any(hooks.fire("nan_loss", step=done, rank=world.rank))
            loss_sum = float(forward_backward(strategy, batches, n_global, poison=poison))
            progress("loss all-reduce and optimizer step", done)
            # One all-reduce per step carries the loss, the token count and every rank's stop/save requests.
            tokens = float(sum(count_real_tokens(b) for b in cpu_batches))
            flags = [float(dist.preemption_signalled()), float(checkpoints.due_by_time())]
            loss, tokens, preempt, due = dist.all_reduce_sum([loss_sum, tokens, *flags])
            grad_norm = guard.update(loss, tc.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        if guard.check(done, loss, grad_norm):
            scheduler.step()
        result.skipped_steps = guard.skipped
        result.train_losses.append(loss)
        result.tokens += int(tokens)
        throughput.add(tokens)
        tracker.advance(1, {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"})
        if done % tc.log_every == 0 or done == steps:
            metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm, **throughput.take(done)}
            tracker.log(done, {**metrics, "elapsed_s": tracker.elapsed(), "memory_gb": memory_gb(world.device)})
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
            dist.log(f"step {done}/{steps}: eval_loss {ev['eval_loss']:.4f} (perplexity {ev['eval_perplexity']:.2f})")
        checkpoints.after_step(done, preempted=bool(preempt), due=bool(due))
        if preempt:
            dist.log(
                f"preempted ({dist.preemption_source()}): checkpoint saved at step {done}; exiting with code 85 "
                "(requeue; train.resume=auto continues)"
            )
            result.preempted = True
            break
    if start_step >= steps:  # resumed a run that had already finished: just report where it stands
        with memory.phase("eval"):
            ev = evaluate_loss(strategy, data.test, pad_id, eval_batch_size)
        result.eval_history.append({**ev, "step": steps})
    result.seconds = time.time() - throughput.start
    return result
