"""Tokenizers and causal LMs: by hub id or local path, from an architecture config, or the embedded tiny default.

Model code, weights loading and LoRA are transformers' and PEFT's; this module only decides which of their entry
points to call, keeps `trust_remote_code` off unless asked, and gives every tokenizer an EOS and a pad token.
"""

from __future__ import annotations

import contextlib
import hashlib
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, cast

import torch
from torch import nn

from ft_dist import dist
from ft_dist.activations import checkpoint_blocks
from ft_dist.config import ModelConfig, PeftConfig
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


def load_tokenizer(model_cfg: ModelConfig, path: Optional[str] = None) -> Any:
    """The tokenizer for `model_cfg` (or a saved model dir `path`), with EOS and pad tokens guaranteed."""
    from transformers import AutoTokenizer

    source = path or model_cfg.tokenizer or model_cfg.name_or_path
    if source == CHAR_TOKENIZER:
        tok = build_char_tokenizer()
    else:
        try:
            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code)
        except (OSError, ValueError) as err:
            raise ConfigError(
                "model.tokenizer", f"could not load a tokenizer from {source!r}: {str(err).splitlines()[0]}"
            ) from err
    if tok.eos_token is None:
        vocab = tok.get_vocab()
        found = next((t for t in _EOS_CANDIDATES if t in vocab), None)
        if found is None:
            raise ConfigError(
                "model.tokenizer", f"tokenizer {source!r} has no EOS token (looked for {_EOS_CANDIDATES})"
            )
        tok.eos_token = found
    if tok.pad_token is None:
        # Padding positions are masked by length, never by id, so sharing the EOS id is safe.
        tok.pad_token = tok.eos_token
    return tok


def architecture_config(model_cfg: ModelConfig) -> Any:
    """The HF PretrainedConfig described by `model.arch` (no download)."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig

    arch = (
        cast(Dict[str, Any], OmegaConf.to_container(model_cfg.arch, resolve=True))
        if OmegaConf.is_config(model_cfg.arch)
        else dict(model_cfg.arch)
    )
    model_type = arch.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **arch)
    except ValueError as err:
        raise ConfigError("model.arch.model_type", str(err).splitlines()[0]) from err


def build_model(
    model_cfg: ModelConfig,
    tokenizer: Any,
    path: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    meta: bool = False,
    init: bool = True,
    quantize: Optional[Tuple[PeftConfig, torch.dtype]] = None,
    device: Optional[torch.device] = None,
) -> nn.Module:
    """A causal LM: from a saved dir `path`, from pretrained `name_or_path`, or random init from `arch`.

    Random init draws from torch's global RNG, so the caller seeds first and every rank builds the same weights.
    `meta=True` builds the structure only (no memory, no weights read): sharding strategies fill it in per shard.
    `init=False` builds real tensors but neither reads nor initialises them: DeepSpeed partitions them and then
    streams the pretrained weights into each rank's own partition (`weights_dir` says from where).
    `quantize` (a qlora PeftConfig and the compute dtype) loads the pretrained linear weights of the blocks as 4-bit on `device`
    (load_quantized); with `meta` it is ignored: the structure is the same.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(attn_implementation=model_cfg.attn_implementation, trust_remote_code=model_cfg.trust_remote_code)
    pretrained = path is not None or not (model_cfg.from_config or model_cfg.name_or_path is None)
    if pretrained and path is not None and (Path(path) / "adapter_config.json").exists():
        return _load_adapter_model(model_cfg, tokenizer, path, dtype)
    if pretrained and not meta and quantize is not None:
        source = path or model_cfg.name_or_path
        assert source is not None  # pretrained: `path` or `model.name_or_path` is set
        model = load_quantized(source, *quantize, dtype, device or torch.device("cpu"), model_cfg, common)
    elif pretrained and not meta and init:
        source = path or model_cfg.name_or_path
        assert source is not None  # pretrained: `path` or `model.name_or_path` is set
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **common)
    else:
        if pretrained:
            source = path or model_cfg.name_or_path
            assert source is not None  # pretrained: `path` or `model.name_or_path` is set
            config = AutoConfig.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code)
        else:
            config = architecture_config(model_cfg)
        if tokenizer is not None:  # None: a dry run, which reads no tokenizer (the architecture suffices)
            if getattr(config, "vocab_size", 0) < len(tokenizer):
                raise ConfigError(
                    "model.arch.vocab_size",
                    f"expected >= the tokenizer's {len(tokenizer)} tokens, got {config.vocab_size}",
                )
            config.pad_token_id = tokenizer.pad_token_id
            config.eos_token_id = tokenizer.eos_token_id
        # A pretrained model built without reading its weights is never initialised either: every value is
        # streamed in afterwards, so the minutes a 70B random init takes are not spent.
        from transformers.initialization import no_init_weights

        skip_init = no_init_weights() if pretrained and not init else contextlib.nullcontext()
        with torch.device("meta") if meta else contextlib.nullcontext(), skip_init:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **common)
    if tokenizer is not None:  # generation stops at the tokenizer's EOS, which training appended to every response
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    if model_cfg.gradient_checkpointing:
        checkpoint_blocks(model, model_cfg.checkpoint_every)
    return model


def load_quantized(
    source: str,
    peft_cfg: PeftConfig,
    compute: torch.dtype,
    dtype: torch.dtype,
    device: torch.device,
    model_cfg: ModelConfig,
    common: Dict[str, Any],
) -> Any:
    """QLoRA's base: transformers + bitsandbytes quantize each linear weight of the blocks as it is read, tensor by
    tensor, straight onto `device`, so no full-precision copy of the model ever exists.

    The 4-bit blocks are stored in bf16-typed storage: FSDP2 shards and gathers float tensors (uint8 storage would
    be cast as if it were numbers). PEFT's prepare_model_for_kbit_training then freezes the base and upcasts the
    remaining small weights (norms, embeddings, head) to fp32 for stable training.
    """
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=peft_cfg.quant_type,
        bnb_4bit_use_double_quant=peft_cfg.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, quantization_config=quant, device_map={"": device}, **common
    )
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=model_cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    if device.type == "cpu":
        import bitsandbytes as bnb

        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                # On CPUs with AVX512-BF16, bitsandbytes repacks a layer's weight and quantization state in place on
                # its first no-grad forward; under FSDP2 only the gathered copy is repacked, and every later forward
                # (and the dequantized export) is silently wrong. The plain layout is correct everywhere.
                m.support_avx512bf16_for_cpu = False
    model.train()  # from_pretrained returns eval mode
    return model


def dequantized(model: nn.Module) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """For the final save: `(name, tensor) -> dense tensor`, dequantizing the 4-bit weights of `model`'s
    bitsandbytes layers one tensor at a time (identity for everything else)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    layers = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}

    def dense(name: str, tensor: torch.Tensor) -> torch.Tensor:
        layer = layers.get(name)
        if layer is None:
            return tensor
        state = getattr(tensor, "quant_state", None) or layer.quant_state  # FSDP2's gathered copy has lost it
        return bnbf.dequantize_4bit(tensor.data, state)

    return dense


def _load_adapter_model(model_cfg: ModelConfig, tokenizer: Any, path: str, dtype: torch.dtype) -> nn.Module:
    from peft import PeftModel

    base = build_model(model_cfg, tokenizer, dtype=dtype)
    return PeftModel.from_pretrained(base, path)


def apply_peft(model: nn.Module, peft_cfg: PeftConfig) -> nn.Module:
    """Wrap with LoRA adapters (PEFT); the base weights freeze. method=none returns the model unchanged.

    Each adapter is initialised from a seed derived from `peft.seed` and its module name (see seed_adapters), so
    it is identical however the base was built: plain, on meta and filled shard by shard, or under zero.Init.
    """
    if peft_cfg.method == "none":  # qlora: LoRA itself, over the 4-bit base that build_model loaded
        return model
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
        model = get_peft_model(model, lora)
    except ValueError as err:
        raise ConfigError("peft.target_modules", str(err).splitlines()[0]) from err
    if not any(p.is_meta for p in model.parameters()):
        seed_adapters(model, peft_cfg.seed)
    return model


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") % 2**63


def lora_layers(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """(name, layer) of every PEFT LoRA layer, in module order."""
    from peft.tuners.lora import LoraLayer

    # peft's LoraLayer is a mixin, not an nn.Module: isinstance narrows m to LoraLayer, though it is both.
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer))  # type: ignore[misc]


def reset_lora_layer(layer: nn.Module, name: str, seed: int) -> None:
    """PEFT's own adapter initialisation, drawn from a generator seeded by (seed, layer name)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed_for(seed, name))
        # PEFT LoraLayer members, which nn.Module.__getattr__ types as Tensor | Module
        for adapter in list(layer.lora_A.keys()):  # type: ignore[union-attr, operator]
            layer.reset_lora_parameters(adapter, True)  # type: ignore[operator]


def seed_adapters(model: nn.Module, seed: int) -> None:
    for name, layer in lora_layers(model):
        reset_lora_layer(layer, name, seed)


def is_adapter_name(name: str) -> bool:
    """A parameter (or module) that PEFT added: it exists in no pretrained checkpoint."""
    return any(part.startswith("lora_") for part in name.split("."))


def initial_values(
    twin: nn.Module, seed: int, adapter_seed: int, adapters_only: bool
) -> Iterator[Dict[str, torch.Tensor]]:
    """The initial value of every parameter of the meta-device model `twin`, one module at a time (bounded memory).

    For sharded models that cannot run an ordinary init: each module is materialised alone on the CPU,
    initialised by transformers' `_init_weights` (LoRA layers by PEFT's init) from a seed derived from its name, and
    yielded as {full parameter name: tensor}. The values are the same at every world size; only the module being
    yielded exists in memory. With `adapters_only` only the LoRA adapters are produced (the base is loaded); they
    come from `adapter_seed` (peft.seed) exactly as apply_peft draws them for a model built whole.
    """
    hf = twin.get_base_model() if hasattr(twin, "get_base_model") else twin  # type: ignore[operator]  # PEFT method
    lora = dict(lora_layers(twin))
    for name, module in twin.named_modules():
        if name in lora:
            subs = [m for n, m in module.named_children() if n.startswith("lora_")]
            for sub in subs:
                sub.to_empty(device="cpu")
            reset_lora_layer(module, name, adapter_seed)
            yield {f"{name}.{n}": p.detach() for n, p in module.named_parameters() if is_adapter_name(n)}
            for sub in subs:
                sub.to_empty(device="meta")
            continue
        own = list(module.named_parameters(recurse=False))
        if adapters_only or not own or is_adapter_name(name):
            continue
        module.to_empty(device="cpu", recurse=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed_for(seed, name))
            hf._init_weights(module)  # type: ignore[operator]  # transformers PreTrainedModel method
        yield {f"{name}.{n}" if name else n: p.detach() for n, p in module.named_parameters(recurse=False)}
        module.to_empty(device="meta", recurse=False)


@dataclass
class ModelSpec:
    """What a strategy needs to build the run's model its own way: structure, weights source, seeds."""

    model_cfg: ModelConfig
    peft_cfg: Optional[Any]
    """None: no adapters (evaluating a saved model, which is merged or carries its own adapter)."""
    tokenizer: Any
    seed: int
    path: Optional[str] = None
    """A saved model dir to load instead of `model.name_or_path` (ft-eval)."""
    compute_dtype: torch.dtype = torch.float32
    """QLoRA: the dtype each 4-bit weight is dequantized to for its matmul (train.precision's)."""
    compile_blocks: bool = False
    """train.compile: each transformer block of the built model is torch.compiled (after checkpointing and LoRA,
    before a strategy wraps or shards it)."""

    @property
    def weights_dir(self) -> Optional[Path]:
        """The local HF directory of safetensors the pretrained weights stream from (None: random init)."""
        if self.path is not None:
            return resolve_weights_dir(self.path)
        mc = self.model_cfg
        if mc.from_config or mc.name_or_path is None:
            return None
        return resolve_weights_dir(mc.name_or_path)

    @property
    def quantized(self) -> bool:
        return self.peft_cfg is not None and self.peft_cfg.method == "qlora"

    def build(
        self,
        meta: bool = False,
        init: bool = True,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
    ) -> nn.Module:
        """The (PEFT-wrapped) model; random init is seeded so every rank and every run draws the same weights.
        QLoRA loads its base quantized onto `device` (other models are built on the CPU and moved by the caller)."""
        torch.manual_seed(self.seed)
        quantize = (self.peft_cfg, self.compute_dtype) if self.quantized and self.peft_cfg is not None else None
        model = build_model(
            self.model_cfg,
            self.tokenizer,
            path=self.path,
            meta=meta,
            init=init,
            dtype=dtype,
            quantize=quantize,
            device=device,
        )
        model = apply_peft(model, self.peft_cfg) if self.peft_cfg is not None else model
        if self.compile_blocks:  # lazy: a meta twin built for its structure is never called, so never compiles
            compile_blocks(model)
        return model


def resolve_weights_dir(name_or_path: str) -> Path:
    """A local directory with the model's safetensors: the path itself, or the hub snapshot (rank 0 fetches it)."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors"]
        with dist.main_first():
            try:
                path = Path(
                    snapshot_download(name_or_path, allow_patterns=patterns, local_files_only=not dist.is_main())
                )
            except Exception as err:  # offline, unknown id, gated repo
                raise ConfigError(
                    "model.name_or_path",
                    f"expected a local model directory or a reachable hub id, "
                    f"got {name_or_path!r}: {str(err).splitlines()[0]}",
                ) from err
    if not any(path.glob("*.safetensors")):
        raise ConfigError(
            "model.name_or_path",
            f"expected safetensors weights in {path} (found none); convert "
            "pickled .bin weights with transformers' save_pretrained(safe_serialization=True)",
        )
    return path


def transformer_blocks(model: nn.Module) -> List[nn.Module]:
    """The repeated blocks a sharded model is gathered by, one at a time: HF lists them in `_no_split_modules`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]  # PEFT
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(
            "strategy", f"found no transformer blocks ({sorted(names)}) to shard in {type(base).__name__}"
        )
    return blocks


def compile_blocks(model: nn.Module) -> int:
    """torch.compile each transformer block's forward for training steps, as torchtitan compiles per block: the
    blocks are where the time goes, and the loss, the embeddings and the strategy's wrapping stay eager. Module
    names, hooks (FSDP2's gathers) and state dicts are unchanged: only `forward` is swapped. Eval and generation run
    the eager forward: a decode step's shapes change every token and would only recompile. Compiles at the first
    training forward. Returns how many blocks."""
    blocks = transformer_blocks(model)
    for block in blocks:
        eager, compiled = block.forward, torch.compile(block.forward)

        def forward(*args: Any, _block: nn.Module = block, _eager: Any = eager, _compiled: Any = compiled, **kw: Any):
            train = _block.training and torch.is_grad_enabled()
            return (_compiled if train else _eager)(*args, **kw)

        block.forward = forward  # an instance attribute shadows the class's
    return len(blocks)


def block_prefixes(model: nn.Module) -> List[str]:
    """The module names of the transformer blocks (e.g. `model.layers.3`), in order."""
    ids = {id(b) for b in transformer_blocks(model)}
    return [n for n, m in model.named_modules() if id(m) in ids]


def model_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Parameters (a shared one once, under its first name) and persistent buffers, by name; no copies."""
    out: Dict[str, torch.Tensor] = dict(model.named_parameters())
    for prefix, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf
    return out


def count_parameters(model: nn.Module) -> Dict[str, int]:
    # A 4-bit weight's storage packs several values per element (and is a DTensor shard under FSDP2): count the
    # layer's own shape instead.
    four_bit: Dict[int, int] = {
        id(m.weight): int(m.in_features) * int(m.out_features)  # type: ignore[arg-type]  # nn.Linear fields
        for m in model.modules()
        if type(m).__name__ == "Linear4bit"
    }

    def numel(p: nn.Parameter) -> int:
        return int(four_bit.get(id(p)) or getattr(p, "ds_numel", None) or p.numel())  # ZeRO-3: a partition locally

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
            raise NotImplementedError(
                f"cannot rebuild the non-persistent buffers {missing} of {name} "
                f"({type(module).__name__}): its constructor takes no config"
            )
        twin = type(module)(module.config)
        for buf in missing:
            module._buffers[buf] = twin._buffers[buf].to(module._buffers[buf].device)
