"""How a command starts: Hydra composition, the pre-flight check, the run dir's remembered config, and errors as
one line. The commands themselves are listed in ft_dist/commands/__init__.py.

Each command composes `conf/<name>.yaml` with the command-line overrides, validates it, and only then imports the
heavy libraries. Hydra reports composition errors over several lines with a hint about HYDRA_FULL_ERROR; we compose
once up front ourselves so a misspelt key or a bad value becomes one line naming the key, and exit code 2.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, cast

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ft_dist.commands.schema import register_configs
from ft_dist.config import validate
from ft_dist.errors import UserError
from ft_dist.runtime import ASSET_DIR, CONF_DIR, REPO_ROOT, exit_with_error


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("ft_dist.asset"):
        OmegaConf.register_new_resolver("ft_dist.asset", lambda name: str(ASSET_DIR / name))
        OmegaConf.register_new_resolver("ft_dist.repo_root", lambda: str(REPO_ROOT))
        OmegaConf.register_new_resolver("ft_dist.stem", lambda path: _stem(str(path)))


register_configs()
_register_resolvers()


def _known_keys(config_name: str) -> List[str]:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name)
    keys: List[str] = []

    def walk(node: Any, prefix: str) -> None:
        for k in node.keys() if isinstance(node, DictConfig) else []:
            keys.append(prefix + str(k))
            child = node._get_node(k)
            if isinstance(child, DictConfig):
                walk(child, prefix + str(k) + ".")

    walk(cfg, "")
    return keys


def describe_composition_error(config_name: str, ex: BaseException) -> str:
    """Turn Hydra/OmegaConf composition errors into one line naming the key and what was expected."""
    cause = ex.__cause__ if isinstance(ex.__cause__, OmegaConfBaseException) else ex
    key = getattr(cause, "full_key", None)
    text = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    if "not in struct" in text or "Could not override" in str(ex) or "Could not append" in str(ex):
        key = key or str(ex).split("'")[1]
        close = difflib.get_close_matches(key, _known_keys(config_name), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"config error: {key}: no such config key{hint}"
    missing = re.search(r"Could not find '([^/']+)/([^']+)'", str(ex))
    if missing:
        group, option = missing.groups()
        available = re.search(r"Available options in '[^']+':\s*(.*?)\s*(Config search path|$)", str(ex), re.S)
        # Schemas registered in a group (e.g. cluster_schema) are bases for the options, not options themselves.
        choices = (
            " ".join(c for c in available.group(1).split() if not c.endswith("_schema"))
            if available
            else "see conf/" + group
        )
        return f"config error: {group}: no option {option!r}; available: {choices}"
    if key:
        return f"config error: {key}: {text}"
    return "config error: " + " ".join(str(ex).split())


def _stem(path: str) -> str:
    """A run-dir-friendly name for a data path: `my_data` for ~/data/my_data.csv, `data` for a folder or glob."""
    name = Path(path.rstrip("/*")).stem if not path.startswith("hf:") else path[3:].replace("/", "_")
    return re.sub(r"[^\w.-]", "_", name) or "data"


def with_user_data(overrides: List[str]) -> List[str]:
    """`data.path=X` without `data=...` selects conf/data/file.yaml: a user's file gets real-data defaults (dedup
    on, a 10 % test split) instead of silently inheriting the embedded demo's."""
    if any(o.startswith("data.path=") for o in overrides) and not any(o.startswith("data=") for o in overrides):
        return [*overrides, "data=file"]
    return overrides


RUN_GROUPS = ("model", "data", "peft")  # what a run dir remembers for the commands that read its model


def _run_dir_of(checkpoint: str) -> Optional[Path]:
    """The run dir behind `checkpoint=` (the run dir itself or its final/), if it kept its config.yaml."""
    p = Path(checkpoint).expanduser()
    for candidate in (p, p.parent if p.name == "final" else None):
        if candidate is not None and (candidate / "config.yaml").is_file():
            return candidate
    return None


def with_run_config(overrides: List[str], key: str = "checkpoint") -> List[str]:
    """`checkpoint=<run>` (ft-eval, ft-generate) or, for a resume, `output_dir=<run>` (ft-train) makes the run's
    model, data and PEFT config (template included) the defaults.

    Each group comes from the run's config.yaml through a Hydra search path, so dotted overrides (`data.path=`,
    `eval.max_new_tokens=`) still apply on top and `data=<option>` evaluates on other data. Choosing another model
    or PEFT method contradicts the weights in the run dir: one line, before anything is loaded.
    """
    import atexit
    import shutil
    import tempfile

    given = next((o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}=")), None)
    run_dir = _run_dir_of(given) if given else None
    if run_dir is None:
        return overrides
    saved = cast(DictConfig, OmegaConf.load(run_dir / "config.yaml"))  # a run config: a mapping
    conf = Path(tempfile.mkdtemp(prefix="ft-dist-run-conf-"))
    atexit.register(shutil.rmtree, conf, True)
    extra = [f"hydra.searchpath=[file://{conf}]"]
    for group in RUN_GROUPS:
        chosen = next((o.split("=", 1)[1] for o in overrides if o.startswith(f"{group}=")), None)
        if chosen is not None:
            trained = saved[group].get("name", saved[group].get("method"))  # the option's name (peft: its method)
            if group != "data" and chosen != trained:
                raise UserError(
                    f"config error: {group}: {run_dir} was trained with {group} {trained!r}, not "
                    f"{chosen!r}; drop {group}={chosen} (the run's config.yaml supplies it) or pass "
                    f"another {key}"
                )
            if group == "data":  # other data to evaluate on: the user's choice
                continue
            # The run's own option, named again: the run's settings of it (from_config, tokenizer, arch overrides)
            # still hold, not the option's defaults from conf/.
            overrides = [o for o in overrides if o != f"{group}={chosen}"]
        (conf / group).mkdir()
        OmegaConf.save(saved[group], conf / group / "from_run.yaml")
        extra.append(f"{group}=from_run")
    return [*overrides, *extra]


def compose_checked(config_name: str, overrides: List[str], check: Callable[[Any], None]) -> DictConfig:
    """Compose, resolve and check a config; any mistake becomes a one-line UserError, before any model or data."""
    from hydra import compose, initialize_config_dir

    overrides = with_user_data(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
        OmegaConf.resolve(cfg)
        check(cfg)
    except UserError:
        raise
    except Exception as ex:  # Hydra's and OmegaConf's own error types
        raise UserError(describe_composition_error(config_name, ex)) from ex
    return cfg


def _preflight(config_name: str, argv: List[str], check: Callable[[Any], None]) -> None:
    """Compose and validate once before Hydra runs the job, so user mistakes cost < 1 s and read as one line."""
    if any(a in ("-m", "--multirun") for a in argv) or any(a.startswith("-") for a in argv):
        return  # sweeps and Hydra flags: each job validates itself in _run()
    try:
        # Hydra's own settings are not part of the job's config, except where configs are searched for.
        compose_checked(
            config_name, [a for a in argv if not a.startswith("hydra") or a.startswith("hydra.searchpath=")], check
        )
    except UserError as err:
        exit_with_error(str(err))


def _run(task: Callable[[DictConfig], Optional[int]], cfg: DictConfig, check: Callable[[Any], None]) -> None:
    try:
        check(cfg)
        code = task(cfg)
    except UserError as err:
        exit_with_error(str(err), err.exit_code)
    except OmegaConfBaseException as ex:
        exit_with_error(f"config error: {getattr(ex, 'full_key', '')}: {str(ex).splitlines()[0]}")
    if code:
        sys.exit(code)


def _import(path: str) -> Any:
    module_name, attr = path.rsplit(":", 1)
    return getattr(__import__(module_name, fromlist=[attr]), attr)


def entry(
    config_name: str, task_path: str, check: Callable[[Any], None] = validate, verbs: Optional[Dict[str, str]] = None
) -> Callable[[], None]:
    """A console-script main: compose conf/<config_name>.yaml, check it, then run `module:function` on it.

    `verbs` lets a leading bare word select a mode (`ft-eval compare ...` -> `mode=compare`), which Hydra's
    override grammar would otherwise reject.
    """

    def main() -> None:
        # The deepspeed launcher appends --local_rank=N (also exported as LOCAL_RANK); Hydra would reject it.
        sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
        if verbs and len(sys.argv) > 1 and sys.argv[1] in verbs:
            sys.argv[1] = verbs[sys.argv[1]]
        argv = sys.argv[1:]
        fresh = any(a in ("train.resume=null", "train.resume=none", "train.resume=never") for a in argv)
        key = {"eval": "checkpoint", "generate": "checkpoint", "train": None if fresh else "output_dir"}.get(
            config_name
        )
        if key is not None:
            try:
                argv = with_run_config(argv, key)
            except UserError as err:
                exit_with_error(str(err))
        sys.argv = [sys.argv[0], *with_user_data(argv)]
        _preflight(config_name, sys.argv[1:], check)

        @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
        def hydra_main(cfg: DictConfig) -> None:
            _run(_import(task_path), cfg, check)

        hydra_main()

    return main
