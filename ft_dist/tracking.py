"""Run output that people and tools read: progress bar, metrics.jsonl, and W&B, all from global rank 0 only.

W&B is optional and never stops training: without WANDB_API_KEY it runs offline (files under the run dir,
`wandb sync` later), and any failure to start or log it becomes one warning.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, Literal, Optional, cast

from ft_dist import dist
from ft_dist.config import LoggerConfig

# Keys like wandb_api_key, hf_token, password (but not tokenizer or max_new_tokens).
SECRET_KEY = re.compile(r"(^|_)(api_?key|token|secret|password|credentials?)$", re.IGNORECASE)


def scrub_secrets(obj: Any) -> Any:
    """A copy of a config container with values of secret-looking keys replaced, for anything written or logged."""
    if isinstance(obj, dict):
        return {k: ("***" if SECRET_KEY.search(str(k)) and v else scrub_secrets(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub_secrets(v) for v in obj]
    return obj


def _last_time(path: Path) -> float:
    """The "time" of the last record of an existing metrics.jsonl (0 if there is none or it is unreadable)."""
    for line in reversed(path.read_text(errors="replace").splitlines()):
        try:
            return float(json.loads(line)["time"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0.0


class Tracker:
    """Logs metrics to metrics.jsonl (+ W&B) and drives the progress bar, on rank 0; a no-op elsewhere."""

    def __init__(self, output_dir: Path, logger_cfg: LoggerConfig, config: Dict[str, Any]):
        self.active = dist.is_main()
        self.bar = None
        self.wandb_run = None
        self.start = time.time()
        self.offset = 0.0  # a resumed run's "time" continues from where its metrics.jsonl stopped
        if not self.active:
            return
        path = output_dir / "metrics.jsonl"
        if path.exists():
            self.offset = _last_time(path)
        self.metrics_file = path.open("a", buffering=1)
        if logger_cfg.name == "wandb":
            self.wandb_run = _start_wandb(output_dir, logger_cfg, config)

    def elapsed(self) -> float:
        """Seconds of this run so far, across resumes (the time between a preemption and the restart not counted)."""
        return self.offset + time.time() - self.start

    def start_progress(self, total: int, initial: int = 0) -> None:
        if not self.active:
            return
        from tqdm import tqdm

        self.bar = tqdm(
            total=total,
            initial=initial,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=os.environ.get("FT_DIST_NO_PROGRESS") == "1",
        )

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        if not self.active:
            return
        self._write(step, metrics)
        if self.wandb_run is not None:
            try:
                self.wandb_run.log(metrics, step=step)
            except Exception as err:  # W&B must never stop training
                dist.log(f"warning: W&B logging failed, continuing without it: {err}")
                self.wandb_run = None

    def event(self, step: int, event: str, **fields: Any) -> None:
        """A marker in metrics.jsonl (not W&B's numeric history), e.g. {"event": "resume", "checkpoint": ...}."""
        if self.active:
            self._write(step, {"event": event, **fields})

    def _write(self, step: int, fields: Dict[str, Any]) -> None:
        record = {"step": step, "time": round(self.elapsed(), 3), "wall_time": round(time.time(), 3), **fields}
        self.metrics_file.write(json.dumps(record) + "\n")

    def advance(self, n: int, postfix: Dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(postfix, refresh=False)

    def summary(self, values: Dict[str, Any]) -> None:
        if self.wandb_run is not None:
            try:
                self.wandb_run.summary.update(values)
            except Exception as err:
                dist.log(f"warning: W&B summary failed: {err}")

    def close(self) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        self.metrics_file.close()
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as err:
                dist.log(f"warning: W&B finish failed: {err}")


def _start_wandb(output_dir: Path, logger_cfg: LoggerConfig, config: Dict[str, Any]) -> Optional[Any]:
    mode = logger_cfg.mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    try:
        import wandb

        run = wandb.init(
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            group=logger_cfg.group,
            tags=list(logger_cfg.tags) or None,
            config=scrub_secrets(config),
            dir=str(output_dir),
            mode=cast(Literal["online", "offline"], mode),  # LoggerMode, with auto resolved above
            settings=wandb.Settings(init_timeout=60, console="off"),
        )
        plan = output_dir / "plan.json"  # written by ft-plan into the run dir it planned
        if plan.exists():
            run.config.update({"plan": json.loads(plan.read_text())}, allow_val_change=True)
            run.save(str(plan), base_path=str(output_dir), policy="now")
        return run
    except Exception as err:
        dist.log(f"warning: W&B did not start ({err}); training continues without it")
        return None
