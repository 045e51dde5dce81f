"""Where the nodes of a Slurm job meet: the first node's IP address and a free port on it.

`scontrol show hostnames` gives node *names*, and a node name need not resolve on the compute network (the two-node
emulation's n1/n2 do not resolve at all; on some sites only the NodeAddr or an FQDN does). torch's c10d rendezvous
needs an address every node can connect to, so we take the node's NodeAddr from slurmctld and resolve that to an
IPv4 address, falling back to the name only when it resolves. The batch shell runs on the first node, so the port
it finds free there is the one torchrun on that node will bind.

    python -m ft_dist.commands.rendezvous       # prints "ADDR PORT" inside an allocation
"""

from __future__ import annotations

import os
import socket
import subprocess
from typing import List, Optional, cast


def job_hostnames(nodelist: Optional[str] = None) -> List[str]:
    """Expand a Slurm nodelist (`n[1-2]`) into node names, in Slurm's order (the first one hosts rank 0)."""
    nodelist = nodelist or os.environ["SLURM_JOB_NODELIST"]
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True)
    return out.stdout.split()


def node_addr(node: str) -> Optional[str]:
    """The NodeAddr slurmctld has for a node (what slurmd itself is reached at), or None if scontrol fails."""
    out = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True)
    for field in out.stdout.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    return None


def _ipv4(name: str) -> Optional[str]:
    try:
        # An AF_INET sockaddr is (host: str, port: int); typeshed types the address items as str | int.
        return cast(str, socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
    except (socket.gaierror, IndexError, UnicodeError):
        return None


def head_address(nodelist: Optional[str] = None) -> str:
    """An IPv4 address of the job's first node that other nodes can connect to."""
    head = job_hostnames(nodelist)[0]
    for candidate in (node_addr(head), head):
        if candidate and (ip := _ipv4(candidate)):
            return ip
    raise RuntimeError(f"cannot resolve the head node {head!r} (NodeAddr {node_addr(head)!r}) to an address")


def free_port() -> int:
    """A TCP port free on this host right now (the batch shell runs on the head node)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
