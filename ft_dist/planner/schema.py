"""Config schema of `ft-plan` (stub: the planner issue fills this in)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from ft_dist.config import ModelConfig


@dataclass
class PlanConfig:
    tokens: float = 0.0


@dataclass
class PlanRunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


def register(cs: ConfigStore) -> None:
    cs.store(name="plan_schema", node=PlanRunConfig)


def validate_plan(cfg: Any) -> None:
    """Value checks beyond types; raise ft_dist.errors.ConfigError naming the key."""
