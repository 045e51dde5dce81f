"""Writing run outputs atomically: the resolved config and the final HF-format model.

Everything is written into a temporary sibling directory and renamed into place, so a crash mid-save leaves
either the previous complete output or nothing, never a half-written directory that loads wrongly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

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
    is_peft = hasattr(model, "peft_config")
    with atomic_dir(target) as tmp:
        if is_peft:
            model.save_pretrained(tmp / "adapter", safe_serialization=True)
            tokenizer.save_pretrained(tmp / "adapter")
            if cfg.peft.merge_on_save or cfg.model.from_config or cfg.model.name_or_path is None:
                model = model.merge_and_unload()
                model.save_pretrained(tmp, safe_serialization=True)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "ft_config.yaml").write_text(config_yaml(cfg))
    return target
