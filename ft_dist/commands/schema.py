"""The primary config of each command, the checks that only a command can make, and their registration in
Hydra's ConfigStore.

Component configs (model, data, train, strategy, peft, eval, plan, cluster) live with their components and are
composed here into each command's schema. Nothing here imports torch: a bad command line fails in well under a
second, before any model or data is touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from ft_dist.cluster.schema import ClusterConfig
from ft_dist.config import ModelConfig, RunConfig, load_arch_file, validate
from ft_dist.data.schema import DataConfig, validate_data
from ft_dist.errors import ConfigError
from ft_dist.eval.run_schema import EvalRunConfig, GenerateRunConfig
from ft_dist.generate.schema import DataGenerateConfig
from ft_dist.planner.catalog import instance, load_catalog
from ft_dist.planner.schema import PlanConfig
from ft_dist.settings import check_fields, setting

# ft-train's schema is ft_dist.config.RunConfig.


@dataclass
class DataReportConfig:
    """`ft-data`: prepare a dataset exactly as training would, and report on it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Only the tokenizer is used."""
    data: DataConfig = field(default_factory=DataConfig)
    action: str = setting("report", choices=("report", "show"))
    """report (counts, lengths, flags) or show (examples with the tokens that get loss marked); `ft-data
    report|show data=...` sets it from the leading word."""
    output_dir: str = MISSING
    """Where report.json, report.md, lengths.png and flagged.jsonl go."""
    max_flagged: int = 20
    """Flagged responses (repetition, overly long) listed in the report."""
    long_ratio: float = 4.0
    """A response is overly long at more than this many times the median response's words."""
    show_examples: int = 3
    """How many training examples `ft-data show` renders."""


@dataclass
class PlanRunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


@dataclass
class SlurmLaunchConfig:
    """`launch/slurm.py` (ft-launch slurm): write and optionally submit the sbatch script for one training run."""

    defaults: List[Any] = field(default_factory=lambda: ["_self_", {"cluster": "local"}])
    """The cluster option comes after this schema's own values, so conf/cluster/<name>.yaml sets them."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    job_name: str = "ft-dist"
    """Slurm job name; also the default run directory's prefix."""
    run_dir: Optional[str] = None
    """The training run's output_dir (absolute after resolution); None: runs/<job_name>-<time>. The script, its log
    and every checkpoint live here, so a requeued job finds them again."""
    python: Optional[str] = None
    """Python on the compute nodes; None: the interpreter running this command (same venv on a shared filesystem)."""
    resume: bool = True
    """Add `train.resume=auto`, so a requeued job continues from the latest complete checkpoint."""
    submit: bool = False
    """Also run sbatch and print the job id (else only write the script)."""


@dataclass
class ExportConfig:
    """`ft-export`: turn a training checkpoint into an HF model directory."""

    checkpoint: str = MISSING
    """A checkpoints/step-<N> dir, or a run dir (its newest complete checkpoint)."""
    output: str = MISSING
    max_shard_gb: float = 2.0
    """Largest safetensors file written; export holds one shard and one transformer block at a time."""
    merge_lora: bool = True
    """For LoRA runs: also write the merged full model (the adapter goes to output/adapter either way)."""


def register_configs() -> None:
    """Every command's primary config, and the cluster group's schema, in Hydra's ConfigStore (once per process)."""
    cs = ConfigStore.instance()
    for name, node in (
        ("train_schema", RunConfig),
        ("eval_schema", EvalRunConfig),
        ("generate_schema", GenerateRunConfig),
        ("data_report_schema", DataReportConfig),
        ("data_generate_schema", DataGenerateConfig),
        ("plan_schema", PlanRunConfig),
        ("export_schema", ExportConfig),
        ("slurm_launch", SlurmLaunchConfig),
    ):
        cs.store(name=name, node=node)
    cs.store(group="cluster", name="cluster_schema", node=ClusterConfig)


def validate_eval_run(cfg: EvalRunConfig) -> None:
    """ft-eval's own checks, on top of `ft_dist.config.validate`; raises ConfigError naming the key."""
    validate(cfg)
    check_fields(EvalRunConfig, cfg)
    if cfg.mode == "compare" and len(cfg.checkpoints) < 2 and not (cfg.checkpoint and not cfg.checkpoints):
        raise ConfigError("checkpoints", "mode=compare needs two or more models, e.g. checkpoints=[base,runs/X]")
    if cfg.mode == "mc" and not cfg.mc_tasks and not cfg.mc_file:
        raise ConfigError("mc_file", "mode=mc needs mc_file=<items.jsonl> or mc_tasks=[arc_easy,...]")
    if cfg.mc_file and not Path(cfg.mc_file).expanduser().is_file():
        raise ConfigError("mc_file", f"expected a {{question, choices, answer}} JSONL file, got {cfg.mc_file!r}")
    if cfg.mc_limit is not None and cfg.mc_limit <= 0:
        raise ConfigError("mc_limit", f"expected a positive count or null, got {cfg.mc_limit}")
    if cfg.mc_batch_size <= 0:
        raise ConfigError("mc_batch_size", f"expected a value > 0, got {cfg.mc_batch_size}")
    if cfg.worst_examples < 0:
        raise ConfigError("worst_examples", f"expected a value >= 0, got {cfg.worst_examples}")


def validate_data_run(cfg: DataReportConfig) -> None:
    """Pre-flight checks of `ft-data` (conf/data.yaml)."""
    check_fields(DataReportConfig, cfg)
    if cfg.show_examples < 1:
        raise ConfigError("show_examples", f"expected >= 1, got {cfg.show_examples}")
    if cfg.model.tokenizer is None and cfg.model.name_or_path is None:
        raise ConfigError("model.tokenizer", "expected a tokenizer path or id (the report counts tokens)")
    validate_data(cfg.data)


def validate_generate_run(cfg: DataGenerateConfig) -> None:
    """Pre-flight checks of `ft-data generate` (conf/data_generate.yaml): every mistake that would otherwise surface
    after the model is loaded or the first request is sent (no inputs, no {chunk}, a wrong model path, an
    unreachable endpoint) is one line here, before torch is imported."""
    from ft_dist.generate.backends import check_endpoint, check_model_dir
    from ft_dist.generate.documents import input_files
    from ft_dist.generate.prompt import check_template

    check_fields(DataGenerateConfig, cfg)
    if cfg.chunk_overlap >= cfg.chunk_tokens:
        raise ConfigError(
            "chunk_overlap", f"expected fewer than chunk_tokens ({cfg.chunk_tokens}), got {cfg.chunk_overlap}"
        )
    check_template(cfg.prompt)
    input_files(list(cfg.inputs))
    gen = cfg.generate
    if gen.backend == "local":
        check_model_dir(gen.model_path)
    else:
        if not gen.base_url:
            raise ConfigError(
                "generate.base_url", "generate.backend=openai needs the endpoint, e.g. http://127.0.0.1:8000/v1"
            )
        if not (gen.model or gen.model_path):
            raise ConfigError("generate.model", "generate.backend=openai needs the served model's name")
        if not (gen.tokenizer or gen.model_path):
            raise ConfigError(
                "generate.tokenizer",
                "chunks are measured in the generator's tokens: set generate.tokenizer to its tokenizer",
            )
        check_endpoint(gen)
    if gen.tokenizer is not None and not Path(gen.tokenizer).expanduser().exists() and gen.tokenizer != "embedded:char":
        raise ConfigError("generate.tokenizer", f"expected a local tokenizer directory, got {gen.tokenizer!r}")


def validate_plan(cfg: PlanRunConfig) -> None:
    """Value checks beyond types; raise ConfigError naming the key. Cheap: runs before any heavy import."""
    plan = cfg.plan
    load_arch_file(cfg.model)
    check_fields(PlanConfig, plan, "plan.")
    if not plan.tokens and (plan.deadline_hours or plan.budget_usd):
        key = "plan.deadline_hours" if plan.deadline_hours else "plan.budget_usd"
        raise ConfigError(key, "a deadline or budget needs time and cost: set plan.tokens (dataset tokens, e.g. 1e8)")
    if not 0 <= plan.headroom < 1:
        raise ConfigError("plan.headroom", f"expected a share in [0, 1), got {plan.headroom}")
    if "model_type" not in cfg.model.arch:
        raise ConfigError("model.arch.model_type", "the planner builds from `arch`; this model config has none")
    if plan.instance is not None:
        instance(plan.instance, load_catalog(plan.catalog))
