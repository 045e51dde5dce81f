"""torchrun for one node, with two things a Slurm job needs that torchrun alone does not give.

1. The training's exit code. torchrun reports any failed worker as exit code 1, so "checkpointed after a preemption
   signal, please requeue" (`EXIT_REQUEUE`, 85) would be lost. Here, when every failed worker exited 85, this
   process exits 85 too, and the batch script turns that into `scontrol requeue`.
2. The preemption signals, SIGUSR1 and SIGTERM. torchrun installs no handler for SIGUSR1, so its default action
   would kill the agent and orphan the workers; on SIGTERM torchrun signals the workers, gives them 30 s and exits 1
   with a traceback, whatever they did. Here both are passed on to the worker processes (which checkpoint at the
   next step boundary and exit 85) while torchrun keeps supervising them. SIGINT (Ctrl-C) stays torchrun's.

The command is ft_dist/commands/node.py:

    python -m ft_dist.commands.node <torchrun arguments> launch/train.py k=v ...
"""

from __future__ import annotations

import signal
from typing import Callable, Iterable, List

import psutil

from ft_dist import EXIT_REQUEUE  # "checkpointed after a preemption signal, please requeue"

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)  # what ft_dist.dist.install_preemption_handlers catches


def forward_preemption_signals(targets: Callable[[], Iterable[psutil.Process]]) -> None:
    """From now on, SIGUSR1/SIGTERM to this process are sent on to `targets()` instead of ending it."""

    def forward(signum: int, _frame: object) -> None:
        for proc in targets():
            try:
                proc.send_signal(signum)
            except psutil.NoSuchProcess:
                pass

    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, forward)


def children() -> List[psutil.Process]:
    return psutil.Process().children(recursive=False)


def node_exit_code(exit_codes: List[int]) -> int:
    """This node's exit code from its failed workers' codes.

    85 only when every failed worker asked for a requeue. Otherwise the first worker's own code (2 for a user
    error, ...), skipping the negative codes of workers torchrun killed because another one had already failed.
    """
    if exit_codes and all(c == EXIT_REQUEUE for c in exit_codes):
        return EXIT_REQUEUE
    return next((c for c in exit_codes if c > 0), 1)
