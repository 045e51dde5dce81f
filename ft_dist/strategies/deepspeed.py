"""DeepSpeed ZeRO stages 1/2/3, with optimizer and parameter offload to the CPU.

ZeRO-3 builds the model under `zero.Init` (transformers does so while an HfDeepSpeedConfig is alive), so each
parameter is partitioned as soon as it is created and the full model never exists on one rank. A pretrained model
is built without initialising or reading anything; each rank then reads only its own partition (its fp32 master
range) from the memory-mapped safetensors, and the 16-bit copies are refreshed from it. The optimizer is torch's
AdamW handed to the engine: on a GPU its fused version (train.optimizer=adamw -> optim.py), one multi-tensor kernel
per step like DeepSpeed's FusedAdam, without that op's JIT build and in torch's state layout, which the checkpoints
that any strategy resumes are written in; on CPU one tensor at a time, so resume is bitwise. With optimizer offload
on GPUs DeepSpeed's CPUAdam runs, because torch's AdamW on the host would be the bottleneck.

Checkpoints stay sharded: each rank writes its own partitions of the fp32 weights and Adam moments as DCP chunks
(strategies/fragments.py), in the same name-keyed layout as FSDP2 and DDP, so any world size and any strategy
resumes them. Outside training, ZeRO-3 generates on the partitioned model (every rank in lockstep) and the final
save gathers one transformer block at a time.
"""

from __future__ import annotations

import contextlib
import os
import resource
from typing import Any, ContextManager, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ft_dist import dist
from ft_dist.config import StrategyConfig, TrainConfig
from ft_dist.hf_weights import load_hf_weights
from ft_dist.models import ModelSpec, block_prefixes, is_adapter_name
from ft_dist.strategies.base import _DTYPES, OptimizerFactory, Strategy
from ft_dist.strategies.fragments import sharded_range


def current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


ZERO3_SUB_GROUP = 50_000_000
"""Elements per ZeRO-3 optimizer sub-group (DeepSpeed's default is 1e9)."""


def deepspeed_config(
    sc: StrategyConfig, tc: TrainConfig, world_size: int, on_gpu: bool, hidden: int = 0
) -> Dict[str, Any]:
    """The DeepSpeed JSON config equivalent to our strategy/train settings.

    Bucket sizes follow the model (what transformers' "auto" sets: hidden^2 elements, ZeRO-3 prefetch 0.9 hidden^2,
    persistence threshold 10 hidden) rather than DeepSpeed's fixed 5e8 elements, which alone would be 1 GB per
    bucket in 16 bit on every GPU, more than a small model's share; ZeRO-3's live-parameter limits likewise.
    """
    zero: Dict[str, Any] = {"stage": sc.zero_stage}
    if hidden:
        zero["reduce_bucket_size"] = hidden * hidden
        zero["allgather_bucket_size"] = hidden * hidden
        if sc.zero_stage == 3:
            # On DeepSpeed's CPU accelerator the prefetcher keeps every parameter it gathered alive through the
            # step (the whole 16-bit model per rank, measured by the dry run and by tests/test_scale.py), and gloo's
            # collectives are synchronous, so prefetching buys nothing there: it is off on CPU.
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden * hidden) if on_gpu else 0
            zero["stage3_param_persistence_threshold"] = 10 * hidden
            # DeepSpeed keeps up to 1e9 gathered parameters alive (and reusable) by default: on a model below a few
            # billion parameters that is the whole model gathered on every rank during eval and generation.
            zero["stage3_max_live_parameters"] = 10 * hidden * hidden
            zero["stage3_max_reuse_distance"] = 10 * hidden * hidden
    if sc.zero_stage == 3:
        # The optimizer steps one flat sub-group at a time; a torch AdamW materialises sqrt(v) and its quotient
        # for the tensor it steps, so DeepSpeed's default of 1e9 elements would add 8 GB of temporaries per rank.
        zero["sub_group_size"] = ZERO3_SUB_GROUP
    for key, where in (("offload_optimizer", sc.offload_optimizer), ("offload_param", sc.offload_params)):
        if where != "none":
            zero[key] = {
                "device": where,
                "pin_memory": on_gpu,
                **({"nvme_path": sc.nvme_path} if where == "nvme" else {}),
            }
    return {
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.micro_batch_size * tc.grad_accum * world_size,
        "gradient_clipping": tc.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": tc.precision == "bf16"},
        "fp16": {"enabled": tc.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedZero(Strategy):
    # The engine counts micro-steps itself; a dropped step would shift its accumulation boundary. It stops at the
    # first non-finite step instead (fp16 overflow steps are skipped by DeepSpeed's own loss scaler).
    can_skip_steps = False

    def setup(self, spec: ModelSpec, build_optimizer: Optional[OptimizerFactory]) -> None:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        sc = self.cfg
        on_gpu = self.world.device.type == "cuda"
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")  # reuses our process group
        hidden = int(getattr(spec.build(meta=True).config, "hidden_size", 0) or 0)
        self.ds_config = deepspeed_config(sc, self.train, self.world.size, on_gpu, hidden)
        self.stage3 = sc.zero_stage == 3
        # QLoRA: transformers quantizes the base as it loads it (never under zero.Init, which it skips for quantized
        # models), so every rank holds the 4-bit model until deepspeed.initialize partitions it (ZeRO-3).
        weights_dir = spec.weights_dir if self.fake_mode is None and not spec.quantized else None
        # While this object lives, transformers builds models under zero.Init (partitioned at creation).
        hf_ds = HfDeepSpeedConfig(self.ds_config) if self.stage3 and not spec.quantized else None
        with self.fake_mode or contextlib.nullcontext():  # a dry run partitions fake tensors
            self._build_engine(spec, build_optimizer, init=weights_dir is None)
        del hf_ds  # later model builds (twins on meta) must not be partitioned
        if self.stage3:  # show that no rank ever held the whole model
            all_params = list(self.engine.module.parameters())
            local = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in all_params) / 2**20
            full = sum(p.ds_numel * p.ds_tensor.element_size() for p in all_params) / 2**20
            when = "by deepspeed.initialize (4-bit base)" if spec.quantized else "at creation"
            dist.log(
                f"zero3: parameters partitioned {when}: this rank holds {local:.1f} MB of {full:.1f} MB of "
                f"parameters; peak RSS grew {self._build_growth_mb:.1f} MB while building"
            )
        self._names = {id(p): n for n, p in self.engine.module.named_parameters()}
        self._ranges = self._fragment_ranges()
        if weights_dir is not None:
            targets = {
                n: self._weight_target(p) for n, p in self.engine.module.named_parameters() if not is_adapter_name(n)
            }
            load_hf_weights(targets, weights_dir)
            self._refresh_lp()

    def _build_engine(self, spec: ModelSpec, build_optimizer: Optional[OptimizerFactory], init: bool) -> None:
        """The model in the 16-bit dtype DeepSpeed keeps (a pretrained one neither initialised nor read here), the
        optimizer, and the engine around them."""
        import deepspeed

        rss_before = current_rss_mb()
        model = spec.build(init=init, dtype=_DTYPES[self.precision], device=self.world.device)
        self._build_growth_mb = peak_rss_mb() - rss_before
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = None
        if build_optimizer is not None:
            if (
                self.world.device.type == "cuda"
                and self.cfg.offload_optimizer != "none"
                and self.train.optimizer == "adamw"
            ):
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                tc = self.train
                optimizer = DeepSpeedCPUAdam(
                    params,
                    lr=tc.lr,
                    betas=(tc.adam_beta1, tc.adam_beta2),
                    eps=tc.adam_eps,
                    weight_decay=tc.weight_decay,
                )
            else:
                optimizer = build_optimizer(params)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=params, config=self.ds_config
        )
        self.model = self.engine
        self.has_optimizer = optimizer is not None
        if optimizer is not None:
            self.optimizer = optimizer  # the inner torch optimizer: the LR schedule acts on its param_groups
            self._prime_optimizer_state()

    # --- where each rank's part of a parameter lives ----------------------------------------------------------
    def _fragment_ranges(self) -> Dict[str, List[Tuple[int, int]]]:
        """Per parameter, the flat element range every rank holds. ZeRO-3: fixed-size partitions, computed;
        ZeRO-1/2: wherever the flat partitions cut, learnt once from every rank (one all-gather)."""
        module, size = self.engine.module, self.world.size
        if self.stage3:
            out = {}
            for name, p in module.named_parameters():
                part = p.ds_tensor.numel()
                out[name] = [(min(r * part, p.ds_numel), min((r + 1) * part, p.ds_numel)) for r in range(size)]
            return out
        mine = {}
        for name, p in module.named_parameters():
            hp = getattr(p, "_hp_mapping", None)
            mine[name] = (
                (hp.lp_fragment_address.start, hp.lp_fragment_address.start + hp.lp_fragment_address.numel)
                if hp is not None
                else (0, 0)
            )
        gathered = dist.all_gather_objects(mine)
        return {name: [g[name] for g in gathered] for name in mine}

    def _trainable(self, p: torch.nn.Parameter) -> bool:
        return p.requires_grad and self.has_optimizer

    def _fragment(self, name: str, p: torch.nn.Parameter, key: Optional[str]) -> Any:
        """This rank's fp32 master (key None) or optimizer-state partition of `p`, as a ShardedTensor of views."""
        zero = self.engine.optimizer
        if self.stage3:
            local = zero._get_fp32_opt_state_partition(p, False, key)[0]
        else:
            hp = getattr(p, "_hp_mapping", None)
            if hp is None:  # this rank's partition holds no element of p
                local = torch.empty(0, dtype=torch.float32, device=self.world.device)
            else:
                local = hp.hp_fragment if key is None else hp.get_optim_state_fragment(key)
        return sharded_range(local, self._shape(p), self._ranges[name], self.world.rank)

    def _shape(self, p: torch.nn.Parameter) -> Tuple[int, ...]:
        return tuple(p.ds_shape) if self.stage3 else tuple(p.shape)  # type: ignore[attr-defined]  # ZeRO-3 attribute

    def _weight_target(self, p: torch.nn.Parameter) -> Any:
        """Where a weight's value lives: the fp32 master for trained ones; the 16-bit copy for frozen ones (the
        ZeRO-3 partition, or the whole tensor under ZeRO-1/2)."""
        name = self._names[id(p)]
        if self._trainable(p):
            return self._fragment(name, p, None)
        if self.stage3:
            # ds_tensor: the ZeRO-3 partition DeepSpeed attaches to the parameter (not in torch's stubs)
            return sharded_range(p.ds_tensor, self._shape(p), self._ranges[name], self.world.rank)  # type: ignore[attr-defined]
        return p.data

    def _refresh_lp(self) -> None:
        """After the fp32 masters changed (load, resume): the 16-bit weights the forward uses follow them."""
        zero = self.engine.optimizer
        if not self.has_optimizer:
            return
        if self.stage3:
            with torch.no_grad():
                for p in self.engine.module.parameters():
                    if p.requires_grad:
                        p.ds_tensor.data.copy_(zero._get_fp32_opt_state_partition(p, False)[0])
        else:
            zero.update_lp_params()

    # --- the step ------------------------------------------------------------------------------------------------
    def autocast(self) -> ContextManager[None]:
        return contextlib.nullcontext()  # DeepSpeed holds bf16/fp16 parameters itself

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        # The loop already divided by the global token count; DeepSpeed must not divide by accumulation again.
        self.engine.backward(loss, scale_wrt_gas=False)
        if not sync:
            self.engine.step()  # a micro-step: DeepSpeed only counts it, the real step comes at the boundary

    def clip_gradients(self, max_grad_norm: float) -> Optional[torch.Tensor]:
        return None  # the engine clips inside its step (gradient_clipping in its config)

    def step(self, apply: bool) -> Optional[float]:
        # can_skip_steps is False: the loop only calls this to apply. DeepSpeed's own overflow check and clipping
        # read the gradients' state on the host inside engine.step(); that sync is DeepSpeed's, not the loop's.
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def unwrapped(self) -> nn.Module:
        return self.engine.module

    # --- outside training: lockstep generation, block-by-block gathers ------------------------------------------
    def generation_model(self) -> Tuple[nn.Module, bool]:
        return self.engine.module, self.stage3

    def gathered_units(self) -> Iterator[Dict[str, torch.Tensor]]:
        if not self.stage3:  # every rank holds the whole 16-bit model
            yield from super().gathered_units()
            return
        import deepspeed

        # Generation leaves prefetched parameters in flight; settle and release them before gathering by hand.
        self.engine.empty_partition_cache()
        module = self.engine.module
        prefixes = block_prefixes(module)
        named = dict(module.named_parameters())
        groups: Dict[str, List[str]] = {p: [] for p in prefixes}
        rest: List[str] = []
        for n in named:
            owner = next((p for p in prefixes if n.startswith(p + ".")), None)
            (groups[owner] if owner else rest).append(n)
        for members in [*groups.values(), rest]:
            with deepspeed.zero.GatheredParameters([named[n] for n in members], modifier_rank=None):
                yield {n: named[n].data for n in members}

    # --- checkpoint state: each rank's own partitions, name-keyed like torch's get_state_dict ---------------------
    def checkpoint_state(self) -> Dict[str, Any]:
        """{"model": fp32 masters (frozen weights as kept), "optim": {"state": {name: step, exp_avg, exp_avg_sq},
        "param_groups"}}: torch's layout, with ZeRO partitions as chunks, so DCP writes and reads only this rank's."""
        self._prime_optimizer_state()
        module = self.engine.module
        model_sd: Dict[str, Any] = {}
        state: Dict[str, Any] = {}
        names = []
        steps = float(self._optimizer_steps())
        for name, p in module.named_parameters():
            if self.quantized and not p.requires_grad:
                continue  # QLoRA: the frozen 4-bit base is the pretrained model, quantized again at every start
            model_sd[name] = self._weight_target(p)
            if self._trainable(p):
                state[name] = {
                    "step": torch.tensor(steps),
                    "exp_avg": self._fragment(name, p, "exp_avg"),
                    "exp_avg_sq": self._fragment(name, p, "exp_avg_sq"),
                }
                names.append(name)
        for prefix, m in module.named_modules():
            for n, b in m.named_buffers(recurse=False):
                if n not in m._non_persistent_buffers_set:
                    model_sd[f"{prefix}.{n}" if prefix else n] = b
        group = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
        return {"model": model_sd, "optim": {"state": state, "param_groups": [{**group, "params": names}]}}

    def _prime_optimizer_state(self) -> None:
        """Create zero AdamW moments before the first step (torch creates them lazily), so a checkpoint can be
        read into them and DeepSpeed's name-to-partition links (hp mappings) point at real tensors."""
        zero = self.engine.optimizer
        inner = getattr(zero, "optimizer", None)
        if inner is None:
            return
        # The fp32 partitions AdamW steps on: ZeRO-3 attaches them to the param groups only inside step().
        flat = list(
            getattr(zero, "fp32_partitioned_groups_flat", None)
            or getattr(zero, "single_partition_of_fp32_groups", None)
            or [p for group in inner.param_groups for p in group["params"]]
        )
        missing = [p for p in flat if "exp_avg" not in inner.state.get(p, {})]
        if not missing:
            return
        # torch's fused AdamW (GPU) keeps `step` on the parameter's device; the others on the CPU.
        on_device = bool(inner.defaults.get("fused"))
        for p in missing:  # keep whatever DeepSpeed already put there (e.g. swap bookkeeping)
            inner.state[p] = {
                **inner.state.get(p, {}),
                "step": torch.tensor(0.0, device=p.device if on_device else "cpu"),
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p),
            }
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def _optimizer_steps(self) -> int:
        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        steps = [float(s["step"]) for s in inner.state.values() if "step" in s]
        return int(max(steps)) if steps else 0

    def load_checkpoint_state(self, state: Dict[str, Any]) -> None:
        """DCP already wrote the masters and moments in place (the state's chunks are views into the partitions);
        refresh the 16-bit weights, the step count and the learning rate."""
        self._refresh_lp()
        optim = state["optim"]["state"]
        # ZeRO flattens parameters into a few groups; all were stepped together, so one count restores them.
        step = max((float(s["step"]) for s in optim.values()), default=0.0)
        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        for group in inner.param_groups:  # the LR schedule's current value
            group["lr"] = state["optim"]["param_groups"][0]["lr"]
        for s in inner.state.values():
            if "step" in s:
                s["step"] = torch.tensor(step, device=s["step"].device) if torch.is_tensor(s["step"]) else step
