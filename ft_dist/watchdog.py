"""Hang watchdog: a stalled rank is named, every rank's stack is dumped, and the job exits so it can restart.

Without it, a rank stuck in a deadlocked collective, a data read or a different collective than its peers holds
the whole job until the wall clock runs out, and nobody can tell which rank it was.

Every rank runs a daemon thread that writes its heartbeat (step, phase, the last progress, the last ft-dist
collective) to `<output_dir>/heartbeat/rank-<r>.json` every `train.heartbeat_s`. A shared directory, not the
process group: it must work while the process group is the thing that hangs, and it stays behind for post-mortems.
Rank 0's thread reads them all and declares a hang when some rank made no progress for `train.hang_timeout_s`.
The stuck ranks are the ones furthest behind; the others are waiting for them. Then:
  1. rank 0 writes `heartbeat/HANG`; every rank's thread sees it and dumps all its threads' Python stacks
     (faulthandler, which needs no cooperation from the stuck main thread) to `heartbeat/stack-rank-<r>.txt`;
  2. rank 0 prints one summary line naming the stuck rank(s), host, pid, step and phase, then their stacks;
  3. every rank exits with EXIT_HANG (86), so torchrun `--max-restarts` or the Slurm script restarts the job
     from the last checkpoint.
Heartbeats carry a token of this attempt (chosen by rank 0), so a restarted job never reads the dead one's files.
On GPUs, NCCL's flight recorder (TORCH_NCCL_TRACE_BUFFER_SIZE, TORCH_NCCL_DUMP_ON_TIMEOUT in conf/cluster/)
records the collectives themselves.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

from ft_dist import EXIT_HANG, dist

HANG_FILE = "HANG"


class Watchdog:
    """Heartbeats of this rank and, on rank 0, the hang detector. `progress()` marks where the rank is."""

    def __init__(self, out_dir: Path, world: dist.World, timeout_s: float, interval_s: float):
        self.dir = out_dir / "heartbeat"
        self.world, self.timeout, self.interval = world, timeout_s, interval_s
        if world.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
        # One token per attempt: a restarted job ignores the heartbeats and HANG file of the dead one.
        self.token = dist.broadcast_object(uuid.uuid4().hex if world.is_main else None)
        self.state: Dict[str, Any] = {
            "rank": world.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self.token,
            "step": 0,
            "phase": "start",
            "seq": 0,
            "since": time.time(),
            "collective": "",
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ft-dist-watchdog", daemon=True)
        self._thread.start()

    def progress(self, phase: str, step: Optional[int] = None) -> None:
        """Called by the loop between units of work: each call is progress (and says where the rank is)."""
        self.state.update(
            phase=phase, seq=self.state["seq"] + 1, since=time.time(), **({"step": step} if step is not None else {})
        )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

    # --- the thread ---------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.state["collective"] = dist.last_collective()
            self._write(f"rank-{self.world.rank}.json", json.dumps({**self.state, "beat": time.time()}))
            hang = self._read_hang()
            if hang is None and self.world.is_main:
                hang = self._detect()
                if hang is not None:
                    self._write(HANG_FILE, json.dumps(hang))
            if hang is not None:
                self._end(hang)

    def _write(self, name: str, text: str) -> None:
        tmp = self.dir / f".{name}.{os.getpid()}"
        try:
            tmp.write_text(text)
            os.replace(tmp, self.dir / name)
        except OSError:
            pass  # a full or flaky disk must not kill a healthy run; the next beat tries again

    def _read_hang(self) -> Optional[Dict[str, Any]]:
        try:
            hang = json.loads((self.dir / HANG_FILE).read_text())
        except (OSError, ValueError):
            return None
        return hang if hang.get("token") == self.token else None

    def _beats(self) -> List[Dict[str, Any]]:
        beats = []
        for r in range(self.world.size):
            try:
                beat = json.loads((self.dir / f"rank-{r}.json").read_text())
            except (OSError, ValueError):
                continue  # not written yet (or being replaced)
            if beat.get("token") == self.token:
                beats.append(beat)
        return beats

    def _detect(self) -> Optional[Dict[str, Any]]:
        """A hang when any rank made no progress for the timeout.

        Not "ranks far apart in steps": heartbeats are sampled every heartbeat_s, so between two beats a healthy
        rank can be many fast steps ahead of what its peer last wrote (seen on a 2-rank FSDP2 LoRA run).
        """
        beats, now = self._beats(), time.time()
        if not beats:
            return None
        stale = [b for b in beats if now - b["since"] > self.timeout or now - b["beat"] > self.timeout]
        if not stale:
            return None
        # Those furthest behind are stuck; the others wait for them in the next collective.
        behind = min(b["seq"] for b in beats)
        stuck = [b for b in beats if b["seq"] == behind]
        silent = [r for r in range(self.world.size) if r not in {b["rank"] for b in beats}]
        return {
            "token": self.token,
            "stuck": stuck,
            "waiting": [b for b in beats if b["seq"] != behind],
            "silent": silent,
            "seconds": round(now - min(b["since"] for b in stuck)),
            "at": now,
        }

    def _end(self, hang: Dict[str, Any]) -> None:
        rank = self.world.rank
        with open(self.dir / f"stack-rank-{rank}.txt", "w") as fh:
            fh.write(
                f"rank {rank} host {self.state['host']} pid {self.state['pid']}: step {self.state['step']}, "
                f"phase {self.state['phase']}, last ft-dist collective {self.state['collective'] or '-'}\n"
            )
            fh.flush()
            faulthandler.dump_traceback(file=fh, all_threads=True)
        self._dump_nccl_trace()
        done = self.dir / f"done-{self.token}"
        if self.world.is_main:
            # Wait (bounded) for every rank's stack, so the summary can show the stuck ranks' own.
            deadline = time.time() + 3 * self.interval + 10
            while time.time() < deadline and not all(
                (self.dir / f"stack-rank-{r}.txt").exists() for r in range(self.world.size)
            ):
                time.sleep(0.2)
            print(summary(hang, self.dir), flush=True)
            for b in hang["stuck"]:
                path = self.dir / f"stack-rank-{b['rank']}.txt"
                if path.exists():
                    print(f"--- stack of rank {b['rank']} ({path}):\n{path.read_text()}", flush=True)
            done.write_text("")
        else:
            # Stay until rank 0 has printed: torchrun ends every rank as soon as one exits.
            deadline = time.time() + 3 * self.interval + 20
            while time.time() < deadline and not done.exists():
                time.sleep(0.2)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_HANG)  # the main thread is stuck: only a hard exit ends the process

    def _dump_nccl_trace(self) -> None:
        """On NCCL, the flight recorder's record of this rank's collectives (TORCH_NCCL_TRACE_BUFFER_SIZE > 0).

        Best effort, through torch's own dump hook (private: what TORCH_NCCL_DUMP_ON_TIMEOUT calls); not run on a
        GPU yet. The process group did not time out (the watchdog fires first), so it is dumped here.
        """
        if self.world.device.type != "cuda" or not os.environ.get("TORCH_NCCL_TRACE_BUFFER_SIZE"):
            return
        try:
            import torch

            trace = torch._C._distributed_c10d._dump_nccl_trace()  # type: ignore[attr-defined]  # private, not in stubs
            (self.dir / f"nccl-trace-rank-{self.world.rank}.pkl").write_bytes(trace)
        except Exception as err:  # a missing or changed private API must not hide the stacks
            print(f"rank {self.world.rank}: no NCCL flight-recorder dump ({err})", file=sys.stderr, flush=True)


def summary(hang: Dict[str, Any], where: Path) -> str:
    """One line: who is stuck, where, for how long, and what the others are doing."""
    stuck = "; ".join(
        f"rank {b['rank']} (host {b['host']}, pid {b['pid']}) at step {b['step']} in {b['phase']}"
        for b in hang["stuck"]
    )
    waiting = sorted({f"{b['phase']} at step {b['step']}" for b in hang["waiting"]})
    others = f"; the other ranks wait in {', '.join(waiting)}" if waiting else "; every rank is stuck there"
    silent = f"; no heartbeat from rank(s) {', '.join(map(str, hang['silent']))}" if hang["silent"] else ""
    return (
        f"hang: no progress for {hang['seconds']} s (train.hang_timeout_s): {stuck}{others}{silent}; stacks in "
        f"{where}/stack-rank-*.txt; exiting {EXIT_HANG} so the job restarts from its last checkpoint"
    )
