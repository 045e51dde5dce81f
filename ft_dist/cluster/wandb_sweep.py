"""W&B sweeps whose trials are multi-process jobs, without any rank ever creating a sweep (wandb issue 7811).

The one launching process owns the sweep and the agent; each trial is the command in the sweep YAML, which starts
torchrun (through `ft_dist.commands.node`) with the suggested values as Hydra overrides. W&B's agent protocol hands a
trial its identity in the environment (WANDB_SWEEP_ID, WANDB_RUN_ID, WANDB_SWEEP_PARAM_PATH); every rank inherits
it, but only global rank 0 calls `wandb.init` (ft_dist.tracking), which joins that run. So a sweep of 8-GPU jobs
needs one agent, not one per GPU.

    python launch/sweep.py wandb yaml --nproc-per-node 2 --method grid -o sweep.yaml -- train.lr=1e-4,3e-4 peft=lora
    python launch/sweep.py wandb agent sweep.yaml --count 2      # online with WANDB_API_KEY, else the offline agent

Online, `wandb.sweep` registers the YAML and `wandb.agent` (command mode) runs the trials. Offline (no key, or
WANDB_MODE=offline) there is no server to suggest values, so `offline_agent` does the grid or random search here and
starts each trial exactly as the real agent would: the command built by wandb's own `create_sweep_command`, the same
environment variables, the parameters file the run reads its config from. Offline runs are `wandb sync`-able.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, cast

import yaml

from ft_dist.cluster import job_overrides
from ft_dist.cluster.command_line import Rendezvous, training_command
from ft_dist.runtime import REPO_ROOT, TRAIN_SCRIPT


def _sweep_parameter(override: Any) -> Dict[str, Any]:
    """One Hydra sweep override (`a,b`, choice, range, interval, tag(log, interval)) as a W&B parameter."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    value = override.value()
    if isinstance(value, (ChoiceSweep, RangeSweep)):
        return {"values": [v for v in override.sweep_iterator()]}
    if isinstance(value, IntervalSweep):
        log = "log" in (value.tags or set())
        return {"distribution": "log_uniform_values" if log else "uniform", "min": value.start, "max": value.end}
    raise ValueError(f"{override.input_line}: unsupported sweep {type(value).__name__}")


def sweep_config(
    overrides: Sequence[str],
    nproc_per_node: int = 1,
    method: str = "grid",
    metric: str = "eval_loss",
    goal: str = "minimize",
    name: Optional[str] = None,
    runs_dir: str = "runs/wandb-sweeps",
) -> Dict[str, Any]:
    """A W&B sweep config from a Hydra sweep spec: sweep overrides become parameters, the rest stay fixed.

    The command runs one trial as a multi-process job; `${args_no_hyphens}` is where the agent puts `key=value`.
    Each trial's output_dir is named after its W&B run id, resolved by Hydra in the training process.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    parameters = {o.get_key_element(): _sweep_parameter(o) for o in parsed if o.is_sweep_override()}
    # Override.input_line is Optional in hydra; parse_overrides sets it on every override it returns.
    fixed = cast(List[str], [o.input_line for o in parsed if not o.is_sweep_override()])
    if not parameters:
        raise ValueError("no sweep override (e.g. train.lr=1e-4,3e-4 or train.lr=interval(1e-5,1e-3))")
    if method == "grid" and any("values" not in p for p in parameters.values()):
        raise ValueError("grid search needs discrete values; use --method random for interval(...)")
    fixed = job_overrides(fixed, nproc_per_node)
    if not any(f.startswith("logger=") for f in fixed):
        fixed.append("logger=wandb")
    runs = Path(runs_dir).resolve()
    trial = [*fixed, f"output_dir={runs}/" + "${oc.env:WANDB_RUN_ID}", "${args_no_hyphens}"]
    command = ["${env}", *training_command(1, nproc_per_node, trial, Rendezvous(), python=sys.executable)]
    config: Dict[str, Any] = {
        "program": TRAIN_SCRIPT,
        "method": method,
        "metric": {"name": metric, "goal": goal},
        "parameters": parameters,
        "command": command,
    }
    if name:
        config["name"] = name
    return config


def suggestions(config: Dict[str, Any], count: Optional[int], seed: int = 0) -> Iterator[Dict[str, Any]]:
    """The offline agent's search: every grid point in order, or `count` random draws."""
    params = config["parameters"]
    keys = sorted(params)
    if config["method"] == "grid":
        grid = itertools.product(*(params[k]["values"] for k in keys))
        yield from (dict(zip(keys, values)) for values in itertools.islice(grid, count))
        return
    if config["method"] != "random":
        raise ValueError(f"the offline agent does grid and random search, not {config['method']!r} (needs a server)")
    rng = random.Random(seed)
    import math

    def draw(p: Dict[str, Any]) -> Any:
        if "values" in p:
            return rng.choice(p["values"])
        if p.get("distribution") == "log_uniform_values":
            return math.exp(rng.uniform(math.log(p["min"]), math.log(p["max"])))
        return rng.uniform(p["min"], p["max"])

    for _ in range(count or 1):
        yield {k: draw(params[k]) for k in keys}


def trial_command(config: Dict[str, Any], values: Dict[str, Any]) -> List[str]:
    """The trial's argv, built the way wandb's agent builds it (its own macro expansion)."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = {"args": {k: {"value": v} for k, v in values.items()}}
    sweep_vars = sweep_utils.create_sweep_command_args(command)
    sweep_vars.update(env=["/usr/bin/env"], interpreter=[sys.executable], program=[config["program"]])
    argv: List[str] = []
    for item in sweep_utils.create_sweep_command(config["command"]):
        item = str(item)
        argv += sweep_vars.get(item[2:-1], []) if item.startswith("${") and item.endswith("}") else [item]
    return argv


def offline_agent(
    config: Dict[str, Any], count: Optional[int], sweep_id: Optional[str] = None, wandb_dir: Optional[Path] = None
) -> List[Dict[str, Any]]:
    """Run `count` trials one after another, each a multi-process job; returns one record per trial."""
    from wandb.sdk.lib.runid import generate_id

    sweep_id = sweep_id or f"local-{generate_id()}"
    # Where the real agent keeps its per-run parameter files: $WANDB_DIR/wandb/sweep-<id>/ (here runs/ by default).
    wandb_dir = Path(wandb_dir or Path(os.environ.get("WANDB_DIR", REPO_ROOT / "runs")) / "wandb").resolve()
    results = []
    for values in suggestions(config, count):
        run_id = generate_id()
        param_path = wandb_dir / f"sweep-{sweep_id}" / f"config-{run_id}.yaml"
        param_path.parent.mkdir(parents=True, exist_ok=True)
        # The file wandb.init reads a sweep run's parameters from (the agent writes the same format).
        param_path.write_text(yaml.safe_dump({"wandb_version": 1, **{k: {"value": v} for k, v in values.items()}}))
        env = {
            **os.environ,
            "WANDB_MODE": "offline",
            "WANDB_SWEEP_ID": sweep_id,
            "WANDB_RUN_ID": run_id,
            "WANDB_SWEEP_PARAM_PATH": str(param_path),
            "WANDB_RUN_GROUP": sweep_id,
            "WANDB_PROJECT": os.environ.get("WANDB_PROJECT", "ft-dist"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        }
        argv = trial_command(config, values)
        print(f"[wandb-sweep {sweep_id}] trial {run_id}: {json.dumps(values)}", flush=True)
        code = subprocess.run(argv, cwd=REPO_ROOT, env=env).returncode
        results.append({"sweep_id": sweep_id, "run_id": run_id, "values": values, "exit_code": code})
    return results


def online_agent(
    config: Dict[str, Any], count: Optional[int], sweep_id: Optional[str], project: str, entity: Optional[str]
) -> None:
    """Register the sweep (here, once) unless given its id, then run W&B's own agent in command mode."""
    import wandb

    sweep_id = sweep_id or wandb.sweep(config, project=project, entity=entity)
    os.chdir(REPO_ROOT)  # the command's launch/train.py is relative to the checkout
    wandb.agent(sweep_id, entity=entity, project=project, count=count)
