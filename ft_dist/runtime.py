"""What every layer may use about the running process: where the checkout is, seeding, the run dir, and the one
way a command reports a user error.

Nothing here imports torch or ft-dist's higher layers at module level: launch-side code (login nodes, batch
shells) imports this too.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"
ASSET_DIR = Path(__file__).resolve().parent / "assets"
TRAIN_SCRIPT = "launch/train.py"  # relative to REPO_ROOT: printed commands run from the checkout on every node


def exit_with_error(message: str, code: int = 2) -> NoReturn:
    """Print `error: <message>` once and exit with `code`.

    Under torchrun every rank meets the same user error and one copy is enough. The other ranks wait a moment
    before exiting: torchrun ends every rank as soon as one exits, which could be before rank 0 has printed.
    """
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(3)
    sys.exit(code)


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch generators, so every rank and every run draws the same numbers."""
    import random

    import numpy as np
    import torch  # here: launch-side callers of this module never need torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_output_dir(cfg: Any) -> Path:
    """The run dir: rank 0's choice on every rank (the default name embeds a timestamp each rank computes)."""
    from hydra.core.hydra_config import HydraConfig

    from ft_dist import dist  # imports torch

    out = cfg.output_dir
    try:
        hc = HydraConfig.get()
        if hc.mode is not None and hc.mode.name == "MULTIRUN":
            out = hc.runtime.output_dir
    except ValueError:  # not under Hydra (tests call run() directly)
        pass
    return Path(dist.broadcast_object(str(out))).resolve()
