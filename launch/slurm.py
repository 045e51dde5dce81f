"""`python launch/slurm.py cluster=p4d cluster.nodes=2 [submit=true] -- <training overrides>`: write the sbatch script."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ft_dist.commands.slurm import main  # noqa: E402

if __name__ == "__main__":
    main()
