"""Trace mode: measure a training step of the real architecture instead of estimating it.

The HF model is built from the `arch` dict with a few layers, one optimizer step is run twice (the second step is
the steady state: optimizer states exist, gradients were freed by zero_grad) under torch's MemTracker, which
attributes every tensor to parameters, gradients, optimizer states, activations or temporaries and records the peak.

With `fake=True` everything runs under FakeTensorMode: shapes and dtypes are real, storage is not, so a 70B layer
costs no memory (environment.md: the fake peak equals the real-tensor peak to the byte). The result is then scaled
from two shallow depths to the full depth, and the GPU-only terms (CUDA context, allocator, NCCL buffers, sharding)
are added analytically by `memory.estimate_memory`. Only the cpu device works under FakeTensorMode with a CPU
build of torch, which is why the trace runs there.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Mapping

from ft_dist.activations import checkpoint_blocks, offload_activations
from ft_dist.errors import ConfigError
from ft_dist.loss import CausalLMLoss
from ft_dist.planner.params import hf_config, with_layers
from ft_dist.planner.workload import TrainingSetup

# MemTracker's categories -> the planner's. Temporaries (e.g. an optimizer's per-tensor scratch) and buffers
# (rotary tables) are counted with activations: both live only while a step runs.
_CATEGORIES = {
    "Parameter": "params",
    "Gradient": "grads",
    "Optstate": "optimizer",
    "Activation": "activations",
    "Temp": "activations",
    "Buffer": "activations",
    "Other": "activations",
}


@dataclass(frozen=True)
class MeasuredPeak:
    """Bytes at the moment of the peak, by category, and the peak itself."""

    params: int
    grads: int
    optimizer: int
    activations: int
    total: int

    def scaled(self, other: "MeasuredPeak", factor: float) -> "MeasuredPeak":
        """self + factor * (self - other): linear extrapolation in depth from two measurements."""

        def ext(a: int, b: int) -> int:
            return int(round(a + factor * (a - b)))

        return MeasuredPeak(
            *(
                ext(getattr(self, f), getattr(other, f))
                for f in ("params", "grads", "optimizer", "activations", "total")
            )
        )


def _check_traceable(setup: TrainingSetup) -> None:
    if setup.peft == "qlora":
        raise ConfigError(
            "plan.peft", "trace mode cannot run QLoRA (bitsandbytes 4-bit kernels need a GPU); use plan.trace=false"
        )
    if setup.optimizer not in ("adamw", "sgd"):
        raise ConfigError(
            "plan.optimizer",
            f"trace mode runs under fake tensors, which bitsandbytes' {setup.optimizer} kernels cannot; "
            "use plan.trace=false",
        )


def build_model(arch: Mapping[str, Any], setup: TrainingSetup) -> Any:
    """The HF causal LM for `arch`, in the dtypes `setup` implies, with LoRA and checkpointing applied.

    Weight dtypes: fp32 and mixed precision keep fp32 weights (autocast computes in 16 bit); pure bf16 stores bf16.
    LoRA freezes a base stored in the compute dtype (bf16 unless fp32); PEFT keeps the adapters in fp32 unless
    `lora_fp32` is off or the strategy is DeepSpeed/FSDP2.
    """
    import torch
    from transformers import AutoModelForCausalLM

    cfg = hf_config(arch)
    cfg.use_cache = False
    lora = setup.peft == "lora"
    half_base = setup.precision == "pure_bf16" or (lora and setup.precision != "fp32")
    dtype = torch.bfloat16 if half_base else torch.float32
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=setup.attention, dtype=dtype)
    if lora:
        from peft import LoraConfig, get_peft_model

        targets = "all-linear" if "all-linear" in setup.lora_targets else list(setup.lora_targets)
        model = get_peft_model(
            model,
            LoraConfig(
                r=setup.lora_rank,
                lora_alpha=2 * setup.lora_rank,
                lora_dropout=setup.lora_dropout,
                target_modules=targets,
                task_type="CAUSAL_LM",
            ),
            # 16-bit adapters where the run has them: torchtune/LitGPT-style, or DeepSpeed and FSDP2, which cast
            # every weight to the compute dtype.
            autocast_adapter_dtype=setup.lora_fp32 and not (setup.deepspeed or setup.fsdp),
        )
    if setup.activation_checkpointing:
        checkpoint_blocks(model, setup.checkpoint_every)
    model.train()
    return model


def _optimizer(model: Any, setup: TrainingSetup) -> Any:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if setup.optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-4)


class _NoHook:
    def remove(self) -> None:
        pass


def skip_frozen(tracker: Any, model: Any) -> None:
    """MemTracker registers a grad hook on every parameter and fails on frozen ones (LoRA's base weights).

    Marking the frozen parameters as already hooked makes it skip them; they are still counted as parameters.
    """
    for p in model.parameters():
        if not p.requires_grad:
            tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())


def measure_step(arch: Mapping[str, Any], setup: TrainingSetup, fake: bool = True, steps: int = 2) -> MeasuredPeak:
    """Peak bytes of `steps` training steps of `arch` under `setup` (one process, no sharding), via MemTracker."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    _check_traceable(setup)
    torch.manual_seed(0)
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16 if setup.precision == "bf16" else torch.float16)
        if setup.mixed
        else contextlib.nullcontext()
    )
    with mode:
        model = build_model(arch, setup)
        optimizer = _optimizer(model, setup)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (setup.micro_batch, setup.seq_len))
        loss = CausalLMLoss(model, setup.loss, setup.loss_chunk_tokens)
        batch = {"input_ids": ids, "labels": ids}
        tracker = MemTracker()
        skip_frozen(tracker, model)
        tracker.track_external(model, optimizer, ids)
        with tracker:
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                for _ in range(setup.grad_accum):
                    tracker.reset_mod_stats()  # per-module stats are per call; the global peak is kept
                    with autocast, offload_activations(setup.offload_activations):
                        step_loss = loss(model, batch, 1.0)
                    step_loss.backward()
                    del step_loss
                optimizer.step()
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    parts: Dict[str, int] = {"params": 0, "grads": 0, "optimizer": 0, "activations": 0}
    for key, value in peak.items():
        name = getattr(key, "value", key)
        if name in _CATEGORIES:
            parts[_CATEGORIES[name]] += int(value)
    return MeasuredPeak(total=sum(parts.values()), **parts)


def trace_full_depth(arch: Mapping[str, Any], setup: TrainingSetup, layers: int, few: int = 2) -> MeasuredPeak:
    """Measure at depths `few` and `few - 1` under FakeTensorMode and extrapolate linearly to `layers`.

    Every block has the same shapes, so each category grows by the same amount per block; the embedding, head and
    loss are in both measurements and cancel in the difference.
    """
    few = max(2, min(few, layers))
    deep = measure_step(with_layers(arch, few), setup, fake=True)
    shallow = measure_step(with_layers(arch, few - 1), setup, fake=True)
    return deep.scaled(shallow, layers - few)
