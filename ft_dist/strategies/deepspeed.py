"""DeepSpeed ZeRO stages 1/2/3, with optimizer and parameter offload to CPU or NVMe.

ZeRO-3 builds the model under `zero.Init` (transformers does so while an HfDeepSpeedConfig is alive), so each
parameter is partitioned as soon as it is created and the full model never exists on one rank. The optimizer is
torch's AdamW handed to the engine (no JIT-compiled fused op needed, and resume is bitwise); on GPUs with CPU
offload DeepSpeed's CPUAdam is used because torch's AdamW on the host would be the bottleneck.
"""

from __future__ import annotations

import contextlib
import os
import resource
from typing import Any, ContextManager, Dict, Optional

import torch
from torch import nn

from ft_dist import dist
from ft_dist.strategies.base import ModelFactory, OptimizerFactory, Strategy, replica_from_state


def current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def deepspeed_config(cfg: Any, world_size: int, on_gpu: bool) -> Dict[str, Any]:
    """The DeepSpeed JSON config equivalent to our strategy/train settings."""
    sc, tc = cfg.strategy, cfg.train
    zero: Dict[str, Any] = {"stage": sc.zero_stage}
    for key, where in (("offload_optimizer", sc.offload_optimizer), ("offload_param", sc.offload_params)):
        if where != "none":
            zero[key] = {"device": where, "pin_memory": on_gpu, **({"nvme_path": sc.nvme_path} if where == "nvme" else {})}
    if sc.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
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

    def setup(self, build_model: ModelFactory, build_optimizer: Optional[OptimizerFactory]) -> None:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        self.build_model = build_model
        on_gpu = self.world.device.type == "cuda"
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")  # reuses our process group
        self.ds_config = deepspeed_config(self.cfg, self.world.size, on_gpu)
        stage3 = self.cfg.strategy.zero_stage == 3
        # While this object lives, transformers builds models under zero.Init (partitioned at creation).
        hf_ds = HfDeepSpeedConfig(self.ds_config) if stage3 else None
        rss_before = current_rss_mb()
        model = build_model(meta=False)
        build_growth = peak_rss_mb() - rss_before
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = None
        if build_optimizer is not None:
            if on_gpu and self.cfg.strategy.offload_optimizer != "none" and self.cfg.train.optimizer == "adamw":
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                tc = self.cfg.train
                optimizer = DeepSpeedCPUAdam(params, lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps,
                                             weight_decay=tc.weight_decay)
            else:
                optimizer = build_optimizer(params)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params,
                                                    config=self.ds_config)
        del hf_ds  # later model builds (eval replicas) must not be partitioned
        if stage3:  # show that no rank ever held the whole model
            params = list(self.engine.module.parameters())
            local = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params) / 2**20
            full = sum(p.ds_numel * p.ds_tensor.element_size() for p in params) / 2**20
            dist.log(f"zero3: parameters partitioned at creation: this rank holds {local:.1f} MB of {full:.1f} MB of "
                     f"parameters; peak RSS grew {build_growth:.1f} MB while building")
        self.model = self.engine
        if optimizer is not None:
            self.optimizer = optimizer  # the inner torch optimizer: the LR schedule acts on its param_groups

    def autocast(self) -> ContextManager[None]:
        return contextlib.nullcontext()  # DeepSpeed holds bf16/fp16 parameters itself

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        # The loop already divided by the global token count; DeepSpeed must not divide by accumulation again.
        self.engine.backward(loss, scale_wrt_gas=False)
        if not sync:
            self.engine.step()  # a micro-step: DeepSpeed only counts it, the real step comes at the boundary

    def step(self, max_grad_norm: float) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def unwrapped(self) -> nn.Module:
        return self.engine.module

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        module = self.engine.module
        if self.cfg.strategy.zero_stage < 3:
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    def checkpoint_state(self) -> Dict[str, Any]:
        """The same name-keyed layout as torch's get_state_dict, gathered from ZeRO's partitions param by param.

        Full fp32 master weights and AdamW moments, so the checkpoint loads at any world size and ZeRO stage (and
        under DDP/FSDP2). Each rank holds the gathered copy in host memory; for checkpoints of tens of billions of
        parameters prefer FSDP2, whose DCP checkpoints stay sharded.
        """
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self._prime_optimizer_state()
        module = self.engine.module
        names = {id(p): n for n, p in module.named_parameters()}
        model_sd = {}
        for name, tensor in module.state_dict().items():  # buffers and frozen weights as they are
            model_sd[name] = tensor.detach().cpu().clone() if tensor.numel() else tensor
        state, params = {}, []
        for p in module.parameters():
            name = names[id(p)]
            if not p.requires_grad:
                if self.cfg.strategy.zero_stage == 3:
                    import deepspeed

                    with deepspeed.zero.GatheredParameters([p]):
                        model_sd[name] = p.detach().cpu().clone()
                continue
            model_sd[name] = safe_get_full_fp32_param(p).detach().cpu()
            state[name] = {"step": torch.tensor(float(self._optimizer_steps())),
                           "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").detach().cpu(),
                           "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").detach().cpu()}
            params.append(name)
        group = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
        return {"model": model_sd, "optim": {"state": state, "param_groups": [{**group, "params": params}]}}

    def _prime_optimizer_state(self) -> None:
        """Create zero AdamW moments before the first step (torch creates them lazily), so a checkpoint can be
        read into them and DeepSpeed's name-to-partition links (hp mappings) point at real tensors."""
        zero = self.engine.optimizer
        inner = getattr(zero, "optimizer", None)
        if inner is None:
            return
        # The fp32 partitions AdamW steps on: ZeRO-3 attaches them to the param groups only inside step().
        flat = list(getattr(zero, "fp32_partitioned_groups_flat", None) or getattr(zero, "single_partition_of_fp32_groups", None)
                    or [p for group in inner.param_groups for p in group["params"]])
        missing = [p for p in flat if "exp_avg" not in inner.state.get(p, {})]
        if not missing:
            return
        for p in missing:  # keep whatever DeepSpeed already put there (e.g. swap bookkeeping)
            inner.state[p] = {**inner.state.get(p, {}), "step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": torch.zeros_like(p)}
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def _optimizer_steps(self) -> int:
        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        steps = [float(s["step"]) for s in inner.state.values() if "step" in s]
        return int(max(steps)) if steps else 0

    def load_checkpoint_state(self, state: Dict[str, Any]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self._prime_optimizer_state()
        module = self.engine.module
        optim = state["optim"]["state"]
        import deepspeed

        stage3 = self.cfg.strategy.zero_stage == 3
        for name, p in module.named_parameters():
            value = state["model"][name]
            # The module's (low-precision) weights are refreshed from the fp32 master copy only after a step, so
            # they are set too: else the first resumed forward would see the initial weights.
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0) if stage3 else contextlib.nullcontext():
                if not stage3 or self.world.is_main:
                    p.data.copy_(value.to(p.dtype))
            if not p.requires_grad:
                continue
            safe_set_full_fp32_param(p, value)
            safe_set_full_optimizer_state(p, optim[name]["exp_avg"], "exp_avg")
            safe_set_full_optimizer_state(p, optim[name]["exp_avg_sq"], "exp_avg_sq")
        # ZeRO flattens parameters into a few groups; all were stepped together, so one count restores them.
        step = max((float(s["step"]) for s in optim.values()), default=0.0)
        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        for group in inner.param_groups:  # the LR schedule's current value
            group["lr"] = state["optim"]["param_groups"][0]["lr"]
        for s in inner.state.values():
            if "step" in s:
                s["step"] = torch.tensor(step) if torch.is_tensor(s["step"]) else step

    def inference_model(self) -> nn.Module:
        if self.cfg.strategy.zero_stage < 3:
            return self.unwrapped()
        return replica_from_state(self.build_model, self.full_state_dict(), self.world.device)
