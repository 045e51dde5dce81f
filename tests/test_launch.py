"""ft-launch prints the exact per-node command for a cluster config, validates the training overrides, and runs it."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from dist_utils import env, free_port, logged_steps, torchrun, wait_for


def launch(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "launch.py"), *args], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=600)


def test_help_prints_usage_instead_of_a_parser_error():
    for args in (["--help"], ["-h"], ["slurm", "--help"]):
        proc = launch(*args)
        assert proc.returncode == 0 and proc.stderr == "", (args, proc.stderr[-2000:])
        assert "-- " in proc.stdout and "clusters (cluster=...): local, p3dn, p4d, p5" in proc.stdout, args


def test_multi_node_torchrun_command_with_cluster_env():
    proc = launch("cluster=p4d", "cluster.nodes=4", "master_addr=10.1.2.3", "--", "model=llama-2-7b", "strategy=zero3")
    assert proc.returncode == 0, proc.stderr
    assert "world size 32" in proc.stdout
    cmd = proc.stdout.splitlines()[-1]
    assert ("torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint 10.1.2.3:29500 "
            "--rdzv_id ft-dist launch/train.py model=llama-2-7b strategy=zero3") in cmd
    assert "FI_PROVIDER=efa" in proc.stdout and "NCCL_" in proc.stdout


def test_restarts_in_place_use_the_c10d_rendezvous():
    # The restart itself (a rank killed, the job resumed) is tested in test_checkpoint.py.
    proc = launch("cluster=local", "max_restarts=2", "--", "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr
    assert ("torchrun --nnodes 1 --nproc_per_node 2 --max-restarts 2 --rdzv_backend c10d --rdzv_endpoint "
            "127.0.0.1:29500") in proc.stdout
    proc = launch("cluster=local", "max_restarts=2", "launcher=deepspeed", "--", "train.max_steps=3")
    assert proc.returncode == 2 and "max_restarts" in proc.stderr and "Traceback" not in proc.stderr


def test_deepspeed_launcher_command_sets_threads_and_node_rank():
    proc = launch("cluster=p3dn", "cluster.nodes=2", "launcher=deepspeed", "master_addr=10.0.0.1", "node_rank=1", "--",
                  "strategy=zero2", "train.precision=fp16")
    assert proc.returncode == 0, proc.stderr
    assert "deepspeed --num_nodes 2 --num_gpus 8 --master_addr 10.0.0.1 --master_port 29500 --no_ssh --node_rank 1" in proc.stdout
    assert "OMP_NUM_THREADS=" in proc.stdout


def test_a_bad_cluster_fails_in_one_line():
    for bad, expected in (("cluster=nope", "config error: cluster: no option 'nope'; available: local p3dn p4d p5"),
                          ("cluster.nodez=2", "config error: cluster.nodez: no such config key (did you mean 'cluster.nodes'?)")):
        for script in ("launch.py", "slurm.py"):
            proc = subprocess.run([sys.executable, str(REPO / "launch" / script), bad, "--", "train.max_steps=3"],
                                  cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
            assert proc.returncode == 2 and proc.stderr.strip() == f"error: {expected}", (script, proc.stderr[-2000:])


def test_a_bad_training_override_fails_in_one_line():
    proc = launch("cluster=local", "--", "train.lr=fast")
    assert proc.returncode == 2 and proc.stdout == ""
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        "error: training overrides: config error: train.lr: Value 'fast' of type 'str' could not be converted to Float"]


def test_single_on_several_processes_is_refused_before_any_work(tmp_path):
    proc = launch("cluster=local", "cluster.gpus_per_node=2", "--", "strategy=single")
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: config error: strategy: single runs one process, but this job launches 2")
    # Plain torchrun: every rank stops at the config check, before data preparation prints its line.
    ran = torchrun(["strategy=single", f"output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}"], timeout=120)
    assert ran.returncode != 0 and "data:" not in ran.stdout and not (tmp_path / "cache").exists()
    assert ran.stderr.count("error: config error: strategy: single runs one process, but 2 were launched") == 1


@pytest.mark.slow
def test_run_flag_launches_from_anywhere_and_passes_preemption_on(tmp_path, cache_dir, model_dir):
    """`ft-launch --run` from a folder that is not the checkout; SIGUSR1 or SIGTERM sent to ft-launch alone (a
    wrapper script, `kill <pid>`) checkpoints the job and exits 85 with PREEMPTED written, and the same command
    resumes and finishes. ft-launch used to die of SIGUSR1 (rc 138), orphaning a job that never checkpointed."""
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "launch" / "launch.py"), "cluster=local", "cluster.gpus_per_node=2",
           f"master_port={free_port()}", "--run", "--", "train.max_steps=60", "train.save_every=0", "train.log_every=1",
           f"model.name_or_path={model_dir}", "model.from_config=false", f"output_dir={run}",
           "eval.before_training=false", "eval.max_examples=2", "eval.max_new_tokens=2", f"data.cache_dir={cache_dir}"]
    for attempt, sig in enumerate((signal.SIGUSR1, signal.SIGTERM)):
        before = logged_steps(run)
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: logged_steps(run) >= before + 2 or proc.poll() is not None, what="2 training steps")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 85, (sig, err[-3000:])
        assert "strategy=ddp" in out and (run / "PREEMPTED").exists() and "requeue" in err
        assert len(list((run / "checkpoints").glob("step-*/COMPLETE"))) == attempt + 1
        assert (f"at step {before}" in out) == bool(attempt)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "final" / "model.safetensors").exists() and not (run / "PREEMPTED").exists()


def test_slurm_script_resumes_unless_told_not_to(tmp_path):
    for resume, expected in (("true", "train.resume=auto"), ("false", "train.resume=null")):
        run_dir = tmp_path / resume
        proc = subprocess.run([sys.executable, str(REPO / "launch" / "slurm.py"), "cluster=local", f"resume={resume}",
                               f"run_dir={run_dir}", "--", "train.max_steps=3"], cwd=REPO, env=env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        script = (run_dir / "job.sbatch").read_text()
        assert expected in script and f"output_dir={run_dir}" in script
        # Exit 85 (checkpointed after a preemption) and 86 (the hang watchdog ended a stuck job) are requeued.
        assert '[ "$rc" = 85 ] || [ "$rc" = 86 ]' in script
