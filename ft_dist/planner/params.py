"""Parameter counts from an architecture, without building the model.

The architecture comes from a model config's `arch` dict (HF config fields). transformers' own config classes read
it, so defaults (head_dim, intermediate size, tied embeddings...) are the ones the real model uses. From there the
counts are closed-form per family; tests check them against `sum(p.numel())` of the real model built on the meta
device, for every conf/model/ entry.

Families: `llama` (Llama 1-3, Mistral, Qwen2: RMSNorm, gated SiLU MLP, GQA/MQA, optional biases),
`gpt_neox` (Pythia: LayerNorm with bias, fused QKV, 4h GELU MLP) and `gpt2` (learned positions, Conv1D, tied head).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Tuple

from ft_dist.errors import ConfigError

# model_type -> family. Qwen2 differs from Llama only in its biases (q, k, v with bias, o without).
_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gpt_neox": "gpt_neox", "gpt2": "gpt2"}

# 4-bit NF4 with double quantization (bitsandbytes, QLoRA paper): 4 bits + an 8-bit absmax per 64 weights + an fp32
# absmax-of-absmax per 256 blocks = 4.127 bits per weight.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass(frozen=True)
class Linear:
    """One kind of projection inside a block: PEFT module name, fan-in, fan-out, bias."""

    name: str
    fan_in: int
    fan_out: int
    bias: bool

    @property
    def params(self) -> int:
        return self.fan_in * self.fan_out + (self.fan_out if self.bias else 0)


@dataclass(frozen=True)
class Architecture:
    """The shape facts the planner needs, normalised across families."""

    model_type: str
    family: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied_embeddings: bool
    positions: int
    """Learned position embeddings (GPT-2); 0 for rotary models."""
    norm_params_per_layer: int
    final_norm_params: int
    block_linears: Tuple[Linear, ...]

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def gated_mlp(self) -> bool:
        return self.family == "llama"

    @property
    def block_params(self) -> int:
        return sum(lin.params for lin in self.block_linears) + self.norm_params_per_layer

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden + self.positions * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        """Unique parameters: equals sum(p.numel()) of the HF model (tied weights counted once)."""
        return self.embedding_params + self.layers * self.block_params + self.final_norm_params + self.head_params

    @property
    def largest_layer_params(self) -> int:
        """max over modules of its own parameters, as DeepSpeed's `model_to_params` computes it for ZeRO-3."""
        candidates = [self.vocab * self.hidden, self.positions * self.hidden]
        candidates += [lin.params for lin in self.block_linears]
        return max(candidates)

    @property
    def linear_params_in_blocks(self) -> int:
        """Weights that QLoRA stores in 4 bit (every block projection; embeddings, norms and head stay 16-bit)."""
        return self.layers * sum(lin.fan_in * lin.fan_out for lin in self.block_linears)

    def lora_params(self, rank: int, targets: List[str]) -> int:
        """Trainable LoRA parameters: r x (fan_in + fan_out) per targeted projection (PEFT's A and B, no bias)."""
        return self.layers * sum(rank * (lin.fan_in + lin.fan_out) for lin in self.targeted(targets))

    def targeted(self, targets: List[str]) -> List[Linear]:
        """The block projections LoRA adapts. `all-linear`, like PEFT, is every one of them but not the head."""
        chosen = [
            lin
            for lin in self.block_linears
            if "all-linear" in targets or any(lin.name == t or lin.name.endswith("." + t) for t in targets)
        ]
        if not chosen:
            names = sorted({lin.name for lin in self.block_linears})
            raise ConfigError(
                "plan.lora_targets",
                f"none of {targets} is a projection of {self.model_type}; "
                f"expected all-linear or some of {', '.join(names)}",
            )
        return chosen


def hf_config(arch: Mapping[str, Any]) -> Any:
    """The transformers config object for an `arch` dict (its `model_type` picks the class). A key that is a near
    miss of a known field (hiden_size), which transformers would keep as a stray attribute, fails here."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    fields = dict(arch)
    model_type = fields.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise ConfigError("model.arch.model_type", f"transformers has no model_type {model_type!r}")
    cls = CONFIG_MAPPING[model_type]
    known = set(cls().to_dict()) | set(getattr(cls, "attribute_map", {}))
    for key in sorted(set(fields) - known):
        # Legacy and model-specific keys (rope_scaling, rope_theta...) pass; a near miss of a known one is a typo.
        near = difflib.get_close_matches(key, known, n=1, cutoff=0.85)
        if near:
            raise ConfigError(
                f"model.arch.{key}", f"{cls.__name__} has no field {key!r}; did you mean model.arch.{near[0]}?"
            )
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as err:  # transformers' own validators (ValueError, huggingface_hub's validation errors)
        cause = err.__cause__ or err
        raise ConfigError("model.arch", f"{cls.__name__} refuses it: {str(cause).splitlines()[0]}") from err


def _check_shape(cfg: Any, head_dim_given: bool) -> None:
    """An inconsistent override fails in one line instead of planning a model nobody can build."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size"):
        value = getattr(cfg, key, 1)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"model.arch.{key}", f"expected a positive integer, got {value!r}")
    if heads % kv:
        raise ConfigError(
            "model.arch.num_key_value_heads", f"{kv} does not divide num_attention_heads={heads}; expected a divisor"
        )
    if not head_dim_given and h % heads:  # transformers would floor hidden / heads silently
        raise ConfigError(
            "model.arch.num_attention_heads", f"{heads} does not divide hidden_size={h}; set model.arch.head_dim too"
        )


def architecture(arch: Mapping[str, Any]) -> Architecture:
    """Normalise an `arch` dict (HF config fields) into an `Architecture`: closed form for the known families,
    from a meta-device build for any other model transformers can build."""
    cfg = hf_config(arch)
    if cfg.model_type not in _FAMILIES:
        return from_meta_build(cfg)
    family = _FAMILIES[cfg.model_type]
    if family == "gpt2":
        return _gpt2(cfg)
    _check_shape(cfg, "head_dim" in arch)
    h = cfg.hidden_size
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    inter = cfg.intermediate_size
    q, kv = heads * head_dim, kv_heads * head_dim
    if family == "gpt_neox":
        bias = getattr(cfg, "attention_bias", True)
        linears: Tuple[Linear, ...] = (
            Linear("query_key_value", h, 3 * q, bias),
            Linear("dense", q, h, bias),
            Linear("dense_h_to_4h", h, inter, True),
            Linear("dense_4h_to_h", inter, h, True),
        )
        norm, final_norm = 4 * h, 2 * h  # two LayerNorms (weight + bias) per block, one final
    else:
        qkv_bias = True if cfg.model_type == "qwen2" else bool(getattr(cfg, "attention_bias", False))
        o_bias = False if cfg.model_type == "qwen2" else qkv_bias
        mlp_bias = bool(getattr(cfg, "mlp_bias", False))
        linears = (
            Linear("q_proj", h, q, qkv_bias),
            Linear("k_proj", h, kv, qkv_bias),
            Linear("v_proj", h, kv, qkv_bias),
            Linear("o_proj", q, h, o_bias),
            Linear("gate_proj", h, inter, mlp_bias),
            Linear("up_proj", h, inter, mlp_bias),
            Linear("down_proj", inter, h, mlp_bias),
        )
        norm, final_norm = 2 * h, h  # two RMSNorms (weight only) per block, one final
    return Architecture(
        model_type=cfg.model_type,
        family=family,
        vocab=cfg.vocab_size,
        hidden=h,
        layers=cfg.num_hidden_layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=inter,
        tied_embeddings=bool(cfg.tie_word_embeddings),
        positions=0,
        norm_params_per_layer=norm,
        final_norm_params=final_norm,
        block_linears=linears,
    )


def _gpt2(cfg: Any) -> Architecture:
    h = cfg.n_embd
    inter = cfg.n_inner or 4 * h
    linears = (
        Linear("c_attn", h, 3 * h, True),
        Linear("attn.c_proj", h, h, True),
        Linear("c_fc", h, inter, True),
        Linear("mlp.c_proj", inter, h, True),
    )
    return Architecture(
        model_type="gpt2",
        family="gpt2",
        vocab=cfg.vocab_size,
        hidden=h,
        layers=cfg.n_layer,
        heads=cfg.n_head,
        kv_heads=cfg.n_head,
        head_dim=h // cfg.n_head,
        intermediate=inter,
        tied_embeddings=bool(cfg.tie_word_embeddings),
        positions=cfg.n_positions,
        norm_params_per_layer=4 * h,
        final_norm_params=2 * h,
        block_linears=linears,
    )


def meta_model(cfg: Any) -> Any:
    """The real model on the meta device: shapes without storage (transformers' own code, no download)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def meta_param_count(arch: Mapping[str, Any]) -> int:
    """sum(p.numel()) of the model built on the meta device (tied weights once): the check of the closed form."""
    return sum(p.numel() for p in meta_model(hf_config(arch)).parameters())


def from_meta_build(cfg: Any) -> Architecture:
    """An architecture outside the closed-form families, read off its meta-device build: the repeated blocks (the
    longest ModuleList), block 0's linear projections, and everything else as embeddings, norms and head.
    Activations are then modelled as the Llama family's (gated MLP) or GPT-NeoX's (plain MLP); a mixture-of-experts
    block counts every expert as resident and active, an upper bound."""
    import torch.nn as nn

    model = meta_model(cfg)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not lists:
        raise ConfigError("model.config", f"{type(model).__name__} has no repeated blocks the planner can find")
    blocks = max(lists, key=len)
    linears = tuple(
        Linear(name, mod.in_features, mod.out_features, mod.bias is not None)
        for name, mod in blocks[0].named_modules()
        if isinstance(mod, nn.Linear)
    )
    block_params = sum(p.numel() for p in blocks[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    vocab, h = embed.shape
    head = model.get_output_embeddings()
    tied = head is None or head.weight is embed
    other = total - len(blocks) * block_params - vocab * h - (0 if tied else vocab * h)
    heads = cfg.num_attention_heads
    gated = any(lin.name.endswith(("gate_proj", "w1", "gate_up_proj")) for lin in linears)
    return Architecture(
        model_type=cfg.model_type,
        family="llama" if gated else "gpt_neox",
        vocab=vocab,
        hidden=h,
        layers=len(blocks),
        heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or h // heads,
        intermediate=getattr(cfg, "intermediate_size", None) or max(lin.fan_out for lin in linears),
        tied_embeddings=tied,
        positions=0,
        norm_params_per_layer=block_params - sum(lin.params for lin in linears),
        final_norm_params=other,
        block_linears=linears,
    )


def with_layers(arch: Mapping[str, Any], layers: int) -> Dict[str, Any]:
    """A copy of `arch` with another depth (trace mode builds a few layers and scales to the full depth)."""
    out = dict(arch)
    key = "n_layer" if arch.get("model_type") == "gpt2" else "num_hidden_layers"
    out[key] = layers
    return out
