"""Checkpoints with real processes and real signals: exact and elastic resume, preemption, kills, export.

Exact resume is bitwise (fp32 on CPU, torch AdamW inside every engine). Elastic resume (2 -> 1, 1 -> 2 ranks)
changes only the order of floating-point reductions, so it is checked to atol 2e-5 after the remaining steps.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from conftest import REPO
from dist_utils import (assert_readable_by_others, assert_same_weights, env, final_weights, free_port, hooked_train_script,
                        hooks_in_every_python,
                        logged_steps, losses, resumed_at, resumes, single, torchrun, wait_for)

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


def launch(strategy: str, a: List[str], nproc: int, extra_env: Dict[str, str] | None = None) -> subprocess.CompletedProcess:
    if strategy == "single":
        proc = single(a, extra_env=extra_env)
    else:
        proc = torchrun([*a, f"strategy={strategy}"], nproc=nproc, extra_env=extra_env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def uninterrupted(model_dir, cache_dir, tmp_path_factory):
    """One uninterrupted run per strategy (2 ranks; `single` 1 rank), each checkpointing at steps 3 and 6."""
    cache: Dict[str, Path] = {}

    def get(strategy: str) -> Path:
        if strategy not in cache:
            out = tmp_path_factory.mktemp(f"full-{strategy}")
            launch(strategy, args(model_dir, cache_dir, out, *(ONE if strategy == "single" else TWO)), 2)
            cache[strategy] = out
        return cache[strategy]

    return get


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp", "zero2", "zero3"])
def test_exact_resume_is_bitwise(strategy, model_dir, cache_dir, uninterrupted, tmp_path):
    full = uninterrupted(strategy)
    assert (step_dir(full, 3) / "COMPLETE").exists() and json.loads((step_dir(full, 3) / "meta.json").read_text())["samples_consumed"] == 24
    launch(strategy, args(model_dir, cache_dir, tmp_path, f"train.resume={step_dir(full, 3)}",
                                 *(ONE if strategy == "single" else TWO)), 2)
    assert resumed_at(tmp_path) == 3
    assert losses(tmp_path) == losses(full)[3:]
    assert_same_weights(tmp_path, full, exact=True)


@pytest.mark.parametrize("strategy,optimizer", [("ddp", "adamw_8bit"), ("single", "paged_adamw_8bit")])
def test_bitsandbytes_optimizer_resumes_bitwise(strategy, optimizer, model_dir, cache_dir, tmp_path):
    """8-bit block-quantized and paged Adam states (bitsandbytes, on CPU) go through the same checkpoint: the
    resumed steps and the final weights are bit for bit those of the uninterrupted run."""
    layout = ONE if strategy == "single" else TWO
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    launch(strategy, args(model_dir, cache_dir, full, f"train.optimizer={optimizer}", *layout), 2)
    launch(strategy, args(model_dir, cache_dir, resumed, f"train.optimizer={optimizer}",
                          f"train.resume={step_dir(full, 3)}", *layout), 2)
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(step_dir(full, 3) / "state")).read_metadata().state_dict_metadata
    assert any(k.endswith("q_proj.weight.__bnb_optimizer_quant_state__.absmax1") for k in saved)  # 8-bit states
    assert resumed_at(resumed) == 3
    assert losses(resumed) == losses(full)[3:]
    assert_same_weights(resumed, full, exact=True)


def test_qlora_trains_resumes_bitwise_and_exports_a_dense_model(model_dir, cache_dir, tmp_path):
    """QLoRA with real bitsandbytes on CPU: a 4-bit NF4 base (double quantization) under single, FSDP2 (which
    shards the 4-bit blocks), DDP and ZeRO-3 (which partitions them); exact resume; the merged export loads in
    plain transformers."""
    qlora = ["peft=qlora", "peft.dropout=0"]  # dropout off: its masks depend on how the batch is split over ranks
    single_run, resumed, fsdp_run, ddp_run, zero3_run = (
        tmp_path / n for n in ("single", "resumed", "fsdp", "ddp", "zero3"))
    launch("single", args(model_dir, cache_dir, single_run, *qlora, *ONE), 1)
    launch("single", args(model_dir, cache_dir, resumed, *qlora, f"train.resume={step_dir(single_run, 3)}", *ONE), 1)
    launch("fsdp", args(model_dir, cache_dir, fsdp_run, *qlora, *TWO), 2)
    launch("ddp", args(model_dir, cache_dir, ddp_run, *qlora, f"train.resume={step_dir(fsdp_run, 3)}", *TWO), 2)
    launch("zero3", args(model_dir, cache_dir, zero3_run, *qlora, f"train.resume={step_dir(single_run, 3)}", *TWO), 2)
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


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
def test_resume_two_ranks_to_one(strategy, model_dir, cache_dir, uninterrupted, tmp_path):
    full = uninterrupted(strategy)
    launch(strategy, args(model_dir, cache_dir, tmp_path, f"train.resume={step_dir(full, 3)}", *ONE_OF_TWO), 1)
    assert [(e["step"], e["saved_world_size"], e["world_size"]) for e in resumes(tmp_path)] == [(3, 2, 1)]
    torch.testing.assert_close(torch.tensor(losses(tmp_path)), torch.tensor(losses(full)[3:]), rtol=1e-4, atol=1e-5)
    assert_same_weights(tmp_path, full, exact=False)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
def test_resume_one_rank_to_two(strategy, model_dir, cache_dir, uninterrupted, tmp_path):
    full = uninterrupted("single")  # written by one process with the single-device strategy
    launch(strategy, args(model_dir, cache_dir, tmp_path, f"train.resume={step_dir(full, 3)}", *TWO), 2)
    assert [(e["step"], e["saved_world_size"], e["world_size"]) for e in resumes(tmp_path)] == [(3, 1, 2)]
    torch.testing.assert_close(torch.tensor(losses(tmp_path)), torch.tensor(losses(full)[3:]), rtol=1e-4, atol=1e-5)
    assert_same_weights(tmp_path, full, exact=False)


# Every strategy writes the same name-keyed DCP layout (FSDP2 DTensor shards, ZeRO partitions as chunks, whole
# tensors from DDP), so any pair resumes. These pairs cover each writer family (whole, DTensor, ZeRO-1/2 fragments,
# ZeRO-3 partitions, with and without offload) into each other reader family; single <-> the rest and same-strategy
# pairs are above, FSDP2 <-> ZeRO-3 at 4 <-> 2 ranks in tests/test_scale.py.
@pytest.mark.parametrize("saved,resumed", [("fsdp", "zero2"), ("zero2", "fsdp"), ("zero1", "zero3"),
                                           ("zero3_offload", "ddp"), ("zero2_offload", "zero3_offload")])
def test_resume_under_another_strategy(saved, resumed, model_dir, cache_dir, uninterrupted, tmp_path):
    full = uninterrupted(saved)
    launch(resumed, args(model_dir, cache_dir, tmp_path, f"train.resume={step_dir(full, 3)}", *TWO), 2)
    assert resumed_at(tmp_path) == 3
    torch.testing.assert_close(torch.tensor(losses(tmp_path)), torch.tensor(losses(full)[3:]), rtol=1e-4, atol=1e-5)
    assert_same_weights(tmp_path, full, exact=False)


def worker_pids(parent: int) -> List[int]:
    with open(f"/proc/{parent}/task/{parent}/children") as fh:
        return [int(p) for p in fh.read().split()]


LONG = 40


def test_sigusr1_saves_within_a_step_and_exits_85_then_resumes(model_dir, cache_dir, tmp_path):
    a = args(model_dir, cache_dir, tmp_path / "run", f"train.max_steps={LONG}", "train.save_every=0", *TWO, "strategy=ddp")
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
    reference = torchrun(args(model_dir, cache_dir, tmp_path / "ref", f"train.max_steps={LONG}", "train.save_every=0",
                              *TWO, "strategy=ddp"))
    assert reference.returncode == 0
    assert_same_weights(tmp_path / "run", tmp_path / "ref", exact=True)


def test_sigterm_single_process_exit_code(model_dir, cache_dir, tmp_path):
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


def test_kill_during_save_leaves_previous_checkpoint(model_dir, cache_dir, uninterrupted, tmp_path):
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


def test_torchrun_restarts_after_a_rank_is_killed(model_dir, cache_dir, uninterrupted, tmp_path):
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


def test_a_stalled_rank_is_named_and_the_job_restarts_from_its_checkpoint(model_dir, cache_dir, uninterrupted, tmp_path):
    worker = hooked_train_script(tmp_path, STALL_RANK_1)
    run = tmp_path / "run"
    a = args(model_dir, cache_dir, run, "train.save_every=2", *TWO, "strategy=ddp", f"train.hang_timeout_s={HANG_TIMEOUT_S}",
             f"train.heartbeat_s={HEARTBEAT_S}")
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


@pytest.mark.parametrize("strategy,lora", [("ddp", False), ("fsdp", False), ("zero3", False), ("fsdp", True), ("zero3", True)])
def test_export_loads_with_plain_transformers(strategy, lora, model_dir, cache_dir, uninterrupted, tmp_path):
    from transformers import AutoModelForCausalLM

    if lora:
        run = tmp_path / "run"
        launch(strategy, args(model_dir, cache_dir, run, "peft=lora", "peft.r=4", *TWO), 2)
    else:
        run = uninterrupted(strategy)
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "export.py"), f"checkpoint={step_dir(run, STEPS)}",
                           f"output={tmp_path / 'hf'}"], cwd=REPO, env=env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    trained = final_weights(run)
    exported = {k: v for k, v in model.state_dict().items() if k in trained}
    assert exported.keys() == trained.keys()
    for k in trained:
        assert torch.equal(exported[k], trained[k]), k
    assert (tmp_path / "hf" / "adapter" / "adapter_config.json").exists() == lora
    assert_readable_by_others(tmp_path / "hf")


def test_resume_with_a_different_config_says_what_differs(model_dir, cache_dir, uninterrupted, tmp_path):
    ckpt = step_dir(uninterrupted("single"), 3)
    proc = single(args(model_dir, cache_dir, tmp_path, f"train.resume={ckpt}", *ONE, "train.lr=2e-3"))
    assert proc.returncode == 2 and "train.lr: 0.001 in the checkpoint, 0.002 now" in proc.stderr
    assert "train.resume_ignore_config=true" in proc.stderr and "Traceback" not in proc.stderr
    proc = single(args(model_dir, cache_dir, tmp_path, f"train.resume={ckpt}", "train.micro_batch_size=4", "train.grad_accum=1"))
    assert proc.returncode == 2 and "set train.grad_accum=2" in proc.stderr


def test_nonfinite_steps_are_skipped_then_stop_with_a_checkpoint(model_dir, cache_dir, uninterrupted, tmp_path):
    # A real NaN enters the loss from step 4 on (test hook), so backward yields NaN gradients on every rank.
    nan_from_4 = hooked_train_script(tmp_path, 'hooks.install("nan_loss", lambda step, rank: step >= 4)')
    proc = torchrun(args(model_dir, cache_dir, tmp_path, "train.save_every=0", "train.nonfinite_limit=2", *TWO,
                         "strategy=ddp"), script=nan_from_4)
    assert proc.returncode != 0 and "exitcode  : 3" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("training diverged: 2 steps in a row with NaN/Inf loss or gradients (first at step 4)") == 1
    losses_logged = [m["loss"] for m in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    # Step 4's NaN is logged and its update skipped; step 5, the second in a row, stops the run before its log line.
    assert len(losses_logged) == 4 and all(map(math.isfinite, losses_logged[:3])) and math.isnan(losses_logged[3])
    saved = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert [p.name for p in saved] == ["step-00000003"] and (saved[0] / "COMPLETE").exists()
    for name, run in (("diverged", tmp_path), ("reference", uninterrupted("ddp"))):
        out = tmp_path / name
        proc = subprocess.run([sys.executable, str(REPO / "launch" / "export.py"), f"checkpoint={step_dir(run, 3)}",
                               f"output={out}"], cwd=REPO, env=env(), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
    # Exactly the weights from before the first bad step.
    assert_same_weights(tmp_path / "diverged", tmp_path / "reference", exact=True, sub="")
