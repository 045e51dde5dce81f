"""Launch-side code: runs in the process that starts jobs, never inside the training loop. The commands that use
it (ft-launch, ft-launch slurm, ft-sweep, the per-node wrapper) are in ft_dist/commands/.

- `command_line`: the one builder of the torchrun/deepspeed line that starts the training on a node.

- `schema`: the `cluster` config group (nodes, processes per node, partition, time, env) and `ft-launch`'s config.
- `rendezvous`: the head node's address and a port, resolved inside a Slurm allocation.
- `node`: what the per-node torchrun wrapper adds: exit 85 kept, SIGUSR1/SIGTERM forwarded to the workers.
- `sbatch`: writes the sbatch script for N nodes x G processes from a cluster config and training overrides.
- `sweep`: Hydra multirun members as multi-process jobs, and the sweep summary table.
- `wandb_sweep`: a W&B sweep YAML from a Hydra sweep spec, and the agent that starts multi-process trials.

Nothing here imports torch at module level: these run on login nodes and in batch shells.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

from ft_dist.errors import ConfigError


def job_overrides(overrides: Sequence[str], world_size: int, output_dir: Optional[object] = None) -> List[str]:
    """The user's training overrides for a job of `world_size` processes.

    Several processes need a distributed strategy and the default (`single`) refuses them, so DDP is added unless
    the user named one; a job that owns its run dir replaces any `output_dir=` given.
    """
    out = [o for o in overrides if output_dir is None or not o.startswith("output_dir=")]
    if world_size > 1 and "strategy=single" in out:  # refused here, before a job starts N processes to refuse it
        raise ConfigError(
            "strategy",
            f"single runs one process, but this job launches {world_size}; choose "
            "strategy=ddp, fsdp or a zero stage, or cluster.gpus_per_node=1 cluster.nodes=1",
        )
    if world_size > 1 and not any(o.startswith("strategy=") for o in out):
        out.append("strategy=ddp")
    if output_dir is not None:
        out.append(f"output_dir={output_dir}")
    return out
