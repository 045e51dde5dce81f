"""The ft-* commands: the top layer, and the only one that holds entry points.

Each command is a module here with a `run(cfg)` (or `main()` for the launch-side ones) that wires the library
layers together; its primary config and pre-flight check live in `schema.py`. The table below is what
pyproject.toml's console scripts and the `launch/*.py` shims call. A command's own module is imported only after
its config passed the pre-flight check, so a mistake costs well under a second, before torch is imported.

    ft-train     commands/train.py      ft-eval      commands/eval.py (eval, compare, mc)
    ft-generate  commands/eval.py       ft-data      commands/data.py (report, show, generate)
    ft-export    commands/export.py     ft-plan      commands/plan.py
    ft-launch    commands/launch.py (ft-launch slurm: commands/slurm.py)
    ft-sweep     commands/sweep.py      per-node torchrun wrapper: commands/node.py
"""

import os
import sys

from ft_dist.commands.schema import validate_data_run, validate_eval_run, validate_generate_run, validate_plan
from ft_dist.commands.startup import entry
from ft_dist.config import validate, validate_launched

# Torch threads: torchrun sets OMP_NUM_THREADS=1 for each process; a single process keeps the library default.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

train = entry("train", "ft_dist.commands.train:run", validate_launched)
evaluate = entry(
    "eval", "ft_dist.commands.eval:run", validate_eval_run, verbs={"compare": "mode=compare", "mc": "mode=mc"}
)
generate = entry("generate", "ft_dist.commands.eval:generate", validate)
_data_report = entry(
    "data", "ft_dist.commands.data:run", validate_data_run, verbs={"report": "action=report", "show": "action=show"}
)
_data_generate = entry("data_generate", "ft_dist.commands.data:generate", validate_generate_run)


def data() -> None:
    """`ft-data report|show ...` (conf/data.yaml) or `ft-data generate ...` (conf/data_generate.yaml, its own schema)."""
    if len(sys.argv) > 1 and sys.argv[1] == "generate":
        del sys.argv[1]
        _data_generate()
    else:
        _data_report()


export = entry("export", "ft_dist.commands.export:run", check=lambda cfg: None)  # the run's own config.yaml is checked
plan = entry("plan", "ft_dist.commands.plan:run", validate_plan)
