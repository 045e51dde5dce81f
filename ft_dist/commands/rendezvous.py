"""`python -m ft_dist.commands.rendezvous`: print the head node's address and a port free on it, for the sbatch
script's c10d rendezvous (ft_dist/cluster/rendezvous.py says how the address is found)."""

from __future__ import annotations

import sys

from ft_dist.cluster.rendezvous import free_port, head_address


def main() -> None:
    print(head_address(), free_port())


if __name__ == "__main__":
    try:
        main()
    except Exception as err:  # one line for the job log, not a traceback
        print(f"rendezvous: {err}", file=sys.stderr)
        sys.exit(1)
