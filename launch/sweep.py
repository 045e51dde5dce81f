"""`python launch/sweep.py -m --nproc-per-node 2 train.lr=1e-3,3e-3 [hydra/launcher=slurm]`: a sweep of
multi-process training jobs, run here one after another or on Slurm; writes <sweep dir>/summary.md.
`python launch/sweep.py wandb ...`: the W&B sweep YAML generator and agent (ft_dist/commands/sweep.py; how it runs: ft_dist/cluster/wandb_sweep.py).
`python launch/sweep.py curve ...`: a learning curve over data.fraction x models (ft_dist/cluster/curve.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "wandb":
        from ft_dist.commands.sweep import wandb_main

        wandb_main(sys.argv[2:])
    else:
        from ft_dist.commands.sweep import main

        main()
