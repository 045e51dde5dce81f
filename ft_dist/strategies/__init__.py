"""Parallelism strategies behind one protocol (see base.py). `build_strategy` picks one from `strategy.name`."""

from __future__ import annotations

from ft_dist.config import StrategyConfig, TrainConfig, single_needs_one_process
from ft_dist.dist import World
from ft_dist.errors import ConfigError
from ft_dist.strategies.base import Strategy


def build_strategy(cfg: StrategyConfig, train: TrainConfig, world: World) -> Strategy:
    """The strategy `cfg.name` names, given its own config and the schedule (`train`) it runs.

    Each strategy module is imported only when chosen: importing DeepSpeed alone takes seconds and starts its op
    builder checks, which a DDP or FSDP2 run never needs.
    """
    name = cfg.name
    if name == "single":
        if world.distributed:
            raise ConfigError("strategy", single_needs_one_process(world.size))
        from ft_dist.strategies.single import SingleDevice

        return SingleDevice(cfg, train, world)
    if not world.launched:
        raise ConfigError(
            "strategy",
            f"{name} needs several processes; launch with torchrun --nproc_per_node N, or use strategy=single",
        )
    if name == "ddp":
        from ft_dist.strategies.ddp import DDP

        return DDP(cfg, train, world)
    if name == "fsdp":
        from ft_dist.strategies.fsdp import FSDP2

        return FSDP2(cfg, train, world)
    from ft_dist.strategies.deepspeed import DeepSpeedZero

    return DeepSpeedZero(cfg, train, world)
