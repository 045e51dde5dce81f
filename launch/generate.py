"""`python launch/generate.py k=v ...` or `torchrun --nproc_per_node N launch/generate.py k=v ...` (same as ft-generate)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ft_dist.commands import generate  # noqa: E402

if __name__ == "__main__":
    generate()
