"""Process-group setup and teardown, rank helpers, and rank-0-only printing.

A single process (no torchrun) runs without a process group, so the same code serves a laptop smoke run and a
many-node job. Everything that must happen on one rank only (printing, W&B, writing shared files) asks `is_main()`.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from ft_dist.errors import ConfigError


@dataclass(frozen=True)
class World:
    """Where this process sits: global rank, local rank on its node, and how many processes there are."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")
    launched: bool = False
    """Started by torchrun/deepspeed/srun (a process group exists, even of size 1)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


_WORLD = World()


def world() -> World:
    return _WORLD


def is_main() -> bool:
    return _WORLD.is_main


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """`auto` takes this rank's GPU when there is one, else the CPU. Asking for cuda without one is a user error."""

    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "expected a CUDA GPU for device=cuda, but torch sees none (use device=cpu)")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init(device: str = "auto", backend: str = "auto", min_timeout_s: float = 0.0) -> World:
    """Join the process group that torchrun/deepspeed/srun described in the environment, if any.

    `min_timeout_s` raises the collective timeout (torch's default: 10 min for NCCL, 30 for gloo) so that the hang
    watchdog, which names the stuck rank, always fires before a collective times out anonymously.
    """
    global _WORLD
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    launched = "MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ
    if launched and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        store = _attempt_store()
        extra: Dict[str, Any] = dict(store=store, rank=rank, world_size=size) if store is not None else {}
        default = 600 if backend == "nccl" else 1800
        if min_timeout_s > default:
            extra["timeout"] = datetime.timedelta(seconds=min_timeout_s)
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None, **extra)
    _WORLD = World(rank=rank, local_rank=local_rank, size=size, device=dev, launched=launched)
    return _WORLD


def _attempt_store() -> Any:
    """Under torchrun, the agent's store with keys scoped to this restart attempt (None: not under torchrun).

    torchrun's agent hosts one TCPStore for the whole job (static and c10d rendezvous alike) and its workers
    connect to it unprefixed, so after `--max-restarts` brings the workers back, the new process group finds the
    dead attempt's keys: gloo then connects to a dead rank's address ("connectFullMesh ... Connection refused")
    or waits forever. Seen on CPU/gloo in about half the restarts under load.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from torch.distributed.constants import default_pg_timeout

    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=default_pg_timeout
    )
    return dist.PrefixStore(f"ft-dist/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


_MESHES: Dict[str, Any] = {}


def device_mesh(device_type: str) -> Any:
    """The 1-D mesh over all ranks (created once). A dry run creates it before entering FakeTensorMode, where mesh
    creation cannot run."""
    if device_type not in _MESHES:
        from torch.distributed.device_mesh import init_device_mesh

        _MESHES[device_type] = init_device_mesh(device_type, (_WORLD.size,))
    return _MESHES[device_type]


def set_world(world: World) -> None:
    """Install `world` (a dry run's simulated rank in a fake process group)."""
    global _WORLD
    _WORLD = world


def close(barrier: bool = True) -> None:
    """Destroy the process group after a barrier, so no rank exits while another still talks to it (no barrier
    when leaving on an error, which the other ranks may never meet)."""
    _MESHES.clear()
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
        # Collect what still references the groups' work and buffers (engine internals) now, while the interpreter is
        # whole: freed during interpreter finalization, a gloo worker thread can abort the process ("terminate called
        # without an active exception", seen once at the end of a ZeRO-2 run in CI; pytorch/pytorch#179291).
        gc.collect()


_LAST_COLLECTIVE: Dict[str, Any] = {"name": "", "count": 0, "at": 0.0}


def _entering(name: str) -> None:
    """Remember the last collective of ft-dist's own this rank entered (the hang watchdog reports it)."""
    _LAST_COLLECTIVE.update(name=name, count=_LAST_COLLECTIVE["count"] + 1, at=time.time())


def last_collective() -> str:
    c = _LAST_COLLECTIVE
    return f"{c['name']} (#{c['count']}, {time.time() - c['at']:.0f} s ago)" if c["count"] else ""


def barrier() -> None:
    if dist.is_initialized():
        _entering("barrier")
        dist.barrier()


def all_reduce_sum(values: List[float]) -> List[float]:
    """Sum a few scalars over all ranks (metrics, token counts); identity in a single process."""
    if not dist.is_initialized():
        return list(values)
    _entering("all_reduce_sum")
    t = torch.tensor(values, dtype=torch.float64, device=_WORLD.device)
    dist.all_reduce(t)
    return t.tolist()


def step_sums(on_device: List[torch.Tensor], on_host: List[float], kept: Optional[torch.Tensor] = None) -> List[float]:
    """A training step's figures summed over all ranks and read on the host in ONE device-to-host copy.

    `on_device` (e.g. the loss) are summed where they are, with no read before the all-reduce; `on_host` (token
    counts, stop/save requests) go up through pinned memory without blocking; `kept` (e.g. the gradient norm, already
    global) rides along unsummed. The `.tolist()` at the end is the step's only host sync.
    """
    device = on_device[0].device
    host = torch.tensor(on_host, dtype=torch.float64)
    if device.type == "cuda":
        host = host.pin_memory()  # a pageable host-to-device copy would wait for the GPU to drain
    t = torch.cat([torch.stack([v.to(torch.float64) for v in on_device]), host.to(device, non_blocking=True)])
    if dist.is_initialized():
        _entering("step_sums")
        dist.all_reduce(t)
    if kept is not None:
        t = torch.cat([t, kept.reshape(1).to(torch.float64)])
    return t.tolist()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value on every rank (e.g. the run directory, which embeds a timestamp)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    _entering("broadcast_object")
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's `obj`, in rank order, on every rank (small picklable values: metrics, memory records)."""
    if not dist.is_initialized():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    _entering("all_gather_objects")
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 does the work inside first (e.g. preparing the data cache); the others wait, then reuse it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


_PREEMPT_SIGNAL: List[int] = []


def install_preemption_handlers() -> None:
    """Remember SIGTERM/SIGUSR1 instead of dying: the loop checks at each step boundary, saves, and exits 85."""

    def remember(signum: int, frame: Any) -> None:
        _PREEMPT_SIGNAL.append(signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, remember)


def preemption_signalled() -> bool:
    """Whether this process got a preemption signal (the loop agrees across ranks with an all-reduce)."""
    return bool(_PREEMPT_SIGNAL)


def preemption_source() -> str:
    """What rank 0 can say about a preemption the ranks agreed on: its own signal, or that another rank got one."""
    if _PREEMPT_SIGNAL:
        return f"{signal.Signals(_PREEMPT_SIGNAL[0]).name} received by rank {world().rank}"
    return "a preemption signal received by another rank"


def log(message: str) -> None:
    """Print on global rank 0 only; never interleaves with a progress bar."""
    if not is_main():
        return
    try:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stdout)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        print(message, flush=True)
