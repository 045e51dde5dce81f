"""Typed config for cluster launches: the `cluster` group (conf/cluster/*.yaml) and `launch/slurm.py`'s options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from omegaconf import MISSING


@dataclass
class ClusterConfig:
    """One kind of Slurm cluster: its shape, its queue, and the environment its training processes need."""

    name: str = MISSING
    """Short name (local, p3dn, p4d, p5); used in job names."""
    nodes: int = 1
    """Nodes per job."""
    gpus_per_node: int = 1
    """Training processes per node (one per GPU). On a CPU cluster (`local`) it is simply the process count."""
    request_gpus: bool = True
    """Ask Slurm for `--gpus-per-node`; off where the nodes have no GPU gres (the local test cluster)."""
    cpus_per_task: int = 0
    """CPUs for the one task per node (all of a node's processes share it); 0 leaves it to the partition's default."""
    partition: Optional[str] = None
    """Slurm partition (queue); None uses the cluster's default partition."""
    account: Optional[str] = None
    """Slurm account to charge, where the site needs one."""
    time: str = "04:00:00"
    """Wall-clock limit per job run (HH:MM:SS or D-HH:MM:SS). A requeued job gets the full limit again."""
    signal_seconds: int = 300
    """Slurm sends SIGUSR1 to the batch shell this many seconds before the limit (it may come up to 60 s earlier);
    the script forwards it to the training processes, which checkpoint, and requeues the job."""
    max_requeues: int = 20
    """Stop requeueing after this many restarts (a run that cannot make progress must not loop forever)."""
    exclusive: bool = True
    """Whole nodes (`--exclusive`): another job's traffic on the NICs skews step times and NCCL timeouts."""
    env: Dict[str, str] = field(default_factory=dict)
    """Environment for the training processes: NCCL/EFA/OMP settings for this hardware."""
    setup: List[str] = field(default_factory=list)
    """Shell lines run before training on every node (e.g. `module load cuda/12.6`, `source venv/bin/activate`)."""
    sbatch_extra: List[str] = field(default_factory=list)
    """Extra `#SBATCH` options, verbatim (e.g. `--constraint=a100`, `--qos=high`)."""
