"""Per-GPU memory of a training step, by component, from the architecture and the setup (analytic mode).

The peak is the largest of three moments of a steady-state step (the second one: optimizer states exist and
zero_grad freed the gradients), as MemTracker sees them on real tensors:
  forward end / backward start: saved activations + the logits/loss buffers (+ gradients kept for accumulation);
  backward end: every gradient + the activations of the first block, still being used;
  optimizer step: every gradient + the optimizer's temporaries.
Model states (parameters, gradients, optimizer states) add to each, divided by the world size where the strategy
shards them. On a GPU, communication buckets, the CUDA context and allocator fragmentation come on top.

Model-state bytes for DeepSpeed follow its own accounting (stage_1_and_2.py / stage3.py estimators): 16-bit
parameters, an fp32 gradient partition, fp32 master weights and Adam moments; tests check equality with
`estimate_zero{2,3}_model_states_mem_needs_all_cold`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Tuple

from ft_dist.planner.activations import activation_phases
from ft_dist.planner.params import NF4_BYTES_PER_PARAM, Architecture
from ft_dist.planner.workload import TrainingSetup

GIB = 2**30

# Bucket sizes in elements of the 16-bit dtype, as ft-dist configures DeepSpeed (strategies/deepspeed.py, the rule
# transformers' "auto" uses): reduce and all-gather buckets of hidden^2, ZeRO-3 prefetch 0.9 hidden^2.


def ds_buckets(hidden: int) -> Dict[str, float]:
    return {"reduce": float(hidden * hidden), "allgather": float(hidden * hidden), "prefetch": 0.9 * hidden * hidden}


# DeepSpeed's estimators multiply host RAM by this (additional_buffer_factor) for pinned buffers and copies.
HOST_BUFFER_FACTOR = 1.5


@dataclass(frozen=True)
class GpuOverhead:
    """GPU-only memory that no tensor accounts for (docs/planner.md, "Allocated, reserved, device")."""

    cuda_context_bytes: float = 1.0 * GIB
    """CUDA context + cuBLAS/NCCL workspaces, outside the caching allocator (nvidia-smi sees it, torch does not);
    vram.asmirnov.xyz quotes 300 MiB-2 GiB, gpu_poor uses 650 MB."""
    fragmentation: float = 0.10
    """The caching allocator's reserve above the tensor peak: max_memory_reserved / max_memory_allocated - 1
    (environment.md saw 7-19 % on CPU)."""


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per GPU at the peak, by component, and host RAM per node.

    Three figures, each what a tool reports on a real GPU:
      allocated: the tensors (torch.cuda.max_memory_allocated);
      reserved:  allocated + the caching allocator's reserve (torch.cuda.max_memory_reserved);
      total:     reserved + the CUDA context (nvidia-smi's "used"): the figure that must fit the GPU.
    """

    params: int
    grads: int
    optimizer: int
    activations: int
    logits: int
    comm_buffers: int
    allocator: int
    cuda_context: int
    host_ram: int
    peak_phase: str
    model_states: int = 0
    """Parameters + gradients + optimizer states per GPU in steady state (all gradients present): the figure
    DeepSpeed's estimate_zero*_model_states_mem_needs print. The peak's own terms can hold fewer gradients."""

    @property
    def allocated(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.logits + self.comm_buffers

    @property
    def reserved(self) -> int:
        return self.allocated + self.allocator

    @property
    def total(self) -> int:
        return self.reserved + self.cuda_context

    def per_gpu(self) -> Dict[str, int]:
        out = {k: v for k, v in asdict(self).items() if k not in _NOT_TERMS}
        out.update(allocated=self.allocated, reserved=self.reserved, total=self.total)
        return out

    def largest_term(self) -> str:
        """The component that contributes most: what to cut when the total does not fit."""
        terms = {k: v for k, v in asdict(self).items() if k not in _NOT_TERMS}
        return max(terms, key=lambda k: terms[k])


_NOT_TERMS = ("host_ram", "peak_phase", "model_states")


@dataclass(frozen=True)
class ModelStates:
    """Per-GPU bytes of parameters, gradients and optimizer states (steady state, gradients all present)."""

    params: float
    grads: float
    optimizer: float
    host_ram: float


def trainable_params(arch: Architecture, setup: TrainingSetup) -> int:
    if setup.peft == "none":
        return arch.total_params
    return arch.lora_params(setup.lora_rank, list(setup.lora_targets))


def _frozen_weight_bytes(arch: Architecture, setup: TrainingSetup) -> float:
    """Frozen base weights (LoRA/QLoRA): stored in the compute dtype; QLoRA's block projections in NF4."""
    frozen = arch.total_params if setup.peft != "none" else 0
    if setup.peft == "qlora":
        quantized = arch.linear_params_in_blocks
        # PEFT's prepare_model_for_kbit_training upcasts the rest (embeddings, norms, head) to fp32.
        rest = 4 if setup.qlora_upcast or setup.precision == "fp32" else 2
        return quantized * NF4_BYTES_PER_PARAM + (frozen - quantized) * rest
    return frozen * (4 if setup.precision == "fp32" else 2)


def _optimizer_state_bytes(setup: TrainingSetup, weight_bytes: int) -> float:
    """Bytes of optimizer state per trainable parameter (torch keeps states in the parameter's dtype)."""
    if setup.optimizer in ("adamw", "adamw_foreach"):
        return 2 * weight_bytes
    if setup.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        return 2 * (1 + 4 / 2048)  # bitsandbytes: two uint8 moments + an fp32 absmax per 2048-element block
    if setup.optimizer == "paged_adamw":
        return 8  # bitsandbytes keeps fp32 moments; paged memory counts while resident (the worst case)
    return weight_bytes  # SGD momentum buffer


def model_states(arch: Architecture, setup: TrainingSetup) -> ModelStates:
    """Parameters, gradients and optimizer states per GPU, and host RAM per node, for `setup.strategy`."""
    if setup.deepspeed:
        return _deepspeed_states(arch, setup)
    n = setup.world_size if setup.fsdp else 1
    trainable = trainable_params(arch, setup)
    # Torch-native: trainable weights stay fp32 under autocast; pure bf16 stores them in bf16. PEFT keeps LoRA
    # adapters in fp32 whatever the base dtype (autocast_adapter_dtype=True).
    w = 2 if setup.precision == "pure_bf16" and (setup.peft == "none" or not setup.lora_fp32) else 4
    params = trainable * w + _frozen_weight_bytes(arch, setup)
    grads = trainable * w
    optimizer = trainable * _optimizer_state_bytes(setup, w)
    # Host RAM: under single/DDP every local rank materialises the model once while loading; FSDP2 builds on the
    # meta device and each rank reads only its own slices of the weights (strategies/fsdp.py).
    load = 0 if setup.fsdp else arch.total_params * (2 if w == 2 or setup.peft != "none" else 4) * setup.gpus_per_node
    if setup.strategy == "fsdp_offload":
        # FSDP2's CPUOffloadPolicy: the sharded fp32 parameters, their gradients and the optimizer states live in
        # (pinned) host memory and the optimizer steps there; the GPU holds only what is gathered (comm buffers).
        host = max(load, (params + grads + optimizer) / n * setup.gpus_per_node)
        return ModelStates(0.0, 0.0, 0.0, host * HOST_BUFFER_FACTOR)
    return ModelStates(params / n, grads / n, optimizer / n, load * HOST_BUFFER_FACTOR)


def _deepspeed_states(arch: Architecture, setup: TrainingSetup) -> ModelStates:
    """DeepSpeed ZeRO-1/2/3 (+ offload) bytes, itemised the way its estimators count them."""
    p, n, local = arch.total_params, setup.world_size, setup.gpus_per_node
    trainable = trainable_params(arch, setup)
    stage, offload = setup.zero_stage, setup.offload
    w = 4 if setup.precision == "fp32" else 2  # ZeRO keeps a 16-bit model copy and fp32 master weights
    master = 0 if w == 4 else 4
    opt_state = _optimizer_state_bytes(setup, 4)
    frozen = _frozen_weight_bytes(arch, setup)
    largest = arch.largest_layer_params
    if stage == 3:
        # The gathered 16-bit parameters and gradients of the largest module ("largest_layer_memory" = 4 x params).
        gathered = 2 * largest
        params = gathered + (0 if offload else (trainable * w + frozen) / n)
        # ZeRO-3 accumulates gradients straight into the fp32 partition (DeepSpeed counts no 16-bit partition).
        grads = gathered + (0 if offload else trainable * (4 if master else w) / n)
        optimizer = 0 if offload else trainable * (master + opt_state) / n
        if offload:  # offload_param + offload_optimizer, zero.Init: 16-bit params, fp32 grads, master, moments
            host = (trainable * (w + 4 + master + opt_state) + frozen) / setup.nodes
        else:  # zero.Init: each rank materialises one module at a time
            host = largest * 4 * local
    else:
        params = trainable * w + frozen  # the full 16-bit model on every GPU
        grad_16 = trainable * w / (n if stage == 2 else 1)
        grads = 0 if offload else grad_16 + trainable * (4 if master else 0) / n
        optimizer = 0 if offload else trainable * (master + opt_state) / n
        if offload:  # fp32 grads + master + moments of this node's ranks, or the fp32 load, whichever is larger
            host = max(p * 4 * local, trainable * (4 + master + opt_state) / setup.nodes)
        else:
            host = p * 4 * local
    return ModelStates(params, grads, optimizer, host * HOST_BUFFER_FACTOR)


def comm_buffer_bytes(arch: Architecture, setup: TrainingSetup) -> float:
    """Communication buffers beyond the model states (zero on one device)."""
    if setup.world_size == 1 and setup.strategy in ("single", "ddp", "fsdp"):  # fsdp_offload still stages on 1
        return 0.0
    trainable = trainable_params(arch, setup)
    c = setup.compute_bytes
    if setup.strategy == "ddp":
        # ft-dist's DDP sets gradient_as_bucket_view=True: the gradients are views into the all-reduce buckets,
        # so the buckets cost nothing beyond the gradients already counted.
        return 0.0
    if setup.fsdp:
        # FSDP2 all-gathers the next unit while computing this one, and reduce-scatters its gradients in fp32.
        # The units are the blocks and (untied) the embedding and the head (strategies/fsdp.py shard_units); the
        # head is the largest unit of a big-vocabulary model.
        unit = max(arch.block_params, arch.vocab * arch.hidden)
        return 2 * unit * c + unit * 4
    cap, buckets = arch.total_params, ds_buckets(arch.hidden)
    if setup.ds_bucket_elems is not None:
        buckets = dict(zip(("reduce", "allgather", "prefetch"), setup.ds_bucket_elems))
    if setup.zero_stage == 3:
        return (min(buckets["prefetch"], cap) + min(buckets["reduce"], cap)) * c
    return (min(buckets["reduce"], trainable) + min(buckets["allgather"], cap)) * c


def _optimizer_temp_bytes(arch: Architecture, setup: TrainingSetup, states: ModelStates) -> float:
    """Scratch of one optimizer step. GPU: torch's foreach AdamW materialises sqrt(v) for the whole group;
    CPU: the single-tensor path needs it for the largest tensor only. Offloaded optimizers run on the host."""
    if setup.optimizer == "sgd" or setup.offload:
        return 0.0
    if setup.device == "cuda":
        # ft-train's AdamW is fused on GPU and DeepSpeed's FusedAdam works in place: no temporaries.
        return states.grads if setup.optimizer == "adamw_foreach" else 0.0
    if setup.peft != "none":
        return 0.0
    return arch.vocab * arch.hidden * 4


def estimate_memory(arch: Architecture, setup: TrainingSetup, overhead: GpuOverhead = GpuOverhead()) -> MemoryBreakdown:
    """Peak bytes per GPU for one training step of `setup`, by component."""
    states = model_states(arch, setup)
    phases = activation_phases(arch, setup)
    grads_in_forward = states.grads if setup.grad_accum > 1 else 0.0
    candidates: Tuple[Tuple[str, float, float, float, float], ...] = (
        # name, grads live, activations, logits/loss buffers, optimizer temporaries
        ("forward end", grads_in_forward, phases.saved, phases.logits, 0.0),
        ("backward end", states.grads, phases.backward_end, 0.0, 0.0),
        ("optimizer step", states.grads, 0.0, 0.0, _optimizer_temp_bytes(arch, setup, states)),
    )
    name, grads, acts, logits, temp = max(candidates, key=lambda c: c[1] + c[2] + c[3] + c[4])
    comm = comm_buffer_bytes(arch, setup) if setup.device == "cuda" else 0.0
    tensors = states.params + grads + states.optimizer + temp + acts + logits + comm
    if setup.peft == "qlora" and setup.zero_stage == 3 and setup.world_size > 1:
        # QLoRA under FSDP2 / ZeRO-3: every rank loads the whole 4-bit base (transformers quantizes it as it reads
        # it, never under zero.Init) before it is sharded; that load can be the run's peak.
        loaded = _frozen_weight_bytes(arch, setup) + trainable_params(arch, setup) * 4
        if loaded > tensors:
            gpu = setup.device == "cuda"
            return MemoryBreakdown(
                params=int(loaded),
                grads=0,
                optimizer=0,
                activations=0,
                logits=0,
                comm_buffers=0,
                allocator=int(overhead.fragmentation * loaded) if gpu else 0,
                cuda_context=int(overhead.cuda_context_bytes) if gpu else 0,
                host_ram=int(states.host_ram),
                peak_phase="load (the whole 4-bit base on every rank, before sharding)",
                model_states=int(states.params + states.grads + states.optimizer),
            )
    gpu = setup.device == "cuda"
    return MemoryBreakdown(
        params=int(states.params),
        grads=int(grads),
        optimizer=int(states.optimizer + temp),
        activations=int(acts),
        logits=int(logits),
        comm_buffers=int(comm),
        allocator=int(overhead.fragmentation * tensors) if gpu else 0,
        cuda_context=int(overhead.cuda_context_bytes) if gpu else 0,
        host_ram=int(states.host_ram + phases.offloaded * setup.gpus_per_node),
        peak_phase=name,
        model_states=int(states.params + states.grads + states.optimizer),
    )


@dataclass(frozen=True)
class InferenceMemory:
    weights: int
    kv_cache: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead


def estimate_inference(
    arch: Architecture, batch: int, tokens: int, weight_bytes: float = 2, overhead: GpuOverhead = GpuOverhead()
) -> InferenceMemory:
    """Weights + KV cache (K and V per layer per token, in 16 bit) for `batch` sequences of `tokens` tokens."""
    weights = arch.total_params * weight_bytes
    kv = 2 * arch.layers * arch.kv_dim * batch * tokens * 2
    logits = batch * arch.vocab * 4  # the last position's logits in fp32
    extra = overhead.cuda_context_bytes + overhead.fragmentation * (weights + kv)
    return InferenceMemory(int(weights), int(kv), int(extra + logits))
