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
from typing import Any, Callable, Dict, List, Optional

import torch

from ft_dist import dist
from ft_dist.data.batching import GlobalBatchSampler, collate, count_real_tokens
from ft_dist.data.prepare import PreparedData
from ft_dist.optim import build_scheduler
from ft_dist.strategies.base import Strategy
from ft_dist.tracking import Tracker


@dataclass
class LoopResult:
    steps: int
    train_losses: List[float] = field(default_factory=list)
    eval_history: List[Dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0


def total_steps(train_cfg: Any, steps_per_epoch: int) -> int:
    if train_cfg.max_steps > 0:
        return int(train_cfg.max_steps)
    return max(1, math.ceil(train_cfg.epochs * steps_per_epoch))


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process: allocated GPU memory, or the CPU process's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _to(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(strategy: Strategy, dataset: Any, pad_id: int, batch_size: int, max_batches: int = 0) -> Dict[str, float]:
    """Mean per-token loss and perplexity over (the first `max_batches` batches of) `dataset`, sharded over ranks."""
    model = strategy.model
    was_training = model.training
    model.eval()
    world = strategy.world
    n_batches = math.ceil(len(dataset) / batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    loss_sum, tokens = 0.0, 0.0
    for b in range(world.rank, n_batches, world.size):
        rows = dataset[b * batch_size:(b + 1) * batch_size]
        examples = [dict(input_ids=i, labels=l) for i, l in zip(rows["input_ids"], rows["labels"])]
        batch = _to(collate(examples, pad_id), world.device)
        with strategy.autocast():
            out = model(**batch, use_cache=False, num_items_in_batch=1)  # reduction: sum over tokens
        loss_sum += float(out.loss)
        tokens += float((batch["labels"] != -100).sum())
    loss_sum, tokens = dist.all_reduce_sum([loss_sum, tokens])
    if was_training:
        model.train()
    loss = loss_sum / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def train_loop(cfg: Any, strategy: Strategy, data: PreparedData, tracker: Tracker, pad_id: int,
               extra_eval: Optional[Callable[[], Dict[str, float]]] = None,
               on_step_end: Optional[Callable[[int], None]] = None) -> LoopResult:
    """Train for the configured steps; `extra_eval` adds metrics (e.g. a generation sample) at each periodic eval."""
    tc = cfg.train
    world = strategy.world
    sampler = GlobalBatchSampler(len(data.train), tc.micro_batch_size, tc.grad_accum, world.size, world.rank, tc.seed)
    steps = total_steps(tc, sampler.steps_per_epoch)
    scheduler = build_scheduler(strategy.optimizer, tc, steps)
    num_loss_tokens = data.train["num_loss_tokens"]
    result = LoopResult(steps=steps)
    dist.log(f"training: {steps} steps, global batch {sampler.global_batch} = micro {tc.micro_batch_size} x accum "
             f"{tc.grad_accum} x world {world.size}, {len(data.train)} train / {len(data.test)} test examples")
    strategy.model.train()
    tracker.start_progress(steps)
    start = time.time()
    window_tokens, window_start = 0.0, time.time()
    for step in range(steps):
        micro_batches = sampler.micro_batches(step)
        # Every rank can count the global batch's loss tokens from the precomputed column: no communication.
        n_global = sum(num_loss_tokens[i] for i in sampler.global_indices(step))
        loss_sum, tokens = 0.0, 0.0
        for a, indices in enumerate(micro_batches):
            rows = data.train[indices]
            examples = [dict(input_ids=i, labels=l) for i, l in zip(rows["input_ids"], rows["labels"])]
            batch = _to(collate(examples, pad_id), world.device)
            with strategy.autocast():
                out = strategy.model(**batch, use_cache=False, num_items_in_batch=n_global)
            # Data-parallel engines average gradients over replicas; scale so the result is the global-token mean.
            strategy.backward(out.loss * strategy.dp_size, sync=a == len(micro_batches) - 1)
            loss_sum += float(out.loss.detach())
            tokens += count_real_tokens(batch)
        grad_norm = strategy.step(tc.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        loss, tokens = dist.all_reduce_sum([loss_sum, tokens])
        result.train_losses.append(loss)
        result.tokens += int(tokens)
        window_tokens += tokens
        done = step + 1
        tracker.advance(1, {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"})
        if done % tc.log_every == 0 or done == steps:
            now = time.time()
            elapsed = now - start
            metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm,
                       "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                       "elapsed_s": elapsed, "eta_s": elapsed / done * (steps - done), "memory_gb": memory_gb(world.device)}
            tracker.log(done, metrics)
            window_tokens, window_start = 0.0, now
        if (tc.eval_every and done % tc.eval_every == 0) or done == steps:
            ev = evaluate_loss(strategy, data.test, pad_id, cfg.eval.batch_size, tc.eval_batches if done != steps else 0)
            if extra_eval is not None and done != steps:
                ev.update(extra_eval())
            ev["step"] = done
            result.eval_history.append(ev)
            tracker.log(done, {k: v for k, v in ev.items() if k != "step"})
            dist.log(f"step {done}/{steps}: eval_loss {ev['eval_loss']:.4f} (perplexity {ev['eval_perplexity']:.2f})")
        if on_step_end is not None:
            on_step_end(done)
    result.seconds = time.time() - start
    return result
