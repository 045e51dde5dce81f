"""torchrun for one node, keeping exit 85 and passing SIGUSR1/SIGTERM on to the workers (ft_dist/cluster/node.py
says why torchrun alone does neither).

    python -m ft_dist.commands.node <torchrun arguments> launch/train.py k=v ...
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

from ft_dist import EXIT_REQUEUE
from ft_dist.cluster.node import children, forward_preemption_signals, node_exit_code


def main(argv: Optional[List[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    forward_preemption_signals(children)  # the worker processes torchrun starts
    args = get_args_parser().parse_args(argv if argv is not None else sys.argv[1:])
    # torchrun would otherwise take SIGTERM back (it installs its handlers when it starts the workers).
    args.signals_to_handle = ",".join(s for s in args.signals_to_handle.split(",") if s.strip() != "SIGTERM")
    try:
        run(args)
    except ChildFailedError as err:
        codes = [failure.exitcode for _, failure in sorted(err.failures.items())]
        code = node_exit_code(codes)
        node = os.environ.get("SLURM_NODEID", "0")
        if code == EXIT_REQUEUE:
            print(f"[ft-dist node {node}] workers checkpointed and exited {code}: requeue", file=sys.stderr, flush=True)
        else:
            print(f"[ft-dist node {node}] workers exited with {codes}; node exits {code}", file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
