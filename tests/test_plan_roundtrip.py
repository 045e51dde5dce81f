"""The written plan is the planned run: ft-plan's plan.yaml, run for 2 steps by ft-train, resolves to the very setup
the plan's memory figure was computed for, field by field (full / LoRA / QLoRA x single / FSDP2 / ZeRO-3)."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import compose_plan
from dist_utils import single, torchrun

pytestmark = pytest.mark.slow

# A catalog of two made-up GPUs the size of these CPU runs: one 1-GPU and one 2-GPU instance.
CATALOG = """
price_source_url: &price "test"
gpus:
  TEST-GPU: {memory_gb: 80, peak_tflops: {bf16: 100, fp16: 100, fp32: 10}, precisions: [fp32, fp16, bf16, pure_bf16], generation: ampere}
instances:
  test.1gpu: {gpu: TEST-GPU, gpus: 1, nvlink_gb_per_s: 0, network_gb_per_s: 1, host_ram_gb: 64, usd_per_hour: 1, price_date: "2026-12-02", price_source: *price}
  test.2gpu: {gpu: TEST-GPU, gpus: 2, nvlink_gb_per_s: 100, network_gb_per_s: 1, host_ram_gb: 64, usd_per_hour: 2, price_date: "2026-12-02", price_source: *price}
mfu: {ampere: 0.4}
"""
PEFT = {"full": ["plan.peft=none"], "lora": ["plan.peft=lora", "plan.lora_rank=4", "plan.lora_targets=[q_proj,v_proj]"],
        "qlora": ["plan.peft=qlora", "plan.lora_rank=8", "plan.lora_dropout=0"]}


@pytest.mark.parametrize("strategy", ["single", "fsdp", "zero3"])
@pytest.mark.parametrize("peft", ["full", "lora", "qlora"])
def test_written_plan_runs_as_planned(peft, strategy, model_dir, cache_dir, tmp_path, capsys):
    from ft_dist.commands.plan import run as plan
    from ft_dist.planner.run_setup import setup_of
    from ft_dist.planner.workload import TrainingSetup

    (tmp_path / "catalog.yaml").write_text(CATALOG)
    world = 1 if strategy == "single" else 2
    out = tmp_path / "plan"
    assert plan(compose_plan([
        f"model.config={model_dir / 'config.json'}", f"plan.catalog={tmp_path / 'catalog.yaml'}",
        f"plan.instance=test.{world}gpu", f"plan.strategy={strategy}", "plan.nodes=1", *PEFT[peft],
        "plan.precision=fp32", "plan.seq_len=256", "plan.micro_batch=2", "plan.global_batch=8",
        f"plan.activation_checkpointing={'true' if peft != 'full' else 'false'}", "plan.loss=chunked",
        f"plan.output_dir={out}"])) == 0
    capsys.readouterr()
    written = yaml.safe_load((out / "plan.yaml").read_text())
    run = tmp_path / "run"
    # Only what a CPU test needs on top: the tokenizer, a little data, 2 steps, no generation. None of it is a field
    # the plan's memory figure depends on.
    extra = ["model.tokenizer=embedded:char", f"data.cache_dir={cache_dir}", "data.limit=64", "data.test_size=8",
             "train.max_steps=2", "train.log_every=1", "eval.before_training=false", "eval.max_examples=2", "eval.max_new_tokens=2",
             f"output_dir={run}"]
    launch = single if world == 1 else (lambda a: torchrun(a, nproc=2))
    proc = launch([*written["overrides"], *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)] == [1, 2]

    # The run's own resolved config (config.yaml), read back as a setup, is the planned one field by field.
    from omegaconf import OmegaConf

    from ft_dist.config import RunConfig

    resolved = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(run / "config.yaml"))
    ran = setup_of(resolved, world, world, device="cuda")
    planned = TrainingSetup(**{k: tuple(v) if isinstance(v, list) else v for k, v in written["planned"].items()})
    assert ran == planned, {k: (getattr(ran, k), getattr(planned, k)) for k in planned.__dataclass_fields__
                            if getattr(ran, k) != getattr(planned, k)}
    planned_arch = json.loads((out / "config.json").read_text())
    assert {k: resolved.model.arch[k] for k in planned_arch} == planned_arch  # the architecture it planned
