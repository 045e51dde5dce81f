"""`python launch/eval.py k=v ...` or `torchrun --nproc_per_node N launch/eval.py k=v ...` (same as ft-eval)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ft_dist.commands import evaluate  # noqa: E402

if __name__ == "__main__":
    evaluate()
