"""`ft-launch`: the exact launch command of a training run for a cluster config; `--run` also executes it.

    ft-launch cluster=p4d cluster.nodes=2 [master_addr=10.0.0.1] [launcher=deepspeed] -- model=llama-2-7b strategy=zero3
    ft-launch cluster=local cluster.gpus_per_node=2 --run -- strategy=ddp train.max_steps=20
    ft-launch cluster=local max_restarts=3 --run -- strategy=ddp train.save_every=50   (a dead rank restarts the job)
    ft-launch slurm cluster=p4d cluster.nodes=4 submit=true -- ...      (writes/submits an sbatch script: commands/slurm.py)

Arguments before `--` pick the cluster (conf/cluster/*.yaml); those after it are the training overrides, validated
now exactly as ft-train would, so a typo fails here rather than on 64 GPUs.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import Dict, List, Optional

import psutil

from ft_dist.cluster import job_overrides
from ft_dist.cluster.command_line import Rendezvous, shell_line, training_command
from ft_dist.cluster.node import forward_preemption_signals
from ft_dist.cluster.rendezvous import free_port
from ft_dist.commands import slurm
from ft_dist.commands.slurm import check_train_overrides, compose_launch, exit_with_help_if_asked, split_argv
from ft_dist.errors import ConfigError, UserError
from ft_dist.runtime import REPO_ROOT, TRAIN_SCRIPT, exit_with_error


def _option(args: List[str], name: str, default: str) -> str:
    """Take `name=value` out of the launch arguments (not a cluster field; ft-launch's own)."""
    for a in list(args):
        if a.startswith(name + "="):
            args.remove(a)
            return a.split("=", 1)[1]
    return default


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["slurm"]:
        exit_with_help_if_asked(argv, __doc__ or "")
    try:
        _main(argv)
    except UserError as err:
        exit_with_error(str(err), err.exit_code)


def _main(argv: List[str]) -> None:
    if argv[:1] == ["slurm"]:
        return slurm.main(argv[1:])
    run = "--run" in argv
    argv = [a for a in argv if a != "--run"]
    launch_args, overrides = split_argv(argv)
    master_addr = _option(launch_args, "master_addr", "${MASTER_ADDR}")
    port_given = _option(launch_args, "master_port", "")
    port = int(port_given or 29500)
    launcher = _option(launch_args, "launcher", "torchrun")
    node_rank = _option(launch_args, "node_rank", "${NODE_RANK}")
    max_restarts = int(_option(launch_args, "max_restarts", "0"))
    cfg = compose_launch(launch_args)
    check_train_overrides(overrides)  # one-line error and exit 2 on a mistake
    cluster = cfg.cluster
    if cluster.nodes == 1 and master_addr == "${MASTER_ADDR}":
        master_addr = "127.0.0.1"
        if run and not port_given:  # two local jobs must not meet on torchrun's default port
            port = free_port()
    env: Dict[str, str] = {k: str(v) for k, v in cluster.env.items()}
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default; deepspeed's launcher sets none (N procs x all cores)
    if max_restarts and launcher != "torchrun":
        raise ConfigError("max_restarts", "restarts in place need launcher=torchrun (deepspeed's launcher has none)")
    nodes, gpus = cluster.nodes, cluster.gpus_per_node
    # c10d is torchrun's elastic rendezvous (each restart is a new round); ft_dist.dist scopes the process group's
    # store keys per attempt, which restarts need under either rendezvous.
    elastic = launcher == "torchrun" and (nodes > 1 or max_restarts)
    rendezvous = Rendezvous(master_addr, str(port), "ft-dist" if elastic else None)
    cmd = training_command(
        nodes,
        gpus,
        job_overrides(overrides, nodes * gpus),
        rendezvous,
        launcher,
        max_restarts=max_restarts,
        node_rank=node_rank,
    )
    world = cluster.nodes * cluster.gpus_per_node
    where = "on each of the nodes" if cluster.nodes > 1 else "on the node"
    print(
        f"# {cluster.name}: {cluster.nodes} node(s) x {cluster.gpus_per_node} processes = world size {world}; run {where}:"
    )
    print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " \\\n  " + shell_line(cmd))
    if run:
        if cluster.nodes > 1 and ("${" in master_addr or "${" in node_rank):
            exit_with_error("--run on several nodes needs master_addr=... (and node_rank=... for deepspeed)")
        # The printed line runs from the checkout on each node; here the script is this checkout's, from any folder,
        # and torchrun runs through ft-dist's node wrapper, keeping exit 85 that plain torchrun reports as 1.
        exe = training_command(
            nodes,
            gpus,
            job_overrides(overrides, nodes * gpus),
            rendezvous,
            launcher,
            python=sys.executable if launcher == "torchrun" else None,
            script=str(REPO_ROOT / TRAIN_SCRIPT),
            max_restarts=max_restarts,
            node_rank=node_rank,
        )
        print(f"# running: {shell_line(exe)}", flush=True)
        child = subprocess.Popen(exe, env={**os.environ, **env})
        sys.exit(_supervise(child, launcher))


def _supervise(child: subprocess.Popen, launcher: str) -> int:
    """Wait for the launcher; a preemption signal sent to ft-launch alone reaches the training processes.

    ft_dist.commands.node forwards SIGUSR1/SIGTERM to its workers itself. The deepspeed launchers die on SIGUSR1 and
    kill their workers on SIGTERM, so there the signal goes straight to the processes running the training script.
    """

    def targets() -> List[psutil.Process]:
        if launcher == "torchrun":
            return [psutil.Process(child.pid)]
        return [
            p
            for p in psutil.Process(child.pid).children(recursive=True)
            if any(a.endswith(TRAIN_SCRIPT) for a in p.cmdline())
        ]

    forward_preemption_signals(targets)
    return child.wait()
