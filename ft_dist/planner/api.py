"""The Python API: `plan(arch, ...)` returns the same data `ft-plan plan.format=json` prints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

from ft_dist.planner.catalog import Catalog, load_catalog
from ft_dist.planner.memory import GpuOverhead, estimate_memory
from ft_dist.planner.params import Architecture, architecture, from_meta_build, hf_config
from ft_dist.planner.recommend import Candidate, NaiveRow, SearchSpace, naive_table, recommend
from ft_dist.planner.workload import TrainingSetup


@dataclass
class Plan:
    model: str
    arch: Architecture
    total_tokens: float
    candidates: List[Candidate]
    naive: List[NaiveRow]
    trace: Optional[Dict[str, Any]] = None
    meta_params: Optional[int] = None
    """sum(p.numel()) of the model built on the meta device, when the CLI checked the count."""

    @property
    def best(self) -> Optional[Candidate]:
        return next((c for c in self.candidates if c.fits), None)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "model": self.model,
            "params": self.arch.total_params,
            "params_meta_build": self.meta_params,
            "total_tokens": self.total_tokens,
            "naive": [r.as_dict() for r in self.naive],
            "candidates": [c.as_dict() for c in self.candidates],
            "best": self.best.as_dict() if self.best else None,
            "trace": self.trace,
        }


def apply_trace(arch_dict: Mapping[str, Any], arch: Architecture, base: TrainingSetup, layers: int) -> Dict[str, Any]:
    """Trace mode: measure activations of the real architecture (fake tensors) at the planned micro-batch."""
    from ft_dist.planner.trace import trace_full_depth  # imports torch, which the analytic planner never needs

    measured = trace_full_depth(arch_dict, base.but(device="cpu"), arch.layers, few=layers)
    predicted = estimate_memory(arch, base.but(device="cpu", strategy="single", nodes=1, gpus_per_node=1))
    return {
        "measured_single_process_peak_bytes": measured.total,
        "measured": measured.__dict__,
        "analytic_single_process_peak_bytes": predicted.total,
        "analytic_vs_measured": predicted.total / measured.total - 1,
    }


def plan(
    arch_dict: Mapping[str, Any],
    tokens: float,
    epochs: float = 1.0,
    base: TrainingSetup = TrainingSetup(),
    space: Optional[SearchSpace] = None,
    catalog: Optional[Catalog] = None,
    overhead: GpuOverhead = GpuOverhead(),
    mfu: Optional[Mapping[str, float]] = None,
    model_name: str = "model",
    meta_params: Optional[int] = None,
) -> Plan:
    """Rank every (instance, nodes, strategy) for `tokens` x `epochs` tokens of finetuning."""
    catalog = catalog or load_catalog()
    if mfu:
        catalog = Catalog(catalog.instances, {**catalog.mfu, **mfu}, catalog.gpus)
    space = space or SearchSpace(instances=list(catalog.instances))
    arch = architecture(arch_dict)
    if meta_params is not None and meta_params != arch.total_params:
        # The closed form missed something of this variant (a bias, a norm): read the shapes off the build instead.
        arch = from_meta_build(hf_config(arch_dict))
    total = tokens * epochs
    candidates = recommend(arch, base, catalog, space, total, overhead)
    return Plan(model_name, arch, total, candidates, naive_table(catalog), meta_params=meta_params)
