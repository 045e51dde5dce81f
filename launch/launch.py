"""`python launch/launch.py cluster=... [--run] -- <train overrides>` (= ft-launch): print/run the launch command."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ft_dist.commands.launch import main  # noqa: E402

if __name__ == "__main__":
    main()
