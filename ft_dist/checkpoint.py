"""Writing run outputs atomically: the resolved config and the final HF-format model.

Everything is written into a temporary sibling directory and renamed into place, so a crash mid-save leaves
either the previous complete output or nothing, never a half-written directory that loads wrongly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from omegaconf import OmegaConf

from ft_dist.tracking import scrub_secrets


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temp dir; on success it replaces `target` (the old one is removed only after the new one is in place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        old: Optional[Path] = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def config_yaml(cfg: Any) -> str:
    """The fully resolved config, with secret-looking values removed."""
    return OmegaConf.to_yaml(OmegaConf.create(scrub_secrets(OmegaConf.to_container(cfg, resolve=True))))


def save_final_model(model: Any, tokenizer: Any, cfg: Any, target: Path) -> Path:
    """Save an HF model dir (safetensors + tokenizer + ft_config.yaml) that `from_pretrained` loads.

    A LoRA model saves its adapter under `adapter/`; with peft.merge_on_save (forced when the base was built from
    config, since such a base exists nowhere else) the merged full model is what `target` itself holds.
    """
    merge = cfg.peft.merge_on_save or cfg.model.from_config or cfg.model.name_or_path is None
    return write_hf_model(model, tokenizer, cfg, target, merge_lora=merge)


def write_hf_model(model: Any, tokenizer: Any, cfg: Any, target: Path, merge_lora: bool) -> Path:
    """Atomically write `model` (merging a LoRA adapter when asked; the adapter also goes to adapter/)."""
    with atomic_dir(Path(target)) as tmp:
        if hasattr(model, "peft_config"):
            model.save_pretrained(tmp / "adapter", safe_serialization=True)
            tokenizer.save_pretrained(tmp / "adapter")
            if merge_lora:
                model = model.merge_and_unload()
                model.save_pretrained(tmp, safe_serialization=True)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "ft_config.yaml").write_text(config_yaml(cfg))
    return Path(target)


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
    from ft_dist.errors import ConfigError

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

    import torch

    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    import random

    import torch

    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(strategy: Any, scheduler: Any, out_dir: Path, step: int, meta: Dict[str, Any], keep: int) -> Path:
    """Write checkpoints/step-<step>/ collectively; complete only once every rank has written its part."""
    import torch
    import torch.distributed.checkpoint as dcp

    from ft_dist import dist

    root = Path(out_dir) / CHECKPOINTS
    final, tmp = root / f"step-{step:08d}", root / f".step-{step:08d}.tmp"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(strategy.checkpoint_state(), checkpoint_id=str(tmp / "state"))
    extra = {"scheduler": scheduler.state_dict(), "rng": _rng_state()}
    if getattr(strategy, "scaler", None) is not None:
        extra["scaler"] = strategy.scaler.state_dict()
    torch.save(extra, tmp / f"rank-{dist.world().rank}.pt")
    delay_at = os.environ.get("FT_DIST_TEST_SAVE_DELAY", "")  # "<step>:<seconds>": tests kill a save mid-way
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"  # not again after a torchrun restart
    if delay_at and int(delay_at.split(":")[0]) == step and first_attempt:
        import time

        time.sleep(float(delay_at.split(":")[1]))
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
    import torch
    import torch.distributed.checkpoint as dcp

    from ft_dist import dist

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


def export_checkpoint(run_cfg: Any, checkpoint: Path, target: Path, merge_lora: bool = True) -> Path:
    """Turn a training checkpoint (any strategy, any world size) into an HF model dir that plain
    `AutoModelForCausalLM.from_pretrained` loads. Runs in one process: DCP reads every rank's shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from ft_dist.models import apply_peft, build_model, load_tokenizer, recompute_non_persistent_buffers

    tokenizer = load_tokenizer(run_cfg.model)
    model = apply_peft(build_model(run_cfg.model, tokenizer, meta=True), run_cfg.peft)
    model.to_empty(device="cpu")
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(Path(checkpoint) / "state"))
    set_model_state_dict(model, state["model"])
    recompute_non_persistent_buffers(model)
    return write_hf_model(model, tokenizer, run_cfg, Path(target), merge_lora)
