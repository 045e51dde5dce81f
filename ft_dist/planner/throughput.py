"""Step time, tokens/s, hours and cost of a training setup on catalog hardware.

Compute: FLOPs per token / (MFU x peak). 6 N per token for full finetuning (2 N forward, 4 N backward: Transformer
Math 101), 4 N for LoRA (frozen weights skip their weight-gradient GEMMs), +2 N when activation checkpointing
recomputes the forward; attention adds 6 L (n_heads x head_dim) s per token (torchtitan's MFU formula).
Communication: ring collectives move 2 (n-1)/n of the buffer for an all-reduce and (n-1)/n for an all-gather or a
reduce-scatter, over NVLink within a node and the node's network share across nodes; it overlaps compute, so a
step takes the longer of the two. Offload adds the PCIe round trip of 16-bit gradients and parameters and the
host-side Adam, which do not overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ft_dist.planner.catalog import Instance
from ft_dist.planner.memory import trainable_params
from ft_dist.planner.params import Architecture
from ft_dist.planner.workload import TrainingSetup

PCIE_GB_PER_S = 12.0
"""Effective host<->GPU copy bandwidth per GPU (PCIe 3/4 x16 with pinned memory, below the 16/32 GB/s peak)."""
CPU_ADAM_PARAMS_PER_S = 2e9
"""Parameters per second DeepSpeed's CPUAdam updates per node (an assumption, not a published figure)."""


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    comm_s: float
    offload_s: float
    step_s: float
    tokens_per_step: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step / self.step_s


def matmul_params(arch: Architecture) -> int:
    """Weights that take part in a matmul per token: block projections and the output head (not the lookup)."""
    return arch.layers * sum(lin.fan_in * lin.fan_out for lin in arch.block_linears) + arch.vocab * arch.hidden


def flops_per_token(arch: Architecture, setup: TrainingSetup) -> float:
    """Training FLOPs per token, forward + backward (+ recompute)."""
    n = matmul_params(arch)
    attention = 6 * arch.layers * arch.q_dim * setup.seq_len
    per_n = 6 if setup.peft == "none" else 4
    flops: float = per_n * n + attention
    if setup.activation_checkpointing:
        flops += 2 * n + attention / 3
    return float(flops)


def _bandwidth(inst: Instance, nodes: int) -> float:
    """Bytes/s per GPU for collectives: the network share across nodes, NVLink within one."""
    nvlink = (inst.nvlink_gb_per_s or PCIE_GB_PER_S) * 1e9
    if nodes == 1:
        return nvlink
    return min(nvlink, inst.network_gb_per_s * 1e9 / inst.gpus)


def comm_bytes_per_step(arch: Architecture, setup: TrainingSetup) -> float:
    """Bytes each GPU sends per optimizer step."""
    n = setup.world_size
    if n == 1:
        return 0.0
    ring = (n - 1) / n
    trainable = trainable_params(arch, setup)
    if setup.zero_stage == 3:  # all-gather for forward and backward, reduce-scatter of gradients, per micro-batch
        return setup.grad_accum * ring * (2 * arch.total_params * setup.compute_bytes + trainable * setup.compute_bytes)
    grad_bytes = 4 if setup.precision in ("fp32",) or (setup.mixed and not setup.deepspeed) else 2
    if setup.zero_stage == 2:  # reduce-scatter every micro-batch, all-gather the updated 16-bit params once
        return ring * trainable * (setup.grad_accum * grad_bytes + setup.compute_bytes)
    return 2 * ring * trainable * grad_bytes  # DDP / ZeRO-1: one all-reduce (or RS + AG) per step


def step_time(arch: Architecture, setup: TrainingSetup, inst: Instance, mfu: Mapping[str, float]) -> StepTime:
    tokens_per_gpu = setup.tokens_per_micro_batch * setup.grad_accum
    compute = tokens_per_gpu * flops_per_token(arch, setup) / (mfu[inst.generation] * inst.peak_flops(setup.precision))
    comm = comm_bytes_per_step(arch, setup) / _bandwidth(inst, setup.nodes)
    offload = 0.0
    if setup.offload:
        trainable = trainable_params(arch, setup)
        moved = trainable / setup.world_size * 2 * 2  # 16-bit grads to the host, 16-bit params back
        if setup.zero_stage == 3:  # offloaded parameters also travel up for forward and backward
            moved += setup.grad_accum * 2 * arch.total_params * 2 / setup.world_size
        offload = moved / (PCIE_GB_PER_S * 1e9) + trainable / setup.nodes / CPU_ADAM_PARAMS_PER_S
    step = max(compute, comm) + offload
    return StepTime(compute, comm, offload, step, tokens_per_gpu * setup.world_size)
