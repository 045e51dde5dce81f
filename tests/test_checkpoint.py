"""Checkpoints with real processes and real signals: exact and elastic resume, preemption, kills, export.

Exact resume is bitwise (fp32 on CPU, torch AdamW inside every engine). Elastic resume (2 -> 1, 1 -> 2 ranks)
changes only the order of floating-point reductions, so it is checked to atol 2e-5 after the remaining steps.

Most of a launch here is start-up (interpreters, imports, engine builds), not training, and the launches the tests
below need mostly do not depend on each other: the first test to ask starts every launch of every selected test
(`runs`, each launch once), side by side up to PARALLEL_RANKS ranks, and each test then checks its own. The tests
that time signals, kills and hangs first wait until nothing else runs (`quiet`).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from conftest import REPO
from dist_utils import (
    assert_readable_by_others,
    assert_same_weights,
    env,
    final_weights,
    free_port,
    hooked_train_script,
    hooks_in_every_python,
    logged_steps,
    losses,
    resumed_at,
    resumes,
    single,
    torchrun,
    wait_for,
)

pytestmark = pytest.mark.slow
STEPS = 6


def args(model_dir: Path, cache_dir: Path, out: Path, *extra: str) -> List[str]:
    return [f"model.name_or_path={model_dir}", "model.from_config=false", "model.tokenizer=embedded:char",
            f"data.cache_dir={cache_dir}", "data.limit=400", "data.test_size=40", f"train.max_steps={STEPS}",
            "train.save_every=3", "train.log_every=1", "train.eval_every=0", "train.warmup_steps=2", "train.lr=1e-3",
            "eval.before_training=false", "eval.max_examples=4", "eval.max_new_tokens=4", f"output_dir={out}", *extra]


TWO = ["train.micro_batch_size=2", "train.grad_accum=2"]          # x 2 ranks = global batch 8
ONE = ["train.micro_batch_size=4", "train.grad_accum=2"]          # x 1 rank  = global batch 8
ONE_OF_TWO = ["train.micro_batch_size=2", "train.grad_accum=4"]   # x 1 rank  = global batch 8

# Ranks of launches running at once. Twice the cores: a launch leaves cores idle for seconds (torchrun's agent
# importing torch, rank 0 alone preparing data or writing the model, a single process on one core).
PARALLEL_RANKS = int(os.environ.get("FT_DIST_TEST_PARALLEL_RANKS") or min(8, 2 * len(os.sched_getaffinity(0))))
_PORTS: set = set()
_PORTS_LOCK = threading.Lock()


def distinct_port() -> int:
    """A free port no other launch of this process was given (launches start side by side)."""
    with _PORTS_LOCK:
        port = free_port()
        while port in _PORTS:
            port = free_port()
        _PORTS.add(port)
        return port


def train_command(strategy: str, a: List[str], nproc: int, extra_env: Dict[str, str] | None = None,
                  script: Optional[Path] = None) -> Callable[[], subprocess.CompletedProcess]:
    """launch/train.py (or `script`) with `a`: one process for `single`, else torchrun with `nproc` ranks."""
    more = {"script": script} if script else {}

    def run() -> subprocess.CompletedProcess:
        if strategy == "single":
            return single(a, extra_env=extra_env, **more)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    "--master_port", str(distinct_port())]
        return torchrun([*a, f"strategy={strategy}"], nproc=nproc, extra_env=extra_env, launcher=launcher, **more)

    return run


def export_command(checkpoint: Path, output: Path) -> Callable[[], subprocess.CompletedProcess]:
    return lambda: subprocess.run([sys.executable, str(REPO / "launch" / "export.py"), f"checkpoint={checkpoint}",
                                   f"output={output}"], cwd=REPO, env=env(), capture_output=True, text=True)


def succeeded(proc: Any) -> bool:
    return proc is not None and proc.returncode == 0


class Launches:
    """Commands run in the background, at most `budget` ranks at a time, each key once. A job starts when the
    jobs it follows have succeeded (if one failed, it does not run and its result is None), in the order the jobs
    became ready."""

    def __init__(self, budget: int) -> None:
        self.budget = self.free = max(1, budget)
        self.cond = threading.Condition()
        self.waiting: List[int] = []  # tickets of ready jobs, oldest first
        self.tickets = 0
        self.jobs: Dict[str, Future] = {}
        self.pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="launch")

    def submit(self, key: str, ranks: int, command: Callable[[], Any], after: Sequence[Future] = ()) -> Future:
        if key not in self.jobs:
            self.jobs[key] = self.pool.submit(self._run, min(ranks, self.budget), command, list(after))
        return self.jobs[key]

    def _run(self, ranks: int, command: Callable[[], Any], after: List[Future]) -> Any:
        if not all(succeeded(dep.result()) for dep in after):
            return None
        with self.cond:
            ticket = self.tickets
            self.tickets += 1
            self.waiting.append(ticket)
            self.cond.wait_for(lambda: self.waiting[0] == ticket and self.free >= ranks)
            self.waiting.pop(0)
            self.free -= ranks
            self.cond.notify_all()
        try:
            return command()
        finally:
            with self.cond:
                self.free += ranks
                self.cond.notify_all()

    def drain(self) -> None:
        """Wait until every job submitted so far has ended (its test reports how)."""
        for job in list(self.jobs.values()):
            job.exception()


Run = Tuple[Path, Future]  # a launch's output dir, and its CompletedProcess (None: what it follows failed)


class Runs:
    """The launches of this module by name, each started once: uninterrupted runs, resumes, exports."""

    def __init__(self, launches: Launches, model_dir: Path, cache_dir: Path, factory: pytest.TempPathFactory) -> None:
        self.launches, self.model_dir, self.cache_dir, self.factory = launches, model_dir, cache_dir, factory
        self.runs: Dict[str, Run] = {}

    def start(self, name: str, strategy: str, nproc: int, *extra: str, after: Sequence[Future] = ()) -> Run:
        if name not in self.runs:
            out = self.factory.mktemp(name)
            command = train_command(strategy, args(self.model_dir, self.cache_dir, out, *extra), nproc)
            self.runs[name] = (out, self.launches.submit(name, 1 if strategy == "single" else nproc, command, after))
        return self.runs[name]

    def full(self, strategy: str) -> Run:
        """One uninterrupted run per strategy (2 ranks; `single` 1 rank), each checkpointing at steps 3 and 6
        (zero2_offload at 2, 4 and 6: the zero3_offload run resumed from its step 2 writes a step 3 in turn)."""
        extra = ["train.save_every=2", "train.keep_checkpoints=3"] if strategy == "zero2_offload" else []
        return self.start(f"full-{strategy}", strategy, 2, *(ONE if strategy == "single" else TWO), *extra)

    def resume(self, name: str, strategy: str, nproc: int, source: Run, step: int, *extra: str) -> Run:
        return self.start(name, strategy, nproc, f"train.resume={step_dir(source[0], step)}", *extra, after=[source[1]])

    def export(self, name: str, source: Run, step: int) -> Run:
        """ft-export of `source`'s step-`step` checkpoint into <dir>/hf."""
        if name not in self.runs:
            out = self.factory.mktemp(name)
            command = export_command(step_dir(source[0], step), out / "hf")
            self.runs[name] = (out, self.launches.submit(name, 1, command, [source[1]]))
        return self.runs[name]

    @staticmethod
    def wait(run: Run, what: str) -> Path:
        """The run's dir once it succeeded; else fail naming `what` (or, not run, the run it follows)."""
        proc = run[1].result()
        assert proc is not None, f"{what}: not run, since the run it resumes or exports failed (see that one)"
        assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        return run[0]


PLANS: Dict[str, Callable[..., Any]] = {}


def plans(test: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the function that starts (idempotently) the launches `test` needs, given its parameters."""
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        PLANS[test] = fn
        return fn

    return register


@pytest.fixture(scope="module")
def runs(request, model_dir, cache_dir, tmp_path_factory):
    launches = Launches(PARALLEL_RANKS)
    found = Runs(launches, model_dir, cache_dir, tmp_path_factory)
    for item in request.session.items:  # the selected tests of this module, in order
        if getattr(item, "module", None) is request.module and item.originalname in PLANS:
            callspec = getattr(item, "callspec", None)
            PLANS[item.originalname](found, **(callspec.params if callspec else {}))
    yield found
    launches.drain()
    launches.pool.shutdown()


@pytest.fixture(scope="module")
def uninterrupted(runs):
    """strategy -> the dir of its uninterrupted run (Runs.full), once it has succeeded."""
    return lambda strategy: runs.wait(runs.full(strategy), f"the uninterrupted {strategy} run")


@pytest.fixture
def quiet(runs):
    """Nothing else runs during this test: it times signals, kills or hangs."""
    runs.launches.drain()


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def close_losses(run: Path, full: Path, step: int) -> None:
    torch.testing.assert_close(torch.tensor(losses(run)), torch.tensor(losses(full)[step:]), rtol=1e-4, atol=1e-5)


EXACT = ["single", "ddp", "fsdp", "zero2", "zero3"]
ELASTIC = ["ddp", "fsdp", "zero2", "zero3"]


@plans("test_exact_resume_is_bitwise")
def exact_runs(runs: Runs, strategy: str) -> Tuple[Run, Run]:
    full = runs.full(strategy)
    return full, runs.resume(f"exact-{strategy}", strategy, 2, full, 3, *(ONE if strategy == "single" else TWO))


@pytest.mark.parametrize("strategy", EXACT)
def test_exact_resume_is_bitwise(strategy, runs):
    full_run, resumed_run = exact_runs(runs, strategy)
    full = runs.wait(full_run, f"the uninterrupted {strategy} run")
    assert (step_dir(full, 3) / "COMPLETE").exists()
    assert json.loads((step_dir(full, 3) / "meta.json").read_text())["samples_consumed"] == 24
    resumed = runs.wait(resumed_run, f"{strategy} resumed from its own step 3")
    assert resumed_at(resumed) == 3
    assert losses(resumed) == losses(full)[3:]
    assert_same_weights(resumed, full, exact=True)


@plans("test_bitsandbytes_optimizer_resumes_bitwise")
def bitsandbytes_runs(runs: Runs, strategy: str, optimizer: str) -> Tuple[Run, Run]:
    layout = ONE if strategy == "single" else TWO
    full = runs.start(f"{optimizer}-full", strategy, 2, f"train.optimizer={optimizer}", *layout)
    return full, runs.resume(f"{optimizer}-resumed", strategy, 2, full, 3, f"train.optimizer={optimizer}", *layout)


@pytest.mark.parametrize("strategy,optimizer", [("ddp", "adamw_8bit"), ("single", "paged_adamw_8bit")])
def test_bitsandbytes_optimizer_resumes_bitwise(strategy, optimizer, runs):
    """8-bit block-quantized and paged Adam states (bitsandbytes, on CPU) go through the same checkpoint: the
    resumed steps and the final weights are bit for bit those of the uninterrupted run."""
    full_run, resumed_run = bitsandbytes_runs(runs, strategy, optimizer)
    full = runs.wait(full_run, f"the uninterrupted {strategy} run with {optimizer}")
    resumed = runs.wait(resumed_run, f"{strategy} with {optimizer} resumed from step 3")
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(step_dir(full, 3) / "state")).read_metadata().state_dict_metadata
    assert any(k.endswith("q_proj.weight.__bnb_optimizer_quant_state__.absmax1") for k in saved)  # 8-bit states
    assert resumed_at(resumed) == 3
    assert losses(resumed) == losses(full)[3:]
    assert_same_weights(resumed, full, exact=True)


QLORA = ["peft=qlora", "peft.dropout=0"]  # dropout off: its masks depend on how the batch is split over ranks


@plans("test_qlora_trains_resumes_bitwise_and_exports_a_dense_model")
def qlora_runs(runs: Runs) -> Dict[str, Run]:
    single_run = runs.start("qlora-single", "single", 1, *QLORA, *ONE)
    fsdp_run = runs.start("qlora-fsdp", "fsdp", 2, *QLORA, *TWO)
    return {"single": single_run, "fsdp": fsdp_run,
            "resumed": runs.resume("qlora-resumed", "single", 1, single_run, 3, *QLORA, *ONE),
            "ddp": runs.resume("qlora-ddp", "ddp", 2, fsdp_run, 3, *QLORA, *TWO),
            "zero3": runs.resume("qlora-zero3", "zero3", 2, single_run, 3, *QLORA, *TWO)}


def test_qlora_trains_resumes_bitwise_and_exports_a_dense_model(model_dir, runs, tmp_path):
    """QLoRA with real bitsandbytes on CPU: a 4-bit NF4 base (double quantization) under single, FSDP2 (which
    shards the 4-bit blocks), DDP and ZeRO-3 (which partitions them); exact resume; the merged export loads in
    plain transformers."""
    started = qlora_runs(runs)
    what = {"single": "the single-process QLoRA run", "fsdp": "the FSDP2 QLoRA run",
            "resumed": "the single-process QLoRA run resumed from its step 3",
            "ddp": "the DDP QLoRA run resumed from FSDP2's step 3",
            "zero3": "the ZeRO-3 QLoRA run resumed from the single process's step 3"}
    single_run, resumed, fsdp_run, ddp_run, zero3_run = (
        runs.wait(started[n], what[n]) for n in ("single", "resumed", "fsdp", "ddp", "zero3"))
    full = losses(single_run)
    assert full[-1] < full[0] - 0.1  # it learns
    assert losses(resumed) == full[3:]  # exact resume: the adapters and their optimizer states, bit for bit
    assert_same_weights(resumed, single_run, exact=True)
    # FSDP2, DDP (resumed from FSDP2's checkpoint) and ZeRO-3 (from the single process's) match one process up to
    # the order of reductions.
    torch.testing.assert_close(torch.tensor(losses(fsdp_run)), torch.tensor(full), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(losses(ddp_run)), torch.tensor(full[3:]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(losses(zero3_run)), torch.tensor(full[3:]), rtol=1e-4, atol=1e-5)
    assert_same_weights(zero3_run, single_run, exact=False)  # ZeRO-3 gathers and dequantizes block by block
    # The checkpoint holds the adapters, not the 4-bit base (it is re-quantized from the pretrained weights).
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(step_dir(fsdp_run, 3) / "state")).read_metadata().state_dict_metadata
    assert any("lora_A" in k for k in saved) and not any(k.endswith("base_layer.weight") for k in saved)

    # final/: the adapter merged into the dequantized base, loadable by plain transformers as an ordinary Llama.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(single_run / "final")
    assert not any("4bit" in type(m).__name__ for m in merged.modules())
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, device_map={"": "cpu"})
    for m in base.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, single_run / "final" / "adapter")
        want, got = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
    # Both compute with the same dequantized base in fp32; they differ only in x.W' + s.(x.A').B' versus
    # x.(W + s.B.A)': fp32 rounding, ~1e-7 here. 1e-4 leaves a wide margin, while a wrong dequantization or a
    # missing adapter delta is off by far more (the adapter alone moves the logits by the amount checked last).
    assert (got - want).abs().max() < 1e-4
    assert (want - base_logits).abs().max() > 1e-3
    # ft-export of the last checkpoint (adapters only) re-quantizes the base and writes the same dense model.
    from omegaconf import OmegaConf

    from ft_dist.checkpoint import export_checkpoint

    export_checkpoint(OmegaConf.load(single_run / "config.yaml"), step_dir(single_run, STEPS), tmp_path / "export")
    assert_same_weights(tmp_path / "export", single_run / "final", exact=True, sub=".")


@plans("test_resume_two_ranks_to_one")
def two_ranks_to_one_runs(runs: Runs, strategy: str) -> Tuple[Run, Run]:
    full = runs.full(strategy)
    return full, runs.resume(f"two-to-one-{strategy}", strategy, 1, full, 3, *ONE_OF_TWO)


@pytest.mark.parametrize("strategy", ELASTIC)
def test_resume_two_ranks_to_one(strategy, runs):
    full_run, resumed_run = two_ranks_to_one_runs(runs, strategy)
    full = runs.wait(full_run, f"the uninterrupted {strategy} run")
    resumed = runs.wait(resumed_run, f"{strategy} on 1 rank resumed from its 2-rank step 3")
    assert [(e["step"], e["saved_world_size"], e["world_size"]) for e in resumes(resumed)] == [(3, 2, 1)]
    close_losses(resumed, full, 3)
    assert_same_weights(resumed, full, exact=False)


@plans("test_resume_one_rank_to_two")
def one_rank_to_two_runs(runs: Runs, strategy: str) -> Tuple[Run, Run]:
    full = runs.full("single")  # written by one process with the single-device strategy
    return full, runs.resume(f"one-to-two-{strategy}", strategy, 2, full, 3, *TWO)


@pytest.mark.parametrize("strategy", ELASTIC)
def test_resume_one_rank_to_two(strategy, runs):
    full_run, resumed_run = one_rank_to_two_runs(runs, strategy)
    full = runs.wait(full_run, "the uninterrupted single run")
    resumed = runs.wait(resumed_run, f"{strategy} on 2 ranks resumed from the single process's step 3")
    assert [(e["step"], e["saved_world_size"], e["world_size"]) for e in resumes(resumed)] == [(3, 1, 2)]
    close_losses(resumed, full, 3)
    assert_same_weights(resumed, full, exact=False)


# Every strategy writes the same name-keyed DCP layout (FSDP2 DTensor shards, ZeRO partitions as chunks, whole
# tensors from DDP), so any pair resumes. These pairs cover each writer family (whole, DTensor, ZeRO-1/2 fragments,
# ZeRO-3 partitions, with and without offload) into each other reader family; single <-> the rest and same-strategy
# pairs are above, FSDP2 <-> ZeRO-3 at 4 <-> 2 ranks in tests/test_scale.py.
@plans("test_resume_under_another_strategy")
def another_strategy_runs(runs: Runs, saved: str, resumed: str) -> Tuple[Run, int, Run, Run]:
    """(the run whose checkpoint is resumed, its step, the uninterrupted run to compare with, the resumed run)."""
    if saved == "zero3_offload":
        # The zero3_offload checkpoint is the step 3 of the zero3_offload run below (resumed from zero2_offload's
        # step 2): an uninterrupted zero3_offload run would be one more launch that nothing else needs.
        *_, reference, writer = another_strategy_runs(runs, "zero2_offload", "zero3_offload")
        step = 3
    else:
        reference = writer = runs.full(saved)
        step = 2 if saved == "zero2_offload" else 3
    return writer, step, reference, runs.resume(f"{saved}-to-{resumed}", resumed, 2, writer, step, *TWO)


@pytest.mark.parametrize("saved,resumed", [("fsdp", "zero2"), ("zero2", "fsdp"), ("zero1", "zero3"),
                                           ("zero3_offload", "ddp"), ("zero2_offload", "zero3_offload")])
def test_resume_under_another_strategy(saved, resumed, runs):
    writer_run, step, reference_run, resumed_run = another_strategy_runs(runs, saved, resumed)
    full = runs.wait(reference_run, f"the uninterrupted run {reference_run[0].name}")
    runs.wait(writer_run, f"the {saved} run that writes the checkpoint")
    run = runs.wait(resumed_run, f"{resumed} resumed from {saved}'s step {step}")
    assert resumed_at(run) == step
    close_losses(run, full, step)
    assert_same_weights(run, full, exact=False)


def worker_pids(parent: int) -> List[int]:
    with open(f"/proc/{parent}/task/{parent}/children") as fh:
        return [int(p) for p in fh.read().split()]


LONG = 40


def test_sigusr1_saves_within_a_step_and_exits_85_then_resumes(model_dir, cache_dir, runs, quiet, tmp_path):
    a = args(model_dir, cache_dir, tmp_path / "run", f"train.max_steps={LONG}", "train.save_every=0", *TWO,
             "strategy=ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "launch" / "train.py"), *a]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: logged_steps(tmp_path / "run") >= 3, what="3 training steps")
    seen = logged_steps(tmp_path / "run")
    for pid in worker_pids(proc.pid):  # what slurm/ forwards from the batch shell
        os.kill(pid, signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert "exitcode  : 85" in err, err[-3000:]  # torchrun's report of the ranks' exit codes
    saved = [int(p.name.split("-")[1]) for p in (tmp_path / "run" / "checkpoints").glob("step-*")]
    assert len(saved) == 1 and seen <= saved[0] <= seen + 2 < LONG
    assert (tmp_path / "run" / "PREEMPTED").exists()
    # The uninterrupted reference runs beside the resumed run (nothing is timed from here on).
    reference = runs.launches.submit("sigusr1-reference", 2, train_command(
        "ddp", args(model_dir, cache_dir, tmp_path / "ref", f"train.max_steps={LONG}", "train.save_every=0", *TWO), 2))
    resumed = torchrun(a)  # train.resume=auto (the default) continues in the same run dir
    assert resumed.returncode == 0 and resumed_at(tmp_path / "run") == saved[0], resumed.stderr[-3000:]
    assert not (tmp_path / "run" / "PREEMPTED").exists()
    # metrics.jsonl marks the resume and its time runs on across it (it used to restart at 0).
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in records if r.get("event") == "resume"]
    assert len(events) == 1 and events[0]["step"] == saved[0] and events[0]["world_size"] == 2
    times = [r["time"] for r in records]
    assert times == sorted(times)
    elapsed = [r["elapsed_s"] for r in records if "elapsed_s" in r]
    assert elapsed == sorted(elapsed) and all(r["wall_time"] > 1.7e9 for r in records)
    assert reference.result().returncode == 0, reference.result().stderr[-3000:]
    assert_same_weights(tmp_path / "run", tmp_path / "ref", exact=True)


def test_sigterm_single_process_exit_code(model_dir, cache_dir, quiet, tmp_path):
    a = args(model_dir, cache_dir, tmp_path, f"train.max_steps={LONG}", "train.save_every=0", *ONE)
    proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "train.py"), *a], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: logged_steps(tmp_path) >= 2, what="2 training steps")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 85
    assert len(list((tmp_path / "checkpoints").glob("step-*/COMPLETE"))) == 1


SLOW_SAVE_AT_STEP_4 = """
import os, time

def slow_save(step, rank, path):
    # Half written (the test kills the run now); not again in an attempt torchrun restarted.
    if step == 4 and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        time.sleep(120)

hooks.install("checkpoint_written", slow_save)
"""


def test_kill_during_save_leaves_previous_checkpoint(model_dir, cache_dir, uninterrupted, quiet, tmp_path):
    a = args(model_dir, cache_dir, tmp_path, "train.save_every=2", *ONE)
    slow_save = hooked_train_script(tmp_path, SLOW_SAVE_AT_STEP_4)
    proc = subprocess.Popen([sys.executable, str(slow_save), *a], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "checkpoints" / ".step-00000004.tmp" / "rank-0.pt"
    wait_for(partial.exists, what="the step-4 save to be half written")
    proc.kill()
    proc.communicate()
    assert (step_dir(tmp_path, 2) / "COMPLETE").exists() and not step_dir(tmp_path, 4).exists()
    resumed = single(a)
    assert resumed.returncode == 0 and resumed_at(tmp_path) == 2, resumed.stderr[-3000:]
    assert_same_weights(tmp_path, uninterrupted("single"), exact=True)


def tagged_processes(tag: str) -> Dict[int, Dict[str, str]]:
    """pid -> environment of every live process started with FT_DIST_TEST_ID=tag (workers are session leaders, so
    neither the process tree nor a process group reaches them reliably)."""
    found = {}
    for proc_dir in Path("/proc").iterdir():
        try:
            raw = (proc_dir / "environ").read_bytes() if proc_dir.name.isdigit() else b""
        except OSError:  # exited meanwhile
            continue
        environ = dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)
        if environ.get("FT_DIST_TEST_ID") == tag:
            found[int(proc_dir.name)] = environ
    return found


def test_torchrun_restarts_after_a_rank_is_killed(model_dir, cache_dir, uninterrupted, quiet, tmp_path):
    # Through ft-launch (max_restarts=R -> torchrun --max-restarts R, c10d rendezvous).
    a = args(model_dir, cache_dir, tmp_path, "train.save_every=2", *TWO, "strategy=ddp")
    cmd = [sys.executable, str(REPO / "launch" / "launch.py"), "cluster=local", f"master_port={free_port()}",
           "max_restarts=2", "--run", "--", *a]
    tag = tmp_path.name
    # LOGLEVEL: torchrun logs its restarts; faulthandler: SIGABRT makes a stuck worker print where it is.
    slow_first_save = hooks_in_every_python(tmp_path / "hooks", SLOW_SAVE_AT_STEP_4)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env({**slow_first_save, "FT_DIST_TEST_ID": tag, "LOGLEVEL": "INFO",
                                                    "PYTHONFAULTHANDLER": "1"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for((tmp_path / "checkpoints" / ".step-00000004.tmp" / "rank-1.pt").exists, what="training past step 2")
        rank1, = [pid for pid, e in tagged_processes(tag).items()
                  if e.get("RANK") == "1" and e.get("TORCHELASTIC_RESTART_COUNT") == "0"]
        os.kill(rank1, signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # stuck: show where every process stood, and leave none behind
            for pid in tagged_processes(tag):
                os.kill(pid, signal.SIGABRT)
            time.sleep(3)
            for pid in tagged_processes(tag):
                os.kill(pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=60)
            pytest.fail(f"the restarted job did not finish:\n{out[-3000:]}\n{err[-12000:]}")
    assert proc.returncode == 0, err[-6000:]
    # One restart: a restarted group that trips over the dead attempt's store keys fails again (dist._attempt_store).
    assert err.count("will restart worker group") == 1, err[-6000:]
    assert resumed_at(tmp_path) == 2
    assert_same_weights(tmp_path, uninterrupted("ddp"), exact=True)


HANG_TIMEOUT_S, HEARTBEAT_S = 12, 1
STALL_RANK_1 = """
import os, time

def stall_forever(step, rank):
    # Rank 1 of the first attempt stops in the middle of the run, as a stuck data read or collective would.
    if rank == 1 and step == 3 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
        while True:
            time.sleep(1)

hooks.install("after_step", stall_forever)
"""


def test_a_stalled_rank_is_named_and_the_job_restarts_from_its_checkpoint(model_dir, cache_dir, uninterrupted, quiet,
                                                                          tmp_path):
    worker = hooked_train_script(tmp_path, STALL_RANK_1)
    run = tmp_path / "run"
    a = args(model_dir, cache_dir, run, "train.save_every=2", *TWO, "strategy=ddp",
             f"train.hang_timeout_s={HANG_TIMEOUT_S}", f"train.heartbeat_s={HEARTBEAT_S}")
    port, tag = free_port(), tmp_path.name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", tag, str(worker), *a]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env({"LOGLEVEL": "INFO", "FT_DIST_TEST_ID": tag}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # the watchdog failed: leave no process behind
            for pid in tagged_processes(tag):
                os.kill(pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=60)
            pytest.fail(f"the stalled job was not ended:\n{out[-3000:]}\n{err[-6000:]}")
    assert proc.returncode == 0, err[-6000:]
    summary = [line for line in out.splitlines() if line.startswith("hang: ")]
    assert len(summary) == 1, out[-4000:]
    assert "rank 1 (host " in summary[0] and "at step 3 in after step" in summary[0] and "rank 0" not in summary[0]
    assert "the other ranks wait in " in summary[0] and "exiting 86" in summary[0]
    assert "--- stack of rank 1" in out and "in stall_forever" in out  # the stuck rank's own stack
    assert err.count("will restart worker group") == 1 and "exitcode  : 86" not in err  # restarted, not failed
    stacks = {p.name: p.read_text() for p in (run / "heartbeat").glob("stack-rank-*.txt")}
    assert set(stacks) == {"stack-rank-0.txt", "stack-rank-1.txt"} and "in stall_forever" in stacks["stack-rank-1.txt"]
    assert "in stall_forever" not in stacks["stack-rank-0.txt"]
    # Named within the timeout plus a few heartbeats, all ranks gone and the restart resumed soon after.
    hang = json.loads((run / "heartbeat" / "HANG").read_text())
    assert HANG_TIMEOUT_S < hang["seconds"] <= HANG_TIMEOUT_S + 4 * HEARTBEAT_S, hang
    resume = resumes(run)
    assert len(resume) == 1 and resume[0]["step"] == 2 and resume[0]["wall_time"] - hang["at"] < 90
    assert_same_weights(run, uninterrupted("ddp"), exact=True)


@plans("test_export_loads_with_plain_transformers")
def export_runs(runs: Runs, strategy: str, lora: bool) -> Tuple[Run, Run]:
    run = runs.start(f"lora-{strategy}", strategy, 2, "peft=lora", "peft.r=4", *TWO) if lora else runs.full(strategy)
    return run, runs.export(f"export-{strategy}{'-lora' if lora else ''}", run, STEPS)


@pytest.mark.parametrize("strategy,lora", [("ddp", False), ("fsdp", False), ("zero3", False), ("fsdp", True),
                                           ("zero3", True)])
def test_export_loads_with_plain_transformers(strategy, lora, runs):
    from transformers import AutoModelForCausalLM

    trained_run, export_run = export_runs(runs, strategy, lora)
    run = runs.wait(trained_run, f"the {strategy} run{' with LoRA' if lora else ''}")
    hf = runs.wait(export_run, f"ft-export of {run.name}'s step {STEPS}") / "hf"
    model = AutoModelForCausalLM.from_pretrained(hf)
    trained = final_weights(run)
    exported = {k: v for k, v in model.state_dict().items() if k in trained}
    assert exported.keys() == trained.keys()
    for k in trained:
        assert torch.equal(exported[k], trained[k]), k
    assert (hf / "adapter" / "adapter_config.json").exists() == lora
    assert_readable_by_others(hf)


def test_resume_with_a_different_config_says_what_differs(model_dir, cache_dir, runs, uninterrupted, tmp_path):
    ckpt = step_dir(uninterrupted("single"), 3)
    refusals = {"lr": [*ONE, "train.lr=2e-3"], "batch": ["train.micro_batch_size=4", "train.grad_accum=1"]}
    lr, batch = (runs.launches.submit(f"{tmp_path.name}-{name}", 1, train_command(  # both at once
        "single", args(model_dir, cache_dir, tmp_path / name, f"train.resume={ckpt}", *extra), 1))
        for name, extra in refusals.items())
    proc = lr.result()
    assert proc.returncode == 2 and "train.lr: 0.001 in the checkpoint, 0.002 now" in proc.stderr
    assert "train.resume_ignore_config=true" in proc.stderr and "Traceback" not in proc.stderr
    proc = batch.result()
    assert proc.returncode == 2 and "set train.grad_accum=2" in proc.stderr


@plans("test_nonfinite_steps_are_skipped_then_stop_with_a_checkpoint")
def nonfinite_runs(runs: Runs) -> Run:
    return runs.export("export-ddp-step-3", runs.full("ddp"), 3)  # the reference: the weights before step 4


def test_nonfinite_steps_are_skipped_then_stop_with_a_checkpoint(model_dir, cache_dir, runs, tmp_path):
    # A real NaN enters the loss from step 4 on (test hook), so backward yields NaN gradients on every rank.
    nan_from_4 = hooked_train_script(tmp_path, 'hooks.install("nan_loss", lambda step, rank: step >= 4)')
    proc = torchrun(args(model_dir, cache_dir, tmp_path, "train.save_every=0", "train.nonfinite_limit=2", *TWO,
                         "strategy=ddp"), script=nan_from_4)
    assert proc.returncode != 0 and "exitcode  : 3" in proc.stderr, proc.stderr[-3000:]
    diverged = "training diverged: 2 steps in a row with NaN/Inf loss or gradients (first at step 4)"
    assert proc.stderr.count(diverged) == 1
    losses_logged = [m["loss"] for m in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
                     if "loss" in m]
    # Step 4's NaN is logged and its update skipped; step 5, the second in a row, stops the run before its log line.
    assert len(losses_logged) == 4 and all(map(math.isfinite, losses_logged[:3])) and math.isnan(losses_logged[3])
    saved = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert [p.name for p in saved] == ["step-00000003"] and (saved[0] / "COMPLETE").exists()
    proc = export_command(step_dir(tmp_path, 3), tmp_path / "diverged")()
    assert proc.returncode == 0, proc.stderr[-2000:]
    reference = runs.wait(nonfinite_runs(runs), "ft-export of the uninterrupted ddp run's step 3") / "hf"
    # Exactly the weights from before the first bad step.
    assert_same_weights(tmp_path / "diverged", reference, exact=True, sub="")
