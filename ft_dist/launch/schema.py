"""Typed config for cluster launches: the `cluster` group (conf/cluster/*.yaml) and `launch/slurm.py`'s options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

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


@dataclass
class SlurmLaunchConfig:
    """`launch/slurm.py` (ft-launch slurm): write and optionally submit the sbatch script for one training run."""

    defaults: List[Any] = field(default_factory=lambda: ["_self_", {"cluster": "local"}])
    """The cluster option comes after this schema's own values, so conf/cluster/<name>.yaml sets them."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    job_name: str = "ft-dist"
    """Slurm job name; also the default run directory's prefix."""
    run_dir: Optional[str] = None
    """The training run's output_dir (absolute after resolution); None: runs/<job_name>-<time>. The script, its log
    and every checkpoint live here, so a requeued job finds them again."""
    python: Optional[str] = None
    """Python on the compute nodes; None: the interpreter running this command (same venv on a shared filesystem)."""
    resume: bool = True
    """Add `train.resume=auto`, so a requeued job continues from the latest complete checkpoint."""
    submit: bool = False
    """Also run sbatch and print the job id (else only write the script)."""


def register(cs: Any) -> None:
    """Put the cluster schema and ft-launch's primary config in Hydra's ConfigStore (call once, with the others)."""
    cs.store(group="cluster", name="cluster_schema", node=ClusterConfig)
    cs.store(name="slurm_launch", node=SlurmLaunchConfig)
