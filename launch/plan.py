"""`python launch/plan.py k=v ...` (same as ft-plan)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ft_dist.commands import plan  # noqa: E402

if __name__ == "__main__":
    plan()
