"""`ft-launch slurm` / `python launch/slurm.py`: write (and with submit=true, submit) a training run's sbatch script.

    python launch/slurm.py cluster=p4d cluster.nodes=4 job_name=llama7b submit=true -- model=llama-2-7b strategy=fsdp

Arguments before `--` configure the launch (conf/cluster/*.yaml, ft_dist/cluster/schema.py); arguments after it are
the training overrides, checked here against the training schema so a typo fails now, not in the queue.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from ft_dist.cluster import sbatch
from ft_dist.commands.startup import compose_checked, describe_composition_error
from ft_dist.config import validate
from ft_dist.errors import UserError
from ft_dist.runtime import CONF_DIR, exit_with_error


def split_argv(argv: List[str]) -> Tuple[List[str], List[str]]:
    """(launch overrides, training overrides) around the first `--`."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def exit_with_help_if_asked(argv: List[str], doc: str) -> None:
    """`-h` / `--help` before `--`: the command's usage and the cluster configs there are, then exit 0.

    Without this, Hydra's override parser reads `--help` as an override and fails with a lexer error.
    """
    if not {"-h", "--help"} & set(split_argv(argv)[0]):
        return
    clusters = sorted(p.stem for p in (CONF_DIR / "cluster").glob("*.yaml"))
    print(doc.strip())
    print(f"\nclusters (cluster=...): {', '.join(clusters)}; fields: ft_dist/cluster/schema.py")
    sys.exit(0)


def compose_launch(overrides: List[str]) -> DictConfig:
    """The launch config (`slurm_launch` + a `cluster` option) with these overrides."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="slurm_launch", overrides=overrides)
    except Exception as ex:  # a wrong cluster name or key: the one line ft-train would print
        raise UserError(describe_composition_error("slurm_launch", ex)) from ex
    finally:
        GlobalHydra.instance().clear()


def check_train_overrides(overrides: List[str]) -> None:
    """Compose and validate the training config, as `ft-train` would before starting."""
    GlobalHydra.instance().clear()
    try:
        compose_checked("train", overrides, validate)
    except UserError as err:
        raise UserError("training overrides: " + str(err)) from err
    finally:
        GlobalHydra.instance().clear()


def prepare(argv: List[str]) -> Tuple[DictConfig, Path]:
    """Compose, check, and write the script; returns (launch config, script path)."""
    launch_args, train_args = split_argv(argv)
    cfg = compose_launch(launch_args)
    run_dir = Path(cfg.run_dir or f"runs/{cfg.job_name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    world_size = cfg.cluster.nodes * cfg.cluster.gpus_per_node
    check_train_overrides(sbatch.train_overrides(train_args, run_dir, cfg.resume, world_size))
    script = sbatch.write(cfg.cluster, train_args, run_dir, job_name=cfg.job_name, python=cfg.python, resume=cfg.resume)
    return cfg, script


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    exit_with_help_if_asked(argv, __doc__ or "")
    try:
        cfg, script = prepare(argv)
    except UserError as err:
        exit_with_error(str(err), err.exit_code)
    print(f"wrote {script}")
    if cfg.submit:
        job = sbatch.submit(script)
        print(f"submitted job {job}; log: {script.parent / 'slurm.log'}")
        print(f"monitor: squeue -j {job}; tail -f {script.parent / 'slurm.log'}")
    else:
        print(f"submit: sbatch {script}")
