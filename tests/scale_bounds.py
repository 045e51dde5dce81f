"""The memory each rank may use in each phase of a run, per strategy: the bounds docs/architecture.md states.

Figures are host bytes on the CPU (where these tests run, every tensor lives in host memory), for bf16 mixed
precision with fp32 master weights and torch AdamW. The terms:
  P  parameters of the model, N ranks, U the largest unit gathered at once (a transformer block, or the embedding
     or LM head when they are bigger), c = 2 bytes per bf16 element;
  baseline: the rank's RSS before any model exists (interpreter, torch, transformers, DeepSpeed, process group),
     which the run records in memory.json;
  FSDP2 model states: 4 (fp32 params) + 4 (grads) + 8 (Adam) bytes per parameter, over N;
  ZeRO-3 model states: 2 (bf16 params) + 4 (fp32 master) + 8 (Adam) + 2 (the gradient partition, which DeepSpeed
     accumulates in bf16), over N.
Each bound is the states the phase holds, plus the phase's working set (gathered units and their gradients,
activations, I/O buffers), plus 10 % + 256 MiB for the allocator and everything that is not a tensor.

These formulas belong to the tests and the benchmark, not to ft-dist: the tests hold the code to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

GIB = 2**30
MIB = 2**20
SLACK_BYTES = 256 * MIB
SLACK_FRACTION = 0.10
CHECKPOINT_FILE_BYTES = 256 * MIB  # ft_dist.checkpoint.CHECKPOINT_FILE_BYTES: DCP copies one file of views at a time
ZERO3_SUB_GROUP = 50_000_000       # ft_dist.strategies.deepspeed.ZERO3_SUB_GROUP


@dataclass(frozen=True)
class Job:
    params: int
    largest_unit: int
    hidden: int
    layers: int
    vocab: int
    seq: int
    micro_batch: int
    max_shard_bytes: int

    @property
    def full_states(self) -> int:
        """Full fp32 weights + gradients + Adam moments of the whole model: what one replica would hold."""
        return 16 * self.params

    @property
    def activations(self) -> int:
        """Saved activations of a step (~40 bytes per token per layer per hidden unit in bf16, with the MLP) plus the
        logits in bf16 and their fp32 loss copies."""
        tokens = self.seq * self.micro_batch
        return 40 * tokens * self.hidden * self.layers + 10 * tokens * self.vocab


def phase_bounds(strategy: str, job: Job, world: int, baseline: int) -> Dict[str, int]:
    """Bytes per rank for each phase ft-train and ft-export record."""
    p, n, u, c = job.params, world, job.largest_unit, 2
    gather = 4 * c * u                       # FSDP2: two units in flight (prefetch), each as all-gather buffer + copy
    if strategy == "fsdp":
        weights, trained, released = 4 * p // n, 16 * p // n, 4 * p // n
        step_extra = (c + 4) * u             # one unit's unsharded gradient and its fp32 copy for the reduce
        optim_temp = 2 * 4 * u // n          # AdamW's sqrt(v) and quotient for the largest local shard
        between_steps = 12 * p // n          # gradients freed after each step
        load_extra = 2 * p // n              # this rank's slices of the memory-mapped bf16 checkpoint
        save_extra = 4 * u                   # DTensor shards own their storage: one tensor in flight
    elif strategy == "zero3":
        gather = 2 * c * u                   # ZeRO-3 gathers module by module: the largest, and one prefetched
        weights, trained, released = 16 * p // n, 16 * p // n, 8 * p // n
        step_extra = 2 * c * job.hidden ** 2  # reduce bucket (hidden^2 elements) and its copy
        optim_temp = 2 * 4 * min(ZERO3_SUB_GROUP, p // n)
        between_steps = 16 * p // n
        load_extra = 2 * p // n
        save_extra = CHECKPOINT_FILE_BYTES + 4 * u
    else:
        raise ValueError(strategy)
    tensors = {
        "build": weights + load_extra + 4 * u,
        "eval_before": weights + gather + job.activations,
        "train": trained + gather + step_extra + max(job.activations, optim_temp),
        "eval": between_steps + gather + job.activations,
        "save": between_steps + save_extra,
        "resume": trained + save_extra,
        "final_eval": released + gather + job.activations,
        "final_save": released + gather + job.max_shard_bytes + 4 * u,
    }
    return {k: int(baseline + v * (1 + SLACK_FRACTION) + SLACK_BYTES) for k, v in tensors.items()}


def export_bound(job: Job, baseline: int) -> int:
    """ft-export in one process: one block read from the checkpoint in fp32, its bf16 copy, one shard."""
    return int(baseline + (4 * job.largest_unit + 2 * job.largest_unit + job.max_shard_bytes) * (1 + SLACK_FRACTION)
               + SLACK_BYTES)
