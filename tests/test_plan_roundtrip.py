"""The written plan is the planned run: ft-plan's plan.yaml, run for 2 steps by ft-train, resolves to the very setup
the plan's memory figure was computed for, field by field (full / LoRA / QLoRA x single / FSDP2 / ZeRO-3).

Planning takes a fraction of a second and the 2-step runs do not depend on each other, while most of each run is
start-up: the first case to ask plans every selected case and starts all their runs side by side (`planned_runs`,
at most PARALLEL_RANKS ranks at once); each case then checks its own.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import pytest
import yaml
from conftest import compose_plan
from dist_utils import free_port, single, torchrun

pytestmark = pytest.mark.slow

# A catalog of two made-up GPUs the size of these CPU runs: one 1-GPU and one 2-GPU instance.
CATALOG = """
price_source_url: &price "test"
gpus:
  TEST-GPU: {memory_gb: 80, peak_tflops: {bf16: 100, fp16: 100, fp32: 10}, precisions: [fp32, fp16, bf16, pure_bf16],
             generation: ampere}
instances:
  test.1gpu: {gpu: TEST-GPU, gpus: 1, nvlink_gb_per_s: 0, network_gb_per_s: 1, host_ram_gb: 64, usd_per_hour: 1,
              price_date: "2026-12-02", price_source: *price}
  test.2gpu: {gpu: TEST-GPU, gpus: 2, nvlink_gb_per_s: 100, network_gb_per_s: 1, host_ram_gb: 64, usd_per_hour: 2,
              price_date: "2026-12-02", price_source: *price}
mfu: {ampere: 0.4}
"""
PEFT = {"full": ["plan.peft=none"], "lora": ["plan.peft=lora", "plan.lora_rank=4", "plan.lora_targets=[q_proj,v_proj]"],
        "qlora": ["plan.peft=qlora", "plan.lora_rank=8", "plan.lora_dropout=0"]}
# Ranks of runs at once. Twice the cores: a run leaves cores idle for seconds (torchrun's agent importing torch,
# rank 0 alone preparing data or writing the model, a single process on one core).
PARALLEL_RANKS = int(os.environ.get("FT_DIST_TEST_PARALLEL_RANKS") or min(8, 2 * len(os.sched_getaffinity(0))))


class RankBudget:
    """At most `ranks` ranks of the commands run through it at a time, first come first served."""

    def __init__(self, ranks: int) -> None:
        self.free = self.ranks = max(1, ranks)
        self.cond = threading.Condition()
        self.turn = self.tickets = 0
        self.ports: set = set()

    def run(self, ranks: int, command: Callable[[int], Any]) -> Any:
        """command(port): the port is free and no other command of this budget was given it."""
        ranks = min(ranks, self.ranks)
        with self.cond:
            ticket = self.tickets
            self.tickets += 1
            self.cond.wait_for(lambda: self.turn == ticket and self.free >= ranks)
            self.turn += 1
            self.free -= ranks
            port = free_port()
            while port in self.ports:
                port = free_port()
            self.ports.add(port)
            self.cond.notify_all()
        try:
            return command(port)
        finally:
            with self.cond:
                self.free += ranks
                self.cond.notify_all()


def plan_case(peft: str, strategy: str, model_dir: Path, directory: Path) -> Tuple[int, Path]:
    """ft-plan for this case, in this process: (its exit code, its output dir)."""
    from ft_dist.commands.plan import run as plan

    (directory / "catalog.yaml").write_text(CATALOG)
    world = 1 if strategy == "single" else 2
    out = directory / "plan"
    code = plan(compose_plan([
        f"model.config={model_dir / 'config.json'}", f"plan.catalog={directory / 'catalog.yaml'}",
        f"plan.instance=test.{world}gpu", f"plan.strategy={strategy}", "plan.nodes=1", *PEFT[peft],
        "plan.precision=fp32", "plan.seq_len=256", "plan.micro_batch=2", "plan.global_batch=8",
        f"plan.activation_checkpointing={'true' if peft != 'full' else 'false'}", "plan.loss=chunked",
        f"plan.output_dir={out}"]))
    return code, out


@pytest.fixture(scope="module")
def planned_runs(request, model_dir, cache_dir, tmp_path_factory):
    """(peft, strategy) -> (the plan's exit code or exception, its dir, the run's dir, the run's future)."""
    budget = RankBudget(PARALLEL_RANKS)
    pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="planned-run")
    cases: Dict[Tuple[str, str], Tuple[Any, Path, Path, Future]] = {}

    def start(peft: str, strategy: str) -> Tuple[Any, Path, Path, Future]:
        if (peft, strategy) not in cases:
            directory = tmp_path_factory.mktemp(f"{peft}-{strategy}")
            code: Any
            out, run = directory / "plan", directory / "run"
            try:
                code, out = plan_case(peft, strategy, model_dir, directory)
            except Exception as err:  # the case's own test raises it
                code = err
            world = 1 if strategy == "single" else 2
            job: Future = Future()
            if code == 0:
                written = yaml.safe_load((out / "plan.yaml").read_text())
                # Only what a CPU test needs on top: the tokenizer, a little data, 2 steps, no generation. None of it
                # is a field the plan's memory figure depends on.
                extra = ["model.tokenizer=embedded:char", f"data.cache_dir={cache_dir}", "data.limit=64",
                         "data.test_size=8", "train.max_steps=2", "train.log_every=1", "eval.before_training=false",
                         "eval.max_examples=2", "eval.max_new_tokens=2", f"output_dir={run}"]
                a = [*written["overrides"], *extra]

                def launch(port: int):
                    if world == 1:
                        return single(a)
                    return torchrun(a, nproc=2, launcher=[sys.executable, "-m", "torch.distributed.run",
                                                          "--nproc_per_node", "2", "--master_port", str(port)])

                job = pool.submit(budget.run, world, launch)
            cases[peft, strategy] = (code, out, run, job)
        return cases[peft, strategy]

    for item in request.session.items:  # every selected case of this module, planned and started now
        if getattr(item, "module", None) is request.module and hasattr(item, "callspec"):
            start(item.callspec.params["peft"], item.callspec.params["strategy"])
    yield start
    pool.shutdown(wait=True)


@pytest.mark.parametrize("strategy", ["single", "fsdp", "zero3"])
@pytest.mark.parametrize("peft", ["full", "lora", "qlora"])
def test_written_plan_runs_as_planned(peft, strategy, planned_runs):
    from ft_dist.planner.run_setup import setup_of
    from ft_dist.planner.workload import TrainingSetup

    code, out, run, job = planned_runs(peft, strategy)
    if isinstance(code, Exception):
        raise code
    assert code == 0, f"ft-plan of {peft} x {strategy} exited {code}"
    written = yaml.safe_load((out / "plan.yaml").read_text())
    world = 1 if strategy == "single" else 2
    proc = job.result()
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
