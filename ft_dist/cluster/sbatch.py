"""Write the sbatch script for one training run on N nodes x G processes, from a cluster config.

The script (one srun task per node, each running torchrun through `ft_dist.commands.node`):
- rendezvous: c10d on the first node's resolved IP and a port free there (`ft_dist.cluster.rendezvous`), id = job id
  + restart count, so a requeued job never meets a stale rendezvous;
- preemption: `--signal=B:USR1@<s>` reaches the batch shell, which forwards USR1 (and TERM) to srun; srun passes it
  to each node's launcher, which passes it to the workers; they checkpoint and exit 85;
- requeue: exit code 85 (or a forwarded signal while the run is unfinished) becomes `scontrol requeue`, capped by
  `max_requeues`; `--requeue --open-mode=append` keeps one log across restarts, and `train.resume=auto` continues.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ft_dist import EXIT_HANG, EXIT_REQUEUE
from ft_dist.cluster import job_overrides
from ft_dist.cluster.command_line import Rendezvous, shell_line, training_command
from ft_dist.runtime import REPO_ROOT


def train_overrides(overrides: Sequence[str], run_dir: Path, resume: bool, world_size: int = 1) -> List[str]:
    """The job's training overrides (`job_overrides`: a distributed strategy, this run dir), resume as asked."""
    out = job_overrides(overrides, world_size, output_dir=run_dir)
    if not any(o.startswith("train.resume=") for o in out):  # the user's own choice wins
        out.append("train.resume=auto" if resume else "train.resume=null")
    return out


def _sbatch_lines(cluster: Any, job_name: str, log: Path) -> List[str]:
    opts = [
        f"--job-name={job_name}",
        f"--nodes={cluster.nodes}",
        "--ntasks-per-node=1",
        f"--time={cluster.time}",
        f"--signal=B:USR1@{cluster.signal_seconds}",
        "--requeue",
        "--open-mode=append",
        f"--output={log}",
        f"--error={log}",
    ]
    if cluster.request_gpus and cluster.gpus_per_node:
        opts.append(f"--gpus-per-node={cluster.gpus_per_node}")
    if cluster.cpus_per_task:
        opts.append(f"--cpus-per-task={cluster.cpus_per_task}")
    if cluster.partition:
        opts.append(f"--partition={cluster.partition}")
    if cluster.account:
        opts.append(f"--account={cluster.account}")
    if cluster.exclusive:
        opts.append("--exclusive")
    opts += list(cluster.sbatch_extra)
    return [f"#SBATCH {o}" for o in opts]


_BODY = r"""
set -uo pipefail
cd __REPO__
__SETUP__
__ENV__
RUN_DIR=__RUN_DIR__
RESTART="${SLURM_RESTART_COUNT:-0}"
read -r HEAD_ADDR HEAD_PORT < <(__PYTHON__ -m ft_dist.commands.rendezvous) || { echo "[ft-dist] no rendezvous address"; exit 1; }
echo "[ft-dist] $(date '+%F %T') job $SLURM_JOB_ID restart $RESTART on $SLURM_JOB_NODELIST; rendezvous $HEAD_ADDR:$HEAD_PORT"

# USR1 is the time-limit warning (--signal=B:USR1@N): checkpoint, then requeue. TERM is scancel (or the allocation
# ending): the training still checkpoints, but the job must not come back (Slurm's own preemption requeues itself).
preempted=0; cancelled=0
forward() {
  if [ "$1" = USR1 ]; then preempted=1; else cancelled=1; fi
  echo "[ft-dist] $(date '+%F %T') got SIG$1: forwarding to the training processes"
  [ -n "${srun_pid:-}" ] && kill -s "$1" "$srun_pid" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

srun --ntasks-per-node=1 --kill-on-bad-exit=0 \
  __TRAINING__ &
srun_pid=$!
while :; do
  wait "$srun_pid"; rc=$?
  # A trapped signal interrupts `wait` (status > 128) while srun keeps running: wait for it again.
  if [ "$rc" -gt 128 ] && kill -0 "$srun_pid" 2>/dev/null; then continue; fi
  break
done
echo "[ft-dist] $(date '+%F %T') training exited with $rc"

finished=0; [ -f "$RUN_DIR/eval.json" ] && finished=1
# __EXIT_HANG__: the hang watchdog named a stuck rank and ended the job; it restarts from its checkpoint like a preemption.
if [ "$cancelled" = 0 ] && { [ "$rc" = __EXIT_REQUEUE__ ] || [ "$rc" = __EXIT_HANG__ ] || { [ "$preempted" = 1 ] && [ "$finished" = 0 ]; }; }; then
  if [ "$RESTART" -lt __MAX_REQUEUES__ ]; then
    echo "[ft-dist] $(date '+%F %T') checkpointed; requeueing job $SLURM_JOB_ID (restart $((RESTART + 1)))"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "[ft-dist] gave up after $RESTART requeues (cluster.max_requeues)"
  exit 1
fi
exit "$rc"
"""


def render(
    cluster: Any,
    overrides: Sequence[str],
    run_dir: Path,
    job_name: str = "ft-dist",
    python: Optional[str] = None,
    resume: bool = True,
) -> str:
    """The sbatch script text. `overrides` are training overrides (`model=... strategy=...`)."""
    run_dir = Path(run_dir).resolve()
    env: Dict[str, str] = dict(cluster.env)
    final = train_overrides(overrides, run_dir, resume, cluster.nodes * cluster.gpus_per_node)
    body = (
        _BODY.replace("__REPO__", shlex.quote(str(REPO_ROOT)))
        .replace("__SETUP__", "\n".join(cluster.setup))
        .replace("__ENV__", "\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in env.items()))
        .replace("__RUN_DIR__", shlex.quote(str(run_dir)))
        .replace("__PYTHON__", shlex.quote(python or sys.executable))
        .replace(
            "__TRAINING__",
            shell_line(
                training_command(
                    "$SLURM_JOB_NUM_NODES",
                    cluster.gpus_per_node,
                    final,
                    Rendezvous("$HEAD_ADDR", "$HEAD_PORT", "$SLURM_JOB_ID-$RESTART"),
                    python=python or sys.executable,
                )
            ),
        )
        .replace("__EXIT_REQUEUE__", str(EXIT_REQUEUE))
        .replace("__EXIT_HANG__", str(EXIT_HANG))
        .replace("__MAX_REQUEUES__", str(cluster.max_requeues))
    )
    header = [
        "#!/bin/bash",
        f"# ft-dist: {cluster.name}, {cluster.nodes} node(s) x {cluster.gpus_per_node} "
        f"process(es); written by `ft-launch slurm` (launch/slurm.py). Resubmit as is: it resumes.",
        *_sbatch_lines(cluster, job_name, run_dir / "slurm.log"),
    ]
    return "\n".join(header) + "\n" + body


def write(cluster: Any, overrides: Sequence[str], run_dir: Path, **kwargs: Any) -> Path:
    """Write `<run_dir>/job.sbatch` and return its path (the run dir holds the script, its log and checkpoints)."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "job.sbatch"
    path.write_text(render(cluster, overrides, run_dir, **kwargs))
    path.chmod(0o755)
    return path


def submit(script: Path) -> str:
    """sbatch the script; return the job id."""
    import subprocess

    out = subprocess.run(["sbatch", "--parsable", str(script)], check=True, capture_output=True, text=True)
    return out.stdout.strip().split(";")[0]
