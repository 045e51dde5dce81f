"""Parallelism strategies behind one protocol (see base.py). `build_strategy` picks one from `strategy.name`."""

from __future__ import annotations

from typing import Any

from ft_dist.dist import World
from ft_dist.errors import ConfigError
from ft_dist.strategies.base import Strategy


def build_strategy(cfg: Any, world: World) -> Strategy:
    name = cfg.strategy.name
    if name == "single":
        if world.distributed:
            raise ConfigError("strategy", f"single runs one process, but WORLD_SIZE={world.size}; choose strategy=ddp, fsdp or a zero stage")
        from ft_dist.strategies.single import SingleDevice

        return SingleDevice(cfg, world)
    raise ConfigError("strategy.name", f"strategy {name!r} is not available in this build; expected single")
