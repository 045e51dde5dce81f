"""`python launch/export.py checkpoint=runs/X/checkpoints/step-N output=exported/ [merge_lora=true]` (= ft-export)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ft_dist.commands import export  # noqa: E402

if __name__ == "__main__":
    export()
