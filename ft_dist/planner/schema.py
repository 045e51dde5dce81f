"""Config schema of `ft-plan`: the model (from conf/model/) and the `plan` knobs. No torch imports here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional

from ft_dist.settings import setting

PlanStrategy = Literal[
    "single", "ddp", "fsdp", "fsdp_offload", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"
]


@dataclass
class PlanConfig:
    """What to plan. Fields left null are searched over."""

    tokens: float = setting(0.0, non_negative=True)
    """Dataset tokens (one epoch); the token budget is tokens x epochs. 0: a memory-only plan (no time or cost)."""
    epochs: float = setting(1.0, positive=True)
    instance: Optional[str] = None
    """One catalog instance (e.g. p4d.24xlarge); null: the whole catalog."""
    nodes: Optional[int] = setting(None, positive=True)
    """Number of nodes; null: search 1, 2, 4, 8."""
    strategy: Optional[str] = setting(None, choices=PlanStrategy)
    """single | ddp | fsdp | fsdp_offload | zero1 | zero2 | zero3 | zero2_offload | zero3_offload; null: search."""
    peft: str = setting("none", choices=("none", "lora", "qlora"))
    """none | lora | qlora (4-bit NF4 base)."""
    lora_rank: int = setting(16, positive=True)
    lora_targets: List[str] = field(default_factory=lambda: ["all-linear"])
    lora_dropout: float = setting(0.05, non_negative=True)
    """peft.dropout: above 0 each adapted projection keeps a dropped copy of its input for backward."""
    precision: str = setting("bf16", choices=("fp32", "fp16", "bf16", "pure_bf16"))
    """fp32 | fp16 | bf16 (mixed, fp32 master weights) | pure_bf16."""
    optimizer: str = setting("adamw", choices=("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw", "sgd"))
    """adamw | adamw_8bit | paged_adamw_8bit | paged_adamw (bitsandbytes; single and DDP) | sgd."""
    loss: str = setting("auto", choices=("auto", "chunked", "full"))
    """train.loss: auto (chunked where exact) | chunked | full."""
    checkpoint_every: int = setting(1, positive=True)
    """With activation checkpointing: only every k-th block recomputes (model.checkpoint_every)."""
    offload_activations: bool = False
    """train.offload_activations: saved activations in host memory."""
    seq_len: int = setting(2048, positive=True)
    micro_batch: Optional[int] = setting(None, positive=True)
    """null: search 1..32."""
    activation_checkpointing: Optional[bool] = None
    """null: try both."""
    attention: str = setting("sdpa", choices=("sdpa", "flash_attention_2", "eager"))
    """sdpa | flash_attention_2 | eager (eager materialises the s x s scores)."""
    global_batch: int = setting(64, positive=True)
    """Sequences per optimizer step; gradient accumulation makes it up."""
    headroom: float = 0.10
    """Share of GPU memory and host RAM kept free."""
    cuda_context_gib: float = 1.0
    fragmentation: float = 0.10
    mfu: Dict[str, float] = field(default_factory=dict)
    """Override the catalog's MFU per GPU generation, e.g. plan.mfu.ampere=0.5."""
    deadline_hours: Optional[float] = setting(None, positive=True)
    budget_usd: Optional[float] = setting(None, positive=True)
    trace: bool = False
    """Measure one training step of the real architecture under FakeTensorMode + MemTracker instead of estimating."""
    trace_layers: int = 2
    format: str = setting("table", choices=("table", "json"))
    """table | json."""
    top: int = setting(10, positive=True)
    """Rows of the ranked table."""
    output_dir: str = "plan_out"
    """Where the PNG chart, plan.yaml and launch.sh go; empty string: write nothing."""
    catalog: Optional[str] = None
    """Another catalog file with the layout of ft_dist/planner/catalog.yaml."""
