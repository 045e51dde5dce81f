"""The instance catalog: GPUs, memory, peak FLOP/s, bandwidths, host RAM and prices, read from catalog.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import yaml

from ft_dist.errors import ConfigError

CATALOG_PATH = Path(__file__).with_name("catalog.yaml")


@dataclass(frozen=True)
class Instance:
    name: str
    gpu: str
    gpus: int
    gpu_memory_gb: float
    device_gib: float
    """What the driver reports as the GPU's total memory: what a plan must fit."""
    peak_tflops: Dict[str, float]
    precisions: Tuple[str, ...]
    generation: str
    nvlink_gb_per_s: float
    network_gb_per_s: float
    host_ram_gb: float
    usd_per_hour: float
    price_date: str
    price_source: str

    def peak_flops(self, precision: str) -> float:
        """Dense peak FLOP/s per GPU for the precision the matmuls run in."""
        key = "fp32" if precision == "fp32" else ("fp16" if precision == "fp16" else "bf16")
        return self.peak_tflops.get(key, self.peak_tflops.get("fp16", 0.0)) * 1e12


@dataclass(frozen=True)
class Catalog:
    instances: Dict[str, Instance]
    mfu: Dict[str, float]
    gpus: Dict[str, Dict[str, Any]]
    """The GPU models by catalog name (memory_gb, peak_tflops, ...): also what a run's MFU divides by."""


@lru_cache(maxsize=4)
def load_catalog(path: Optional[str] = None) -> Catalog:
    """Read catalog.yaml (or another file with the same layout)."""
    raw = yaml.safe_load(Path(path or CATALOG_PATH).read_text())
    gpus = raw["gpus"]
    instances = {}
    for name, row in raw["instances"].items():
        gpu = gpus[row["gpu"]]
        instances[name] = Instance(
            name=name,
            gpu=row["gpu"],
            gpus=row["gpus"],
            gpu_memory_gb=gpu["memory_gb"],
            device_gib=gpu.get("device_gib", gpu["memory_gb"]),
            peak_tflops=dict(gpu["peak_tflops"]),
            precisions=tuple(gpu["precisions"]),
            generation=gpu["generation"],
            nvlink_gb_per_s=row["nvlink_gb_per_s"],
            network_gb_per_s=row["network_gb_per_s"],
            host_ram_gb=row["host_ram_gb"],
            usd_per_hour=row["usd_per_hour"],
            price_date=str(row["price_date"]),
            price_source=row["price_source"],
        )
    return Catalog(instances=instances, mfu=dict(raw["mfu"]), gpus=dict(gpus))


def instance(name: str, catalog: Optional[Catalog] = None) -> Instance:
    catalog = catalog or load_catalog()
    if name not in catalog.instances:
        raise ConfigError(
            "plan.instance",
            f"{name!r} is not in the catalog; expected one of "
            f"{', '.join(catalog.instances)} (edit {CATALOG_PATH.name} to add one)",
        )
    return catalog.instances[name]
