"""Tokenizers and causal LMs: by hub id or local path, from an architecture config, or the embedded tiny default.

Model code, weights loading and LoRA are transformers' and PEFT's; this module only decides which of their entry
points to call, keeps `trust_remote_code` off unless asked, and gives every tokenizer an EOS and a pad token.
"""

from __future__ import annotations

import contextlib
import string
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from ft_dist.errors import ConfigError

CHAR_TOKENIZER = "embedded:char"
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")


def build_char_tokenizer() -> Any:
    """ft-dist's built-in tokenizer: one token per printable ASCII character, plus pad/eos/unk.

    It needs no file or network, so the default model runs anywhere; characters keep the demo task learnable by a
    1M-parameter model.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: Dict[str, int] = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in list(string.printable[:95]) + ["\n"]:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def load_tokenizer(model_cfg: Any, path: Optional[str] = None) -> Any:
    """The tokenizer for `model_cfg` (or a saved model dir `path`), with EOS and pad tokens guaranteed."""
    from transformers import AutoTokenizer

    source = path or model_cfg.tokenizer or model_cfg.name_or_path
    if source == CHAR_TOKENIZER:
        tok = build_char_tokenizer()
    else:
        try:
            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code)
        except (OSError, ValueError) as err:
            raise ConfigError("model.tokenizer", f"could not load a tokenizer from {source!r}: {str(err).splitlines()[0]}")
    if tok.eos_token is None:
        vocab = tok.get_vocab()
        found = next((t for t in _EOS_CANDIDATES if t in vocab), None)
        if found is None:
            raise ConfigError("model.tokenizer", f"tokenizer {source!r} has no EOS token (looked for {_EOS_CANDIDATES})")
        tok.eos_token = found
    if tok.pad_token is None:
        # Padding positions are masked by length, never by id, so sharing the EOS id is safe.
        tok.pad_token = tok.eos_token
    return tok


def architecture_config(model_cfg: Any) -> Any:
    """The HF PretrainedConfig described by `model.arch` (no download)."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig

    arch = OmegaConf.to_container(model_cfg.arch, resolve=True) if OmegaConf.is_config(model_cfg.arch) else dict(model_cfg.arch)
    model_type = arch.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **arch)
    except ValueError as err:
        raise ConfigError("model.arch.model_type", str(err).splitlines()[0])


def build_model(model_cfg: Any, tokenizer: Any, path: Optional[str] = None, dtype: torch.dtype = torch.float32,
                meta: bool = False) -> nn.Module:
    """A causal LM: from a saved dir `path`, from pretrained `name_or_path`, or random init from `arch`.

    Random init draws from torch's global RNG, so the caller seeds first and every rank builds the same weights.
    `meta=True` builds the structure only (no memory, no weights read): sharding strategies fill it in per shard.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(attn_implementation=model_cfg.attn_implementation, trust_remote_code=model_cfg.trust_remote_code)
    pretrained = path is not None or not (model_cfg.from_config or model_cfg.name_or_path is None)
    if pretrained and path is not None and (Path(path) / "adapter_config.json").exists():
        return _load_adapter_model(model_cfg, tokenizer, path, dtype)
    if pretrained and not meta:
        model = AutoModelForCausalLM.from_pretrained(path or model_cfg.name_or_path, dtype=dtype, **common)
    else:
        if pretrained:
            config = AutoConfig.from_pretrained(path or model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
        else:
            config = architecture_config(model_cfg)
        if getattr(config, "vocab_size", 0) < len(tokenizer):
            raise ConfigError("model.arch.vocab_size", f"expected >= the tokenizer's {len(tokenizer)} tokens, got {config.vocab_size}")
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.eos_token_id
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **common)
    # Generation stops at the tokenizer's EOS, which training appended to every response.
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def _load_adapter_model(model_cfg: Any, tokenizer: Any, path: str, dtype: torch.dtype) -> nn.Module:
    from peft import PeftModel

    base = build_model(model_cfg, tokenizer, dtype=dtype)
    return PeftModel.from_pretrained(base, path)


def apply_peft(model: nn.Module, peft_cfg: Any) -> nn.Module:
    """Wrap with LoRA adapters (PEFT); the base weights freeze. method=none returns the model unchanged."""
    if peft_cfg.method == "none":
        return model
    # Adapters are initialised from their own seed point, so they are identical however the base was built
    # (plain, on meta, or under DeepSpeed's zero.Init, which draw different amounts of randomness).
    torch.manual_seed(peft_cfg.seed)
    from peft import LoraConfig, get_peft_model

    targets = list(peft_cfg.target_modules)
    lora = LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as err:
        raise ConfigError("peft.target_modules", str(err).splitlines()[0])


def count_parameters(model: nn.Module) -> Dict[str, int]:
    def numel(p: nn.Parameter) -> int:
        return getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 keeps only a partition locally

    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def recompute_non_persistent_buffers(model: nn.Module) -> None:
    """Rebuild buffers that state dicts leave out (rotary `inv_freq`) after `to_empty` left them uninitialised.

    Every path that builds on the meta device (FSDP2, replicas of a sharded model, export) calls this, so no rank
    ever needs the full model for them. HF computes them in the owning module's constructor from its config, and
    such modules hold no parameters, so constructing a CPU twin is cheap whatever the model size.
    """
    for name, module in model.named_modules():
        missing = [n for n in module._buffers if n in module._non_persistent_buffers_set]
        if not missing:
            continue
        if not hasattr(module, "config"):
            raise NotImplementedError(f"cannot rebuild the non-persistent buffers {missing} of {name} "
                                      f"({type(module).__name__}): its constructor takes no config")
        twin = type(module)(module.config)
        for buf in missing:
            module._buffers[buf] = twin._buffers[buf].to(module._buffers[buf].device)
