"""The typed config schema: one dataclass per Hydra group (registered by ft_dist/commands/schema.py).

Hydra merges every YAML under `conf/` into these dataclasses, so a misspelt key or a value of the wrong type
fails at composition time. Each field declares its choices and range on itself (ft_dist/settings.py); `validate()`
checks those, then the combinations, and raises `ConfigError` naming the dotted key. Nothing here imports torch: a bad command line
must fail in well under a second, before any model or data is touched.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

from omegaconf import MISSING

from ft_dist.data.schema import DataConfig, validate_data
from ft_dist.errors import ConfigError
from ft_dist.eval.schema import EvalConfig
from ft_dist.settings import check_fields, setting

Attention = Literal["sdpa", "eager", "flash_attention_2"]
Optimizer = Literal["adamw", "sgd", "adamw_8bit", "paged_adamw_8bit", "paged_adamw"]
LossKind = Literal["auto", "chunked", "full"]
BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw")
"""train.optimizer values that bitsandbytes implements (ft_dist/optim.py)."""
Scheduler = Literal["cosine", "linear", "constant"]
Precision = Literal["fp32", "bf16", "fp16"]
StrategyName = Literal["single", "ddp", "fsdp", "deepspeed"]
Backend = Literal["auto", "nccl", "gloo"]
Offload = Literal["none", "cpu", "nvme"]
PeftMethod = Literal["none", "lora", "qlora"]
QuantType = Literal["nf4", "fp4"]
LoggerName = Literal["none", "wandb"]
LoggerMode = Literal["auto", "online", "offline"]
Device = Literal["auto", "cpu", "cuda"]


CHUNKED_LOSS_ARCHS = frozenset({"llama", "mistral", "qwen2", "gpt_neox"})
"""Architectures whose CausalLM forward is `logits = lm_head(hidden)` followed by the standard shifted
cross-entropy (no logit scaling or soft-capping), so `train.loss=chunked` is exact; checked in
tests/test_memory_features.py."""


@dataclass
class ModelConfig:
    """Which causal LM to finetune and how to build it."""

    name: str = MISSING
    """Short name used in run names and reports."""
    name_or_path: Optional[str] = None
    """HF hub id or local directory with weights. None: build from `arch` with random init."""
    from_config: bool = False
    """Ignore pretrained weights and build from `arch` with random init (smoke runs; never downloads)."""
    arch: Dict[str, Any] = field(default_factory=dict)
    """HF config fields (`model_type` first). Lets tests and the planner build the architecture offline."""
    config: Optional[str] = None
    """A local HF config.json: its fields become `arch` (and its directory's name `name`), so ft-plan and
    from-config builds take any architecture transformers can build, no conf/model/ entry needed."""
    tokenizer: Optional[str] = None
    """Tokenizer dir/id; `embedded:char` is ft-dist's built-in tokenizer; None: same as `name_or_path`."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off unless you trust the repository."""
    attn_implementation: str = setting("sdpa", choices=Attention)
    """sdpa | eager | flash_attention_2 (the `flash-attn` package, CUDA only; training batches are then laid out
    padding-free, one row per micro-batch, for its variable-length kernels)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% more compute."""
    checkpoint_every: int = setting(1, positive=True)
    """With gradient_checkpointing: recompute only every k-th transformer block (1: all of them). Selective: k=2
    keeps half the blocks' activations for half the recompute."""


@dataclass
class TrainConfig:
    """The optimisation schedule. Global batch = micro_batch_size x grad_accum x world size."""

    optimizer: str = setting("adamw", choices=Optimizer)
    """adamw (torch; fused on GPU) | sgd | adamw_8bit | paged_adamw_8bit | paged_adamw (bitsandbytes: 8-bit states,
    paged states, or both; single and DDP only)."""
    lr: float = setting(2e-5, positive=True)
    weight_decay: float = setting(0.0, non_negative=True)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    scheduler: str = setting("cosine", choices=Scheduler)
    """cosine | linear | constant, after linear warmup."""
    warmup_steps: int = setting(0, non_negative=True)
    max_steps: int = -1
    """Optimizer steps; -1 derives them from `epochs`."""
    epochs: float = setting(1.0, positive=True)
    # The batch layout may change on resume as long as the global batch stays (checked on its own).
    micro_batch_size: int = setting(8, positive=True, identity=False)
    grad_accum: int = setting(1, positive=True, identity=False)
    max_grad_norm: float = setting(1.0, non_negative=True)
    """Clip the global gradient norm; 0 disables clipping."""
    precision: str = setting("fp32", choices=Precision)
    """fp32 | bf16 | fp16 (fp16 uses dynamic loss scaling)."""
    # Both compute the same loss (to fp32 rounding), so a run may switch on resume.
    loss: str = setting("auto", choices=LossKind, identity=False)
    """chunked: cross-entropy from the hidden states in chunks, never the full [tokens x vocab] logits | full:
    transformers' loss over full logits | auto: chunked for the architectures where it is exact (CHUNKED_LOSS_ARCHS)."""
    loss_chunk_tokens: int = setting(1024, positive=True, identity=False)
    """Tokens per chunk of `chunked`: its peak is about 3 x this x vocab x 4 bytes."""
    offload_activations: bool = setting(False, identity=False)
    """Keep the activations saved for backward in pinned host memory and copy them back in backward (saved-tensor
    hooks): GPU memory traded for PCIe traffic. A CPU-only run has no other memory to move them to: no effect."""
    log_every: int = setting(10, positive=True, identity=False)
    eval_every: int = setting(0, non_negative=True, identity=False)
    """Eval loss every N steps (0: only at the end)."""
    eval_batches: int = setting(0, non_negative=True, identity=False)
    """Batches of the test split per periodic eval (0: all)."""
    save_every: int = setting(0, non_negative=True, identity=False)
    """Checkpoint every N steps (0: off)."""
    save_minutes: float = setting(0.0, non_negative=True, identity=False)
    """Also checkpoint when this many minutes passed since the last one (0: off)."""
    keep_checkpoints: int = setting(2, identity=False)
    """Keep the newest K complete checkpoints."""
    max_shard_gb: float = setting(2.0, positive=True, identity=False)
    """Largest safetensors file of the final HF model; the saving rank holds one such shard at a time."""
    resume: Optional[str] = setting("auto", identity=False)
    """auto: continue from the newest complete checkpoint in output_dir (fresh start if none) | a path | null."""
    resume_ignore_config: bool = setting(False, identity=False)
    """Resume even though the checkpoint's config differs from this run's (the differences are still printed)."""
    nonfinite_limit: int = setting(3, identity=False)
    """Skip steps whose loss or gradient is NaN/Inf; stop (exit 3) after this many in a row."""
    hang_timeout_s: float = setting(900.0, non_negative=True, identity=False)
    """Multi-process runs: when a rank makes no progress for this long during training, name it, dump every rank's
    stack into output_dir/heartbeat/ and exit 86 so the job restarts from its last checkpoint (0: off). Keep it
    above the longest step, eval or checkpoint save, and well under the scheduler's time limit."""
    heartbeat_s: float = setting(10.0, positive=True, identity=False)
    """How often each rank writes its heartbeat (and rank 0 checks them)."""
    seed: int = 42
    num_workers: int = setting(0, non_negative=True, identity=False)
    """DataLoader worker processes that collate the next steps' batches (0: one background thread does it). The
    data order is the sampler's either way."""
    compile: bool = setting(False, identity=False)
    """torch.compile each transformer block (single, DDP, FSDP2): the first steps pay the compile, later ones run
    fused kernels."""
    peak_tflops: float = setting(0.0, non_negative=True, identity=False)
    """Dense peak TFLOP/s of one device, for MFU. 0: the planner catalog's figure for the GPU the run is on (no
    MFU on CPU, which has no catalog figure; set it to get one)."""


@dataclass
class StrategyConfig:
    """How the model is placed on devices. The loop never branches on this; ft_dist/strategies does."""

    name: str = setting("single", choices=StrategyName)
    """single | ddp | fsdp | deepspeed."""
    backend: str = setting("auto", choices=Backend)
    """Process-group backend: auto (nccl on GPU, gloo on CPU) | nccl | gloo."""
    zero_stage: int = setting(0, non_negative=True)
    offload_optimizer: str = setting("none", choices=Offload)
    """none | cpu (DeepSpeed). nvme is refused: sharded checkpoints need the states in memory."""
    offload_params: str = setting("none", choices=Offload)
    nvme_path: Optional[str] = None
    cpu_offload: bool = False
    """FSDP2: keep sharded parameters on the CPU."""
    reshard_after_forward: bool = True


@dataclass
class PeftConfig:
    """Parameter-efficient finetuning (PEFT's LoRA; QLoRA over a bitsandbytes 4-bit base). none trains every weight."""

    method: str = setting("none", choices=PeftMethod)
    """none | lora | qlora (LoRA over a frozen 4-bit base; single, DDP, FSDP2, ZeRO-2/3 without offload)."""
    r: int = setting(16, positive=True)
    alpha: int = setting(32, positive=True)
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    seed: int = 1234
    """Seed for the adapters' initialisation."""
    merge_on_save: bool = True
    """Also write a merged full model beside the adapter (QLoRA: over the dequantized base)."""
    quant_type: str = setting("nf4", choices=QuantType)
    """qlora: the 4-bit data type (nf4: QLoRA's normal float)."""
    double_quant: bool = True
    """qlora: quantize the quantization constants too (about 0.37 bits per parameter saved)."""


@dataclass
class LoggerConfig:
    """Where metrics go besides stdout and metrics.jsonl."""

    name: str = setting("none", choices=LoggerName)
    """none | wandb."""
    project: str = "ft-dist"
    entity: Optional[str] = None
    group: Optional[str] = None
    mode: str = setting("auto", choices=LoggerMode)
    """auto (online only with WANDB_API_KEY, else offline) | online | offline."""
    tags: List[str] = field(default_factory=list)


@dataclass
class DryRunConfig:
    """Check a cluster job on one CPU before booking it: the same config and strategy code, on fake tensors and a
    fake process group, as rank 0 of `world_size` ranks (ft_dist/dry_run.py)."""

    world_size: int = setting(0, non_negative=True)
    """Ranks to simulate, e.g. 64 for 8 nodes x 8 GPUs; 0 runs the job for real."""
    gpus_per_node: int = 8
    """GPUs per node of the simulated cluster (the planner's nodes = world_size / gpus_per_node)."""
    steps: int = 2
    """Optimizer steps to simulate; the second is the steady state (optimizer states exist)."""
    fake_tensors: bool = True
    """False: real tensors on the fake process group, which allocates what rank 0 of the real job would (for
    checking the fake figures on a model small enough to hold)."""


@dataclass
class RunConfig:
    """A training run (`ft-train`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dry_run: DryRunConfig = field(default_factory=DryRunConfig)
    output_dir: str = MISSING
    """The run directory: config.yaml, metrics.jsonl, checkpoints/, final/."""
    device: str = setting("auto", choices=Device)
    """auto | cpu | cuda."""


def load_arch_file(model: ModelConfig) -> None:
    """`model.config=path/config.json`: read the file into `model.arch` (idempotent: checks run twice)."""
    if not model.config:
        return
    path = Path(model.config).expanduser()
    try:
        fields = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError("model.config", f"{path}: expected a readable HF config.json ({err})") from err
    if not isinstance(fields, dict) or "model_type" not in fields:
        raise ConfigError("model.config", f"{path}: expected a HF config.json with a model_type field")
    model.arch = fields
    model.name = path.resolve().parent.name


def validate(cfg: RunConfig) -> None:
    """Check what types cannot: the fields' declared choices and ranges, then combinations. Raises ConfigError
    naming the key. Works for every command schema built on RunConfig."""
    load_arch_file(cfg.model)
    check_fields(RunConfig, cfg)
    if cfg.train.keep_checkpoints < 1:
        raise ConfigError("train.keep_checkpoints", f"expected >= 1, got {cfg.train.keep_checkpoints}")
    if cfg.train.nonfinite_limit < 1:
        raise ConfigError("train.nonfinite_limit", f"expected >= 1, got {cfg.train.nonfinite_limit}")
    if cfg.train.max_steps == 0 or cfg.train.max_steps < -1:
        raise ConfigError("train.max_steps", f"expected a positive step count or -1, got {cfg.train.max_steps}")
    if cfg.train.hang_timeout_s and cfg.train.hang_timeout_s < 3 * cfg.train.heartbeat_s:
        # A heartbeat read by rank 0 can be a whole interval old: the timeout must span several.
        raise ConfigError(
            "train.hang_timeout_s",
            f"expected 0 (off) or >= 3 x train.heartbeat_s = "
            f"{3 * cfg.train.heartbeat_s:g}, got {cfg.train.hang_timeout_s:g}",
        )
    if not 0.0 <= cfg.peft.dropout < 1.0:
        raise ConfigError("peft.dropout", f"expected a value in [0, 1), got {cfg.peft.dropout}")
    if cfg.model.name_or_path is None and not cfg.model.arch:
        raise ConfigError("model.name_or_path", "expected a hub id or path, or `model.arch` to build from config")
    if (cfg.model.from_config or cfg.model.name_or_path is None) and "model_type" not in cfg.model.arch:
        raise ConfigError(
            "model.arch.model_type", "expected the HF model_type (e.g. llama, gpt_neox) to build from config"
        )
    if cfg.model.tokenizer is None and cfg.model.name_or_path is None:
        raise ConfigError("model.tokenizer", "expected a tokenizer path or id when the model has no name_or_path")
    model_type = cfg.model.arch.get("model_type") if cfg.model.arch else None
    if cfg.train.loss == "chunked" and not cfg.model.from_config and cfg.model.name_or_path:
        model_type = _local_model_type(cfg.model.name_or_path) or model_type
    if cfg.train.loss == "chunked" and model_type is not None and model_type not in CHUNKED_LOSS_ARCHS:
        raise ConfigError(
            "train.loss",
            f"chunked cross-entropy is exact only for {sorted(CHUNKED_LOSS_ARCHS)}, not model_type {model_type!r}; "
            "use train.loss=auto or full",
        )
    validate_data(cfg.data)
    sc = cfg.strategy
    if cfg.peft.method == "qlora":
        validate_qlora(cfg)
    if "nvme" in (sc.offload_optimizer, sc.offload_params):
        # Swapped-out optimizer states are not in memory, where sharded checkpoints (and their resume) read them.
        raise ConfigError(
            "strategy.offload_optimizer" if sc.offload_optimizer == "nvme" else "strategy.offload_params",
            "NVMe offload is not supported: ft-dist's sharded checkpoints read and write each rank's "
            "states in memory; use cpu (strategy=zero3_offload)",
        )
    if sc.zero_stage not in (0, 1, 2, 3):
        raise ConfigError("strategy.zero_stage", f"expected 0, 1, 2 or 3, got {sc.zero_stage}")
    if sc.name == "deepspeed" and sc.zero_stage == 0:
        raise ConfigError(
            "strategy.zero_stage", "expected 1, 2 or 3 with strategy.name=deepspeed (use strategy=ddp for no sharding)"
        )
    if sc.name != "deepspeed" and (sc.zero_stage or sc.offload_optimizer != "none" or sc.offload_params != "none"):
        raise ConfigError(
            "strategy.name", f"zero_stage and offload_* are DeepSpeed settings; got them with strategy {sc.name}"
        )
    if sc.offload_params != "none" and sc.zero_stage != 3:
        raise ConfigError("strategy.offload_params", "parameter offload needs ZeRO stage 3 (strategy=zero3_offload)")
    if cfg.train.optimizer in BNB_OPTIMIZERS and sc.name in ("fsdp", "deepspeed"):
        # bitsandbytes' update kernels have no DTensor sharding rule, and ZeRO hands the optimizer flat partitions
        # whose block-quantized states the name-keyed checkpoint fragments cannot be cut from.
        where = "FSDP2's DTensor shards" if sc.name == "fsdp" else "ZeRO's flat partitions"
        raise ConfigError(
            "train.optimizer",
            f"{cfg.train.optimizer} (bitsandbytes) cannot step {where}; use train.optimizer=adamw, whose "
            f"states {'FSDP2' if sc.name == 'fsdp' else 'ZeRO'} shards, or strategy=ddp or single to keep "
            f"{cfg.train.optimizer}",
        )
    if cfg.train.compile and sc.name == "deepspeed":
        raise ConfigError(
            "train.compile",
            "torch.compile per block runs under single, DDP and FSDP2; DeepSpeed's engine hooks every parameter, "
            "so use strategy=fsdp (the same sharding as ZeRO-3) or train.compile=false",
        )
    if cfg.model.attn_implementation == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError(
                "model.attn_implementation",
                "flash_attention_2 needs the flash-attn package (pip install flash-attn, on a CUDA machine); "
                "use sdpa, which needs nothing",
            )
    dr = getattr(cfg, "dry_run", None)
    if dr is not None and dr.world_size:
        validate_dry_run(cfg)


def _local_model_type(name_or_path: str) -> Optional[str]:
    """The model_type in a local model dir's config.json (None for a hub id: nothing is fetched to validate)."""
    import json

    config = os.path.join(os.path.expanduser(name_or_path), "config.json")
    try:
        with open(config) as fh:
            return json.load(fh).get("model_type")
    except (OSError, ValueError):
        return None


def validate_qlora(cfg: RunConfig) -> None:
    """QLoRA quantizes pretrained weights as they load, under the strategies that can hold 4-bit weights."""
    if cfg.model.from_config or cfg.model.name_or_path is None:
        raise ConfigError(
            "peft.method",
            "qlora quantizes pretrained weights as they load; set model.name_or_path to a saved model (and "
            "model.from_config=false), or use peft=lora for a model built from config",
        )
    sc = cfg.strategy
    if sc.name == "deepspeed" and "cpu" in (sc.offload_optimizer, sc.offload_params):
        raise ConfigError(
            "strategy", "qlora's 4-bit base and its small adapters stay on the GPU; use strategy=zero3 or zero2"
        )
    if sc.name == "fsdp" and sc.cpu_offload:
        raise ConfigError("strategy.cpu_offload", "qlora's 4-bit base stays on the GPU; use strategy.cpu_offload=false")
    dr = getattr(cfg, "dry_run", None)
    if dr is not None and dr.world_size:
        raise ConfigError(
            "dry_run.world_size", "a dry run cannot simulate qlora (bitsandbytes' 4-bit kernels need real tensors)"
        )


def validate_launched(cfg: RunConfig) -> None:
    """ft-train's pre-flight: `validate`, and the strategy against the processes that were launched, so a mismatch
    is one line before any data or model work (not a traceback after data preparation)."""
    validate(cfg)
    if not cfg.dry_run.world_size and cfg.strategy.name == "single" and launched_world_size() > 1:
        raise ConfigError("strategy", single_needs_one_process(launched_world_size()))


def launched_world_size() -> int:
    """The processes torchrun (or Slurm's srun, or deepspeed) started for this job; 1 outside a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def single_needs_one_process(world_size: int) -> str:
    return (
        f"single runs one process, but {world_size} were launched (WORLD_SIZE={world_size}); choose "
        "strategy=ddp, fsdp or a zero stage, or launch one process"
    )


def validate_dry_run(cfg: RunConfig) -> None:
    """What a dry run can simulate, refused in one line before anything is built."""
    dr, sc = cfg.dry_run, cfg.strategy
    if dr.world_size < 2:
        raise ConfigError(
            "dry_run.world_size", f"expected >= 2 ranks to simulate (0 for a real run), got {dr.world_size}"
        )
    if dr.gpus_per_node < 1 or (dr.world_size % dr.gpus_per_node and dr.world_size > dr.gpus_per_node):
        raise ConfigError(
            "dry_run.gpus_per_node", f"expected a divisor of dry_run.world_size={dr.world_size}, got {dr.gpus_per_node}"
        )
    if dr.steps < 1:
        raise ConfigError("dry_run.steps", f"expected >= 1, got {dr.steps}")
    if cfg.train.optimizer in BNB_OPTIMIZERS:
        raise ConfigError(
            "train.optimizer",
            f"a dry run cannot step {cfg.train.optimizer} (bitsandbytes' kernels need real tensors); dry-run with "
            "train.optimizer=adamw, and read 8-bit states off ft-plan",
        )
    if not (sc.name == "fsdp" or (sc.name == "deepspeed" and sc.zero_stage == 3)):
        raise ConfigError(
            "strategy",
            f"a dry run simulates the sharded strategies (strategy=fsdp or zero3), got "
            f"{sc.name}{' stage ' + str(sc.zero_stage) if sc.zero_stage else ''}; "
            "ft-plan gives the analytic figure for the others",
        )
    if sc.offload_params != "none" or sc.offload_optimizer != "none" or sc.cpu_offload:
        raise ConfigError(
            "strategy",
            "a dry run measures device memory; offloaded states live on the host, "
            "whose use ft-plan estimates: dry-run the same strategy without offload",
        )
    if not cfg.model.arch or "model_type" not in cfg.model.arch:
        raise ConfigError(
            "model.arch",
            "a dry run builds the model from its architecture (no weights are read); "
            "expected model.arch with the HF config fields, as in conf/model/",
        )
