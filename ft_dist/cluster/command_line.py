"""The one builder of the command line that starts ft-train's processes on a node: ft-launch prints and runs it,
the sbatch script, both sweep launchers and the planner's launch.sh are made from it.

Values may be shell variables (`$HEAD_ADDR`, `${MASTER_ADDR}`) where the line is run by a shell that knows them.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import List, Optional, Sequence

from ft_dist.runtime import TRAIN_SCRIPT

NODE_WRAPPER = ["-m", "ft_dist.commands.node"]
"""`python -m ft_dist.commands.node`: torchrun's own code, keeping exit 85 and forwarding USR1/TERM."""


@dataclass(frozen=True)
class Rendezvous:
    """How the processes of a job find each other.

    `address=None`: one node on its own (torchrun --standalone). With `elastic_id`: torchrun's c10d rendezvous,
    which several nodes and restarts in place need (each restart is a new round). Otherwise a fixed
    master address and port.
    """

    address: Optional[str] = None
    port: str = "29500"
    elastic_id: Optional[str] = None


def torchrun_args(nnodes: object, nproc: object, rendezvous: Rendezvous, max_restarts: int = 0) -> List[str]:
    args = ["--nnodes", str(nnodes), "--nproc_per_node", str(nproc)]
    if max_restarts:  # torchrun's default is none
        args += ["--max-restarts", str(max_restarts)]
    if rendezvous.address is None:
        return [*args, "--standalone"]
    if rendezvous.elastic_id is not None:
        return [
            *args,
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            f"{rendezvous.address}:{rendezvous.port}",
            "--rdzv_id",
            rendezvous.elastic_id,
        ]
    return [*args, "--master_addr", rendezvous.address, "--master_port", str(rendezvous.port)]


def deepspeed_args(nnodes: int, nproc: int, rendezvous: Rendezvous, node_rank: str) -> List[str]:
    args = [
        "--num_nodes",
        str(nnodes),
        "--num_gpus",
        str(nproc),
        "--master_addr",
        str(rendezvous.address),
        "--master_port",
        str(rendezvous.port),
    ]
    if nnodes > 1:  # every node starts its own launcher: no ssh/pdsh fan-out from the first node
        args += ["--no_ssh", "--node_rank", node_rank]
    return args


def training_command(
    nnodes: object,
    nproc: object,
    overrides: Sequence[str],
    rendezvous: Rendezvous,
    launcher: str = "torchrun",
    python: Optional[str] = None,
    script: str = TRAIN_SCRIPT,
    max_restarts: int = 0,
    node_rank: str = "0",
) -> List[str]:
    """The argv that starts ft-train's processes on one node.

    `python=None` gives the line people read and paste (`torchrun ...` / `deepspeed ...`); with an interpreter,
    torchrun runs through ft-dist's node wrapper (`<python> -m ft_dist.commands.node ...`), which keeps exit 85.
    """
    if launcher == "deepspeed":
        return [
            "deepspeed",
            *deepspeed_args(int(str(nnodes)), int(str(nproc)), rendezvous, node_rank),
            script,
            *overrides,
        ]
    head = ["torchrun"] if python is None else [python, *NODE_WRAPPER]
    return [*head, *torchrun_args(nnodes, nproc, rendezvous, max_restarts), script, *overrides]


def shell_line(argv: Sequence[str]) -> str:
    """argv as one shell line: words holding `$` are double-quoted (the shell expands them), the rest quoted."""
    return " ".join(f'"{a}"' if "$" in a else shlex.quote(a) for a in argv)
