"""The request for one chunk, from the configured template, and the hash that names it in provenance."""

from __future__ import annotations

import hashlib

from ft_dist.errors import ConfigError
from ft_dist.generate.schema import STYLE_FIELDS, PromptConfig

STYLE_WORDS = {"qa": "question/answer", "instruction": "instruction/response", "chat": "user/assistant"}


def check_template(cfg: PromptConfig) -> None:
    """The template must place the chunk: without {chunk} every request would be the same."""
    if "{chunk}" not in cfg.template:
        raise ConfigError("prompt.template", "has no {chunk} placeholder; add {chunk} where the document text goes")


def render(cfg: PromptConfig, chunk: str) -> str:
    """The template with its placeholders filled. Plain replacement, not str.format: JSON examples in a template
    keep their braces."""
    fields = ", ".join(f'"{f}"' for f in STYLE_FIELDS[cfg.style])
    text = cfg.template.replace("{n_pairs}", str(cfg.n_pairs)).replace("{style}", STYLE_WORDS[cfg.style])
    return text.replace("{fields}", fields).replace("{chunk}", chunk)


def prompt_hash(cfg: PromptConfig) -> str:
    """Names the prompt (template, style, pair count) in every pair's provenance."""
    return hashlib.sha256(f"{cfg.template}\x1f{cfg.style}\x1f{cfg.n_pairs}".encode()).hexdigest()[:16]
