"""What is being run: the training (or inference) setup the memory and time models take as input."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

from ft_dist.config import BNB_OPTIMIZERS

PRECISIONS = ("fp32", "fp16", "bf16", "pure_bf16")
"""fp16 / bf16: mixed precision (fp32 master weights); pure_bf16: weights, grads and optimizer states in bf16."""
OPTIMIZERS = ("adamw", *BNB_OPTIMIZERS, "sgd", "adamw_foreach")
"""adamw is ft-train's (fused on GPU: no temporaries); adamw_foreach is torch's default elsewhere (HF Trainer's
adamw_torch), whose step materialises a gradient-sized temporary: for planning other stacks' runs."""
LOSSES = ("auto", "chunked", "full", "fused", "full_16bit")
"""ft-train's (auto, chunked, full), and two other stacks use, for planning their runs (bench/planner_validation.py):
fused linear cross-entropy (Liger, Cut Cross-Entropy) and a loss in the compute dtype with no fp32 upcast."""
STRATEGIES = ("single", "ddp", "fsdp", "fsdp_offload", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")
PEFT_METHODS = ("none", "lora", "qlora")
ATTENTION = ("sdpa", "flash_attention_2", "eager")

DEEPSPEED = ("zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")


@dataclass(frozen=True)
class TrainingSetup:
    """One training configuration on one group of identical GPUs."""

    peft: str = "none"
    lora_rank: int = 16
    lora_targets: Tuple[str, ...] = ("all-linear",)
    lora_dropout: float = 0.05
    lora_fp32: bool = True
    """PEFT keeps adapters in fp32 over a 16-bit base (autocast_adapter_dtype); torchtune keeps them 16-bit."""
    qlora_upcast: bool = True
    """QLoRA: PEFT's prepare_model_for_kbit_training upcasts the non-quantized weights (embeddings, norms, head)
    to fp32, which also keeps the residual stream in fp32 (ft-train does this); torchtune does not."""
    qlora_keeps_inputs: bool = False
    """Older bitsandbytes releases' MatMul4Bit kept each 4-bit projection's input for backward (ctx.tensors =
    (A, B)); 0.50 keeps none (None, B). For planning runs made with those releases."""
    """peft.dropout (ft-train's default): above 0 every adapted projection saves its dropped input and the mask."""
    precision: str = "bf16"
    optimizer: str = "adamw"
    strategy: str = "single"
    nodes: int = 1
    gpus_per_node: int = 1
    micro_batch: int = 1
    seq_len: int = 2048
    grad_accum: int = 1
    activation_checkpointing: bool = False
    checkpoint_every: int = 1
    """With activation_checkpointing: only every k-th block recomputes (selective checkpointing)."""
    offload_activations: bool = False
    """Saved activations wait in host memory (train.offload_activations)."""
    loss: str = "auto"
    """auto | chunked | full (train.loss): chunked never holds more than `loss_chunk_tokens` tokens of logits;
    fused | full_16bit: other stacks' losses (LOSSES)."""
    loss_chunk_tokens: int = 1024
    attention: str = "sdpa"
    ds_bucket_elems: Optional[Tuple[float, float, float]] = None
    """DeepSpeed's reduce, all-gather and ZeRO-3 prefetch bucket sizes in elements; None: what ft-dist configures
    (hidden^2, hidden^2, 0.9 hidden^2). DeepSpeed's own defaults are (5e8, 5e8, 5e7)."""
    device: str = "cuda"
    """cuda: add the GPU-only terms (CUDA context, allocator, NCCL); cpu: tensor bytes only (checks vs MemTracker)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def deepspeed(self) -> bool:
        return self.strategy in DEEPSPEED

    @property
    def fsdp(self) -> bool:
        """FSDP2, with or without CPU offload (strategy.cpu_offload)."""
        return self.strategy in ("fsdp", "fsdp_offload")

    @property
    def zero_stage(self) -> int:
        """0 for torch-native strategies; FSDP2 full sharding behaves as stage 3."""
        if self.fsdp:
            return 3
        return int(self.strategy[4]) if self.deepspeed else 0

    @property
    def offload(self) -> bool:
        return self.strategy.endswith("_offload")

    @property
    def mixed(self) -> bool:
        return self.precision in ("fp16", "bf16")

    @property
    def compute_bytes(self) -> int:
        """Bytes of one activation element: 4 in fp32, 2 in any 16-bit mode."""
        return 4 if self.precision == "fp32" else 2

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch * self.seq_len

    def but(self, **changes) -> "TrainingSetup":
        """A copy with some fields changed."""
        return replace(self, **changes)
