"""Run outputs: the resolved config, the final HF-format model (streamed), training checkpoints, export.

`CheckpointManager` is the one owner of a run's training checkpoints: which one it resumes from and whether it
can, when the next one is due, what each records, saving, loading and retention.

Everything is written atomically (ft_dist.atomic_io): a crash mid-save leaves either the previous complete output
or nothing, never a half-written directory that loads wrongly.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, cast

import torch
from omegaconf import OmegaConf

from ft_dist import dist, hooks
from ft_dist.atomic_io import atomic_dir, atomic_write_text  # noqa: F401  (re-exported for the commands)
from ft_dist.config import ModelConfig, PeftConfig, RunConfig, TrainConfig
from ft_dist.data.schema import DataConfig
from ft_dist.errors import ConfigError
from ft_dist.hf_weights import SAVE_DTYPES, write_hf_model
from ft_dist.models import (
    apply_peft,
    block_prefixes,
    build_model,
    dequantized,
    is_adapter_name,
    load_tokenizer,
    model_tensors,
)
from ft_dist.settings import identity
from ft_dist.tracking import scrub_secrets

MAX_SHARD_BYTES = 2 * 2**30
"""Safetensors shards of at most 2 GiB: the writing rank holds one shard at a time, never the model."""


def config_yaml(cfg: Any) -> str:
    """The fully resolved config, with secret-looking values removed."""
    return OmegaConf.to_yaml(OmegaConf.create(scrub_secrets(OmegaConf.to_container(cfg, resolve=True))))


def merge_on_save(cfg: RunConfig) -> bool:
    """A LoRA run writes the merged model with peft.merge_on_save, and always when the base was built from config
    (such a base exists nowhere else, so the adapter alone could not be used)."""
    return bool(cfg.peft.merge_on_save or cfg.model.from_config or cfg.model.name_or_path is None)


def save_final_model(
    units: Any,
    twin: torch.nn.Module,
    tokenizer: Any,
    cfg: RunConfig,
    target: Path,
    write: bool = True,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    dense: Any = None,
) -> Optional[Path]:
    """Stream the model into an HF dir (sharded safetensors in the training dtype + tokenizer + ft_config.yaml).

    `units` yields the full tensors one unit (block) at a time, see Strategy.gathered_units; every rank iterates
    it, only `write` (rank 0) writes. A LoRA model saves its adapter under `adapter/`, and the merged model in
    `target` itself when merge_on_save(cfg). `dense` (QLoRA: models.dequantized) makes each stored tensor dense.
    """

    return write_hf_model(
        units,
        twin,
        tokenizer,
        Path(target),
        SAVE_DTYPES[cfg.train.precision],
        merge_on_save(cfg),
        max_shard_bytes,
        {"ft_config.yaml": config_yaml(cfg)},
        write=write,
        dense=dense,
    )


# --- training checkpoints ---------------------------------------------------------------------------------------
# checkpoints/step-<N>/ holds `state/` (torch.distributed.checkpoint: model + optimizer keyed by parameter name,
# written by all ranks), `rank-<r>.pt` (scheduler, RNG, loss scaler of each rank), `meta.json` and, written last by
# rank 0 after every rank finished, `COMPLETE`. The directory is assembled as `.step-<N>.tmp` and renamed, so a
# crash or kill mid-save leaves the previous checkpoints untouched and no directory that looks complete.

COMPLETE = "COMPLETE"
CHECKPOINTS = "checkpoints"


def complete_checkpoints(out_dir: Path) -> list:
    root = Path(out_dir) / CHECKPOINTS
    found = [p for p in root.glob("step-*") if (p / COMPLETE).exists()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_resume_checkpoint(resume: Optional[str], out_dir: Path, key: str = "train.resume") -> Optional[Path]:
    """`auto`: the latest complete checkpoint in the run dir, or None for a fresh start; else an explicit path."""

    if resume in (None, "", "none", "never"):
        return None
    if resume == "auto":
        found = complete_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if path.is_dir() and (path / CHECKPOINTS).is_dir():  # a run dir: its latest checkpoint
        found = complete_checkpoints(path)
        path = found[-1] if found else path
    if not (path / COMPLETE).exists():
        raise ConfigError(key, f"expected a complete checkpoint dir (with {COMPLETE}) or auto, got {str(path)!r}")
    return path


def _rng_state() -> Dict[str, Any]:
    import random

    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    import random

    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


CHECKPOINT_FILE_BYTES = 256 * 2**20
"""Each rank's part of a checkpoint goes into files of about this size, written one after the other."""


def checkpoint_writer(path: Path, max_file_bytes: int = CHECKPOINT_FILE_BYTES) -> Any:
    """DCP's FileSystemWriter, writing this rank's items into files of at most `max_file_bytes`, one at a time.

    DCP keeps every tensor of a file alive until the file is complete, and a tensor that is a view into a larger
    buffer (every DeepSpeed partition: a slice of a flat group) is first copied. With one file per rank that is a
    second copy of the rank's whole checkpoint in host memory; with bounded files it is one file's worth. FSDP2
    shards own their storage and are never copied.
    """
    import queue

    import torch.distributed.checkpoint.filesystem as fs

    class BoundedFileWriter(fs.FileSystemWriter):
        def write_data(self, plan: Any, planner: Any) -> Any:
            files: list = [[]]
            size = 0
            for item in sorted(plan.items, key=lambda i: i.type != fs.WriteItemType.BYTE_IO):
                item_bytes = fs._item_size(item) if item.type != fs.WriteItemType.BYTE_IO else 0
                if files[-1] and size + item_bytes > max_file_bytes:
                    files.append([])
                    size = 0
                files[-1].append(item)
                size += item_bytes
            file_queue: queue.Queue = queue.Queue()
            for i, items in enumerate(files):
                name = f"{plan.storage_data.prefix}{i}{fs.DEFAULT_SUFFIX}"
                file_queue.put((self.fs.concat_path(self.path, name), name, items))
            return self._write_data(planner, file_queue)

    return BoundedFileWriter(str(path), thread_count=1)


def save_checkpoint(strategy: Any, scheduler: Any, out_dir: Path, step: int, meta: Dict[str, Any], keep: int) -> Path:
    """Write checkpoints/step-<step>/ collectively; complete only once every rank has written its part."""
    import torch.distributed.checkpoint as dcp

    root = Path(out_dir) / CHECKPOINTS
    final, tmp = root / f"step-{step:08d}", root / f".step-{step:08d}.tmp"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(strategy.checkpoint_state(), storage_writer=checkpoint_writer(tmp / "state"))
    extra = {"scheduler": scheduler.state_dict(), "rng": _rng_state()}
    if getattr(strategy, "scaler", None) is not None:
        extra["scaler"] = strategy.scaler.state_dict()
    torch.save(extra, tmp / f"rank-{dist.world().rank}.pt")
    hooks.fire("checkpoint_written", step=step, rank=dist.world().rank, path=tmp)
    dist.barrier()
    if dist.is_main():
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        (tmp / COMPLETE).write_text(f"step {step}\n")
        if final.exists():  # the same step saved again (resumed from it, then preempted before the next step)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(out_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def read_meta(path: Path) -> Dict[str, Any]:
    return json.loads((Path(path) / "meta.json").read_text())


def load_checkpoint(strategy: Any, scheduler: Any, path: Path) -> Dict[str, Any]:
    """Restore model, optimizer, scheduler, loss scaler and (same layout only) RNG from a complete checkpoint."""
    import torch.distributed.checkpoint as dcp

    meta = read_meta(path)
    state = strategy.checkpoint_state()  # the target layout; DCP reshards the saved tensors into it
    dcp.load(state, checkpoint_id=str(Path(path) / "state"))
    strategy.load_checkpoint_state(state)
    rank = dist.world().rank
    own = Path(path) / f"rank-{rank}.pt"
    extra = torch.load(own if own.exists() else Path(path) / "rank-0.pt", weights_only=True)
    scheduler.load_state_dict(extra["scheduler"])
    if "scaler" in extra and getattr(strategy, "scaler", None) is not None:
        strategy.scaler.load_state_dict(extra["scaler"])
    if own.exists() and meta["world_size"] == dist.world().size:
        _set_rng_state(extra["rng"])
    return meta


def checkpoint_units(checkpoint: Path, twin: torch.nn.Module) -> Iterator[Dict[str, torch.Tensor]]:
    """The model weights of a training checkpoint, one transformer block at a time (then the rest), read by DCP
    from every rank's files into tensors of this process: memory is bounded by one block, never the model."""
    import torch.distributed.checkpoint as dcp

    names = {n: (tuple(t.shape), t.dtype) for n, t in model_tensors(twin).items()}
    prefixes = block_prefixes(twin)
    groups: Dict[str, list] = {p: [] for p in prefixes}
    rest: List[str] = []
    for n in names:
        owner = next((p for p in prefixes if n.startswith(p + ".")), None)
        (groups[owner] if owner else rest).append(n)
    for members in [*groups.values(), rest]:
        if not members:
            continue
        unit = {n: torch.empty(names[n][0], dtype=names[n][1]) for n in members}
        dcp.load({"model": unit}, checkpoint_id=str(Path(checkpoint) / "state"))
        yield unit
        del unit


def export_checkpoint(
    run_cfg: RunConfig, checkpoint: Path, target: Path, merge_lora: bool = True, max_shard_bytes: int = MAX_SHARD_BYTES
) -> Path:
    """Turn a training checkpoint (any strategy, any world size) into an HF model dir that plain
    `AutoModelForCausalLM.from_pretrained` loads. One process; it holds one block and one shard at a time."""
    tokenizer = load_tokenizer(run_cfg.model)
    twin = apply_peft(build_model(run_cfg.model, tokenizer, meta=True), run_cfg.peft)
    units, dense = checkpoint_units(checkpoint, twin), None
    if run_cfg.peft.method == "qlora":
        units, dense = _qlora_units(run_cfg, checkpoint, tokenizer)
    out = write_hf_model(
        units,
        twin,
        tokenizer,
        Path(target),
        SAVE_DTYPES[run_cfg.train.precision],
        merge_lora,
        max_shard_bytes,
        {"ft_config.yaml": config_yaml(run_cfg)},
        dense=dense,
    )
    assert out is not None
    return out


def _qlora_units(run_cfg: RunConfig, checkpoint: Path, tokenizer: Any) -> Tuple[Any, Any]:
    """A QLoRA checkpoint holds the adapters only: the base they were trained on is the pretrained model quantized
    again the same way (4-bit, Q bytes in this process), dequantized one weight at a time as it is written."""
    import torch.distributed.checkpoint as dcp

    compute = SAVE_DTYPES[run_cfg.train.precision]
    base = build_model(run_cfg.model, tokenizer, quantize=(run_cfg.peft, compute), device=torch.device("cpu"))
    model = apply_peft(base, run_cfg.peft)
    adapters = {n: p.detach() for n, p in model.named_parameters() if is_adapter_name(n)}
    dcp.load({"model": adapters}, checkpoint_id=str(Path(checkpoint) / "state"))  # in place, into the adapters
    return iter([model_tensors(model)]), dequantized(model)


def config_fingerprint(cfg: RunConfig) -> Dict[str, Any]:
    """The flattened settings a checkpoint must agree with to be resumed exactly: every field of model, data, peft
    and train that identifies a run (a field's `identity=False` marks a label, a cadence or where things run;
    ft_dist/settings.py)."""
    container = cast(Dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    flat: Dict[str, Any] = {}
    for group, schema in (("model", ModelConfig), ("data", DataConfig), ("peft", PeftConfig), ("train", TrainConfig)):
        flat.update({f"{group}.{k}": v for k, v in identity(schema, container[group]).items()})
    return flat


def check_resumable(cfg: RunConfig, path: Path, world: dist.World) -> None:
    """Refuse, in one line naming what differs and what to pass, a checkpoint this run cannot continue exactly."""
    meta = read_meta(path)
    now, then = config_fingerprint(cfg), meta.get("config", {})
    # Settings recorded by an older ft-dist that no longer identify a run are not compared.
    diffs = [
        f"{k}: {then.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in sorted(now) if now.get(k) != then.get(k)
    ]
    if diffs and not cfg.train.resume_ignore_config:
        raise ConfigError(
            "train.resume",
            f"checkpoint {path} was written with a different config ({'; '.join(diffs)}); "
            "pass train.resume_ignore_config=true to resume anyway, or a new output_dir to start fresh",
        )
    tc = cfg.train
    global_batch = tc.micro_batch_size * tc.grad_accum * world.size
    if meta["global_batch"] != global_batch:
        per_rank = meta["global_batch"] / (tc.micro_batch_size * world.size)
        hint = (
            f"set train.grad_accum={int(per_rank)}"
            if per_rank.is_integer()
            else "choose micro_batch_size x grad_accum x world to match"
        )
        raise ConfigError(
            "train.grad_accum",
            f"checkpoint {path} used global batch {meta['global_batch']} (micro "
            f"{meta['micro_batch_size']} x accum {meta['grad_accum']} x world {meta['world_size']}), this run "
            f"{global_batch}: {hint} so the data position maps exactly",
        )


@dataclass
class RunPosition:
    """Where a run stands: steps done at a global batch. A checkpoint records the samples consumed, so a resume
    with another world size (same global batch) continues at the same example."""

    step: int
    global_batch: int

    @property
    def samples_consumed(self) -> int:
        return self.step * self.global_batch

    @classmethod
    def of(cls, meta: Dict[str, Any], global_batch: int) -> "RunPosition":
        return cls(meta["samples_consumed"] // global_batch, global_batch)


class CheckpointManager:
    """A run's training checkpoints, from choosing the one to resume to the last save.

    Built before any data or model (`resume_from` is found and checked against the config and world then, so a
    mismatch is one line before expensive work); `bind` hands it the strategy and scheduler once they exist. The
    loop then calls `restore` once and `after_step` once per step (and `save` when training must stop).
    Checkpoints are sharded: every rank writes and reads its own part (`save_checkpoint`, `load_checkpoint`).
    """

    def __init__(self, cfg: RunConfig, out_dir: Path, world: dist.World) -> None:
        self.train, self.out_dir, self.world = cfg.train, Path(out_dir), world
        self.fingerprint = config_fingerprint(cfg)
        self.strategy_name = cfg.strategy.name
        self.resume_from = find_resume_checkpoint(cfg.train.resume, out_dir)
        if self.resume_from is not None:
            check_resumable(cfg, self.resume_from, world)
        self._last_save = time.time()
        self._bound: Optional[Tuple[Any, Any, int, Any, Callable[..., None]]] = None

    def bind(
        self, strategy: Any, scheduler: Any, global_batch: int, memory: Any, progress: Callable[..., None]
    ) -> None:
        self._bound = (strategy, scheduler, global_batch, memory, progress)
        self._last_save = time.time()  # the time cadence counts from the start of training

    def restore(self, tracker: Any) -> int:
        """Load `resume_from` into the bound strategy and scheduler; the step to continue from (0: fresh start)."""
        if self.resume_from is None:
            return 0
        strategy, scheduler, global_batch, memory, progress = self._require_bound()
        t0 = time.time()
        progress("checkpoint load")
        with memory.phase("resume"):
            meta = load_checkpoint(strategy, scheduler, self.resume_from)
        position = RunPosition.of(meta, global_batch)
        dist.log(
            f"resumed from {self.resume_from} at step {position.step} ({meta['samples_consumed']} samples "
            f"consumed, saved by world size {meta['world_size']}; {time.time() - t0:.1f} s)"
        )
        tracker.event(
            position.step,
            "resume",
            checkpoint=str(self.resume_from),
            saved_world_size=meta["world_size"],
            world_size=self.world.size,
            strategy=self.strategy_name,
        )
        return position.step

    def due_by_time(self) -> bool:
        """This rank's view of `train.save_minutes` (rank 0 keeps the clock; the loop's all-reduce shares it)."""
        minutes = self.train.save_minutes
        return bool(minutes) and self.world.is_main and time.time() - self._last_save >= 60 * minutes

    def after_step(self, done: int, preempted: bool, due: bool) -> None:
        """Save after step `done` when a rank was preempted, the time cadence is due, or `train.save_every` says so."""
        every = self.train.save_every
        if preempted or due or (every and done % every == 0):
            self.save(done)

    def save(self, step: int) -> Path:
        strategy, scheduler, global_batch, memory, progress = self._require_bound()
        position = RunPosition(step, global_batch)
        tc = self.train
        meta = {
            "step": step,
            "samples_consumed": position.samples_consumed,
            "world_size": self.world.size,
            "micro_batch_size": tc.micro_batch_size,
            "grad_accum": tc.grad_accum,
            "global_batch": global_batch,
            "strategy": self.strategy_name,
            "config": self.fingerprint,
            "saved_at": time.time(),
        }
        t0 = time.time()
        progress("checkpoint save", step)
        with memory.phase("save"):
            path = save_checkpoint(strategy, scheduler, self.out_dir, step, meta, tc.keep_checkpoints)
        progress("checkpoint saved", step)
        self._last_save = time.time()
        dist.log(f"checkpoint: {path} ({time.time() - t0:.1f} s)")
        return path

    def _require_bound(self) -> Tuple[Any, Any, int, Any, Callable[..., None]]:
        if self._bound is None:
            raise RuntimeError("CheckpointManager.bind(strategy, scheduler, ...) must come first")
        return self._bound
