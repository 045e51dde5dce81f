"""Activation and loss-buffer bytes of a training step, per GPU and micro-batch.

Per block and token, the bytes that autograd saves for backward in the HF implementations (transformers 5),
counted tensor by tensor and checked against MemTracker (tests/test_planner.py). Korthikanti et al.'s
sbh(34 + 5as/h) counts the same thing for Megatron's GPT; HF's blocks differ:
  Llama, fp32, SDPA: each RMSNorm keeps its input, its normalised value and its output (3 x 4h, twice), RoPE'd q
  and k, v and the attention output (8q + 8kv), the SwiGLU MLP four I-sized tensors (16 I), SDPA's logsumexp (4 nh).
  Autocast (bf16/fp16 mixed): the residual stream stays fp32 (norms keep 4h + 4h), projections keep a 16-bit cast
  of their input per call, and autocast caches a 16-bit copy of every fp32 weight until backward (2 B/param).
  LoRA: frozen norm weights keep no normalised copy; PEFT adds r-sized A outputs per adapted projection and, with
  dropout, a dropped input per adapted projection and dropout's mask (1 B on CUDA; on CPU the scaled noise).
Eager attention adds the softmax (nh x s per token, fp32, plus a 16-bit copy in 16-bit modes).
The loss: the fp32 log-softmax and two fp32 gradients of V per token (see loss_bytes); chunked cross-entropy
(ft_dist/loss.py) holds that for one chunk of tokens at a time, in forward and in its recompute in backward.
Selective checkpointing (every k-th block) keeps the full activations of the blocks it skips. Activation offload
keeps one block's activations in flight on the GPU and the rest in host memory (modelled, not yet measured on a GPU:
bench/memory_features.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Set, Tuple

from ft_dist.config import CHUNKED_LOSS_ARCHS
from ft_dist.planner.params import Architecture, Linear
from ft_dist.planner.workload import TrainingSetup

# Bytes per token per block: coefficients of (h, q_dim, kv_dim, intermediate), keyed by (family, mode, lora).
# mode: fp32 | mixed (autocast over fp32 weights, or over a bf16 LoRA base) | pure (bf16 weights, no autocast).
_BLOCK_COEFFS = {
    ("llama", "fp32", False): (24, 8, 8, 16),
    ("llama", "fp32", True): (16, 8, 8, 16),
    ("llama", "mixed", False): (26, 4, 4, 8),
    ("llama", "mixed", True): (20, 4, 4, 8),
    ("llama", "pure", False): (16, 4, 4, 8),
    ("llama", "pure", True): (20, 4, 4, 8),
    ("gpt_neox", "fp32", False): (24, 8, 8, 8),
    ("gpt_neox", "fp32", True): (12, 16, 12, 8),
    ("gpt_neox", "mixed", False): (26, 4, 4, 4),
    ("gpt_neox", "mixed", True): (6, 8, 6, 4),
    ("gpt_neox", "pure", False): (16, 4, 4, 4),
    ("gpt_neox", "pure", True): (6, 8, 6, 4),
}
# The final norm keeps what one block norm keeps (its output only if the head is trained): bytes per h.
_FINAL_NORM = {
    ("fp32", False): 12,
    ("fp32", True): 4,
    ("mixed", False): 10,
    ("mixed", True): 4,
    ("pure", False): 8,
    ("pure", True): 4,
}


@dataclass(frozen=True)
class ActivationPhases:
    """Activation bytes at the three moments `memory.estimate_memory` compares."""

    saved: float
    """At the end of forward: every block's saved tensors (or checkpoints) and the autocast weight cache."""
    logits: float
    """Logits and loss buffers at the start of backward."""
    backward_end: float
    """While the first block runs backward: its activations (recomputed under checkpointing)."""
    offloaded: float = 0.0
    """Host bytes of the activations offloaded (train.offload_activations)."""


def _mode(setup: TrainingSetup) -> str:
    """Autocast ("mixed") only in torch-native single/DDP runs: DeepSpeed and FSDP2's MixedPrecisionPolicy run the
    blocks on 16-bit weights directly, which saves what pure bf16 saves."""
    if setup.precision == "fp32":
        return "fp32"
    if setup.precision == "pure_bf16" or setup.deepspeed or setup.fsdp:
        return "pure"
    return "mixed"


def _family(arch: Architecture) -> str:
    return "llama" if arch.family == "llama" else "gpt_neox"  # GPT-2's block is laid out like GPT-NeoX's


def chunked_loss(arch: Architecture, setup: TrainingSetup) -> bool:
    """Whether the run computes chunked cross-entropy (train.loss=auto picks it where it is exact)."""
    return setup.loss in ("chunked", "fused") or (setup.loss == "auto" and arch.model_type in CHUNKED_LOSS_ARCHS)


def loss_bytes(arch: Architecture, setup: TrainingSetup) -> float:
    """Peak bytes of the loss: per token in flight, the fp32 log-softmax, its gradient and the gradient of the
    logits (12 B x vocab; the compute-dtype logits are gone by then, as ft_dist/loss.py keeps only the loss).
    Chunked: one chunk in flight, and from the second chunk on the head's weight gradient of the chunk is a new
    tensor before it is added to the accumulated one (when the head trains)."""
    tokens = setup.tokens_per_micro_batch
    if setup.loss == "full_16bit":  # log-softmax and both gradients in the compute dtype: no fp32 upcast
        return tokens * arch.vocab * 3.0 * setup.compute_bytes
    if not chunked_loss(arch, setup) or setup.loss_chunk_tokens >= tokens:
        return tokens * arch.vocab * 12.0
    head_grad = arch.vocab * arch.hidden * 4 if setup.peft == "none" else 0
    return setup.loss_chunk_tokens * arch.vocab * 12.0 + head_grad


def block_bytes_per_token(arch: Architecture, setup: TrainingSetup) -> float:
    """Bytes that one block saves for backward per token (excluding the autocast weight cache)."""
    lora = setup.peft != "none"
    mode = _mode(setup)
    ch, cq, ckv, ci = _BLOCK_COEFFS[(_family(arch), mode, lora)]
    out: float = ch * arch.hidden + cq * arch.q_dim + ckv * arch.kv_dim + ci * arch.intermediate
    if lora:
        # The coefficients are for every projection adapted (all-linear), without dropout; each adapted projection
        # adds lora_A's r-sized output (kept by lora_B). What lora_A keeps of its input, per mode (counted tensor by
        # tensor and checked per block against MemTracker, tests/test_planner.py):
        #   fp32: the block's input itself, one tensor per input, shared by the projections that read it (in the
        #     coefficients). In Llama the attention output that o_proj reads is the very tensor SDPA keeps for its
        #     backward; GPT-NeoX reshapes it into a copy first.
        #   mixed: autocast's 16-bit copy, one per projection (in the coefficients);
        #   pure with fp32 adapters: PEFT's fp32 cast, one per projection, in place of the coefficients' copies.
        # A frozen projection keeps nothing (autograd saves a matmul's input only for its weight's gradient).
        # Dropout makes a new input per projection, which lora_A keeps in place of the shared one (in mixed mode
        # autocast's copy of it), and keeps what its own backward needs: on CUDA the fused kernel's 1-byte mask, on
        # CPU the scaled noise in the input's dtype (aten's unfused input * noise).
        adapted = arch.targeted(list(setup.lora_targets))
        names = {lin.name for lin in adapted}
        read = {_input_of(lin) for lin in adapted}
        own = {g: w for g, w in _inputs(arch).items() if g not in _kept_by_attention(arch)}  # nothing else keeps
        b = 4 if mode == "fp32" else 2
        fan_in = sum(lin.fan_in for lin in adapted)
        keeps_all = setup.peft == "qlora" and setup.qlora_keeps_inputs  # old bitsandbytes saves frozen inputs
        fp32_adapters = _fp32_adapters(setup)
        dropout = setup.lora_dropout > 0
        mask = _dropout_mask_bytes(setup) * fan_in
        out += setup.lora_rank * len(adapted) * (4 if fp32_adapters else b)
        if mode == "fp32":
            read = read | (set(_inputs(arch)) if keeps_all else set())
            out -= 4 * sum(w for g, w in own.items() if g not in read)
            if dropout:
                out += 4 * fan_in + mask - 4 * sum(w for g, w in own.items() if g in read)
        else:
            frozen = 0 if keeps_all else sum(lin.fan_in for lin in arch.block_linears if lin.name not in names)
            if fp32_adapters:
                out += 4 * fan_in + mask - 2 * sum(lin.fan_in for lin in arch.block_linears)
            else:
                out += mask - 2 * frozen
                if mode == "pure" and not dropout and not keeps_all:
                    # 16-bit adapters and no dropout: lora_A reads the block's input itself, one tensor per input
                    # (none for Llama's attention output, which SDPA keeps anyway), not a copy per projection.
                    out -= 2 * fan_in - 2 * sum(w for g, w in own.items() if g in read)
        if setup.peft == "qlora" and setup.qlora_upcast and mode != "fp32":
            out += 4 * arch.hidden  # the fp32 embeddings and norms keep the residual stream (both norms' inputs) fp32
    if setup.attention == "eager":
        scores = arch.heads * setup.seq_len
        out += scores * (4 if mode == "fp32" else 6)
        out += 2 * (arch.q_dim - arch.kv_dim) * setup.compute_bytes  # repeat_kv copies for GQA/MQA
    else:
        out += 4 * arch.heads  # the logsumexp SDPA/flash keep
    return out


def _kept_by_attention(arch: Architecture) -> Set[str]:
    """Projection inputs that attention keeps for its own backward anyway: Llama's o_proj reads the very tensor SDPA
    keeps (GPT-NeoX reshapes it into a copy first)."""
    return {"attn_out"} if _family(arch) == "llama" else set()


def _fp32_adapters(setup: TrainingSetup) -> bool:
    """fp32 adapters over a bf16 base without autocast: PEFT casts each adapted projection's input to fp32."""
    return _mode(setup) == "pure" and setup.lora_fp32 and not setup.deepspeed and not setup.fsdp


def _dropout_mask_bytes(setup: TrainingSetup) -> float:
    """What LoRA's dropout keeps for its backward, per element of its input: CUDA's fused kernel a 1-byte mask,
    CPU's unfused input * noise the noise, in the dtype PEFT hands the dropout (fp32 where the adapters are)."""
    if setup.lora_dropout <= 0:
        return 0.0
    if setup.device == "cuda":
        return 1.0
    return 4.0 if _mode(setup) in ("fp32", "mixed") or _fp32_adapters(setup) else 2.0


def _first_block_saving(arch: Architecture, setup: TrainingSetup) -> float:
    """Bytes per token the first block keeps less than the others under (Q)LoRA: the embeddings are frozen, so
    nothing before the first adapter needs a gradient. Its input norm keeps nothing (4h: the fp32 input or upcast
    every norm keeps), nor do the dropouts of the projections reading that norm's output."""
    attn = [lin for lin in arch.targeted(list(setup.lora_targets)) if _input_of(lin) == "attn"]
    return 4.0 * arch.hidden + _dropout_mask_bytes(setup) * sum(lin.fan_in for lin in attn)


# Projections that read the same input tensor (PEFT module names of the Llama, GPT-NeoX and GPT-2 blocks).
_INPUT_GROUPS = {
    "q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "qkv_proj": "attn", "query_key_value": "attn",
    "c_attn": "attn", "o_proj": "attn_out", "dense": "attn_out", "attn.c_proj": "attn_out",
    "gate_proj": "mlp", "up_proj": "mlp", "gate_up_proj": "mlp", "dense_h_to_4h": "mlp", "c_fc": "mlp",
    "down_proj": "mlp_out", "dense_4h_to_h": "mlp_out", "mlp.c_proj": "mlp_out",
}  # fmt: skip


def _input_of(lin: Linear) -> str:
    short = lin.name.split(".")[-1]
    return _INPUT_GROUPS.get(lin.name, _INPUT_GROUPS.get(short, lin.name))


def _inputs(arch: Architecture) -> Dict[str, int]:
    """Each distinct projection input of a block and its width."""
    return {_input_of(lin): lin.fan_in for lin in arch.block_linears}


def _weight_cache_per_block(arch: Architecture, setup: TrainingSetup) -> float:
    """Autocast's 16-bit copies of fp32 weights, kept from their first use in forward until backward."""
    if _mode(setup) != "mixed":
        return 0.0
    if setup.peft == "none":
        return 2.0 * arch.block_params
    return 2.0 * arch.lora_params(setup.lora_rank, list(setup.lora_targets)) / arch.layers


def activation_phases(arch: Architecture, setup: TrainingSetup) -> ActivationPhases:
    """Activation bytes per GPU for one micro-batch at forward end and backward end."""
    t = setup.tokens_per_micro_batch
    mode, lora = _mode(setup), setup.peft != "none"
    block = block_bytes_per_token(arch, setup) * t
    cache = _weight_cache_per_block(arch, setup)
    final_norm = _FINAL_NORM[(mode, lora)] * arch.hidden * t
    rotary = 2 * arch.head_dim * t * (4 if mode != "pure" else 2) if arch.family != "gpt2" else 0
    upcast = setup.peft == "qlora" and setup.qlora_upcast
    residual_bytes = 4 if (mode == "fp32" or (mode == "mixed" and not lora) or upcast) else 2
    if setup.activation_checkpointing:
        # A checkpointed block keeps only its input through forward; backward recomputes one block at a time.
        # Selective: blocks 0, k, 2k, ... recompute, the others keep everything.
        recomputed = -(-arch.layers // setup.checkpoint_every)
        saved = recomputed * (residual_bytes * arch.hidden * t + cache) + (arch.layers - recomputed) * (block + cache)
        backward_end = block + cache + residual_bytes * arch.hidden * t
    else:
        saved = arch.layers * (block + cache) - (_first_block_saving(arch, setup) * t if lora else 0.0)
        backward_end = block + cache
    # Backward of a block also holds the incoming gradient and the MLP's intermediate gradients.
    backward_end += t * (2 * arch.intermediate + 2 * arch.hidden) * setup.compute_bytes
    saved += final_norm + rotary
    offloaded = 0.0
    if setup.offload_activations:
        offloaded = saved
        saved = block  # the block computing now; the rest (autocast's weight copies included) waits on the host
    logits = loss_bytes(arch, setup)
    if setup.attention == "eager":
        saved += setup.micro_batch * setup.seq_len**2 * setup.compute_bytes  # the 4-D causal mask
    return ActivationPhases(saved=saved, logits=logits, backward_end=backward_end, offloaded=offloaded)


def coefficients(arch: Architecture, setup: TrainingSetup) -> Tuple[float, float]:
    """(bytes per token per block, autocast weight-cache bytes per block): for reports."""
    return block_bytes_per_token(arch, setup), _weight_cache_per_block(arch, setup)
