"""Helpers for multi-process tests: a saved tiny model and real torchrun launches on CPU/gloo."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch

from conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_tiny_model(path: Path, hidden: int = 64, layers: int = 2) -> Path:
    """A from-config tiny Llama saved as a pretrained dir, so every strategy loads identical weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ft_dist.models import build_char_tokenizer

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def env(extra: Dict[str, str] | None = None) -> Dict[str, str]:
    e = {**os.environ, "FT_DIST_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    e.pop("WORLD_SIZE", None)
    e.pop("MASTER_ADDR", None)
    return {**e, **(extra or {})}


TRAIN = REPO / "launch" / "train.py"

_HOOKED_TRAIN = """
import runpy, sys
sys.path.insert(0, {repo!r})
from ft_dist import hooks

{hooks}

sys.argv = [{train!r}, *sys.argv[1:]]
runpy.run_path({train!r}, run_name="__main__")
"""


def hooked_train_script(directory: Path, hook_source: str, name: str = "hooked_train.py") -> Path:
    """launch/train.py run after `hook_source` installed its hooks (ft_dist/hooks.py) in the worker process itself.

    `hook_source` is Python that calls `hooks.install(point, fn)`; the script takes the same arguments as train.py.
    """
    script = Path(directory) / name
    script.write_text(_HOOKED_TRAIN.format(repo=str(REPO), train=str(TRAIN), hooks=hook_source))
    return script


def hooks_in_every_python(directory: Path, hook_source: str) -> Dict[str, str]:
    """Environment that installs `hook_source`'s hooks in every Python process started with it, through Python's
    own `sitecustomize` on PYTHONPATH: for jobs a launcher starts (ft-launch --run), where no script of the test's
    can stand in for launch/train.py."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / "sitecustomize.py").write_text(f"from ft_dist import hooks\n\n{hook_source}\n")
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(directory), os.environ.get("PYTHONPATH", "")) if p)}


# Each rank's view of the final weights as they stream past (sum and norm per tensor), written per rank, so a test
# can check that every rank gathered the same model.
PARAM_DIGEST_HOOKS = """
import json
from pathlib import Path

_digest = {}

def _record(unit, rank, out_dir):
    _digest.update({k: [float(v.double().sum()), float(v.double().norm())] for k, v in unit.items()})

def _write(rank, out_dir):
    (Path(out_dir) / f"param_digest.rank{rank}.json").write_text(json.dumps(_digest, sort_keys=True))

hooks.install("final_unit", _record)
hooks.install("final_units_done", _write)
"""


def torchrun(args: Sequence[str], nproc: int = 2, extra_env: Dict[str, str] | None = None, timeout: float = 600,
             launcher: Sequence[str] | None = None, script: Path = TRAIN) -> subprocess.CompletedProcess:
    cmd = list(launcher or [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                            "--master_port", str(free_port())])
    return subprocess.run([*cmd, str(script), *args], cwd=REPO, env=env(extra_env),
                          capture_output=True, text=True, timeout=timeout)


def single(args: Sequence[str], extra_env: Dict[str, str] | None = None, timeout: float = 600,
           script: Path = TRAIN) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=env(extra_env),
                          capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path) -> List[float]:
    return [m["loss"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def final_weights(run_dir: Path, sub: str = "final") -> Dict[str, torch.Tensor]:
    """Every tensor of a saved HF model dir, one file or sharded with an index."""
    from safetensors.torch import load_file

    out: Dict[str, torch.Tensor] = {}
    for f in sorted((run_dir / sub).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_weights(a: Path, b: Path, exact: bool = False, rtol: float = 1e-4, atol: float = 2e-5,
                        sub: str = "final") -> None:
    """The two runs' saved models have the same tensors: bitwise (`exact`) or to rtol/atol."""
    wa, wb = final_weights(a, sub), final_weights(b, sub)
    assert wa.keys() == wb.keys()
    for k in wa:
        if exact:
            assert torch.equal(wa[k], wb[k]), k
        else:
            torch.testing.assert_close(wa[k], wb[k], rtol=rtol, atol=atol, msg=k)


def assert_readable_by_others(root: Path) -> None:
    """Every directory and file under `root` has a plain mkdir's / open's mode under this process's umask (which
    the commands inherited), not the 0700 / 0600 of a temp dir: teammates and serving jobs must read the model."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == want, f"{path}: {oct(stat.S_IMODE(path.stat().st_mode))}"


def wait_for(predicate: Callable[[], bool], timeout: float = 180.0, what: str = "") -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def logged_steps(run: Path) -> int:
    f = run / "metrics.jsonl"
    return sum(1 for line in f.read_text().splitlines() if '"loss"' in line) if f.exists() else 0


def resumes(run_dir: Path) -> List[dict]:
    """The `{"event": "resume", "step", "saved_world_size", "world_size", ...}` records of a run's metrics.jsonl."""
    records = map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
    return [r for r in records if r.get("event") == "resume"]


def resumed_at(run_dir: Path) -> int | None:
    """The step the run's last attempt resumed from (None: it started fresh)."""
    events = resumes(run_dir)
    return events[-1]["step"] if events else None


def digests(run_dir: Path) -> List[dict]:
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("param_digest.rank*.json"))]


class RssSampler:
    """Samples the resident set of a process tree from outside (every `interval` s) and keeps each process's peak.

    Independent of what the processes report about themselves, so the same measurement applies to any version of
    the code. A process's peak is the largest VmRSS seen; spikes shorter than the interval can be missed, but the
    allocations that matter here (hundreds of MB and more) take longer than that to fill.
    """

    def __init__(self, root_pid: int, interval: float = 0.02):
        import threading

        self.root, self.interval = root_pid, interval
        self.peaks: Dict[int, int] = {}
        self.cmdlines: Dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> List[int]:
        out, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            out.append(pid)
            if self._is_worker(pid):
                continue  # its own children (forks for subprocess calls) share its pages: not separate ranks
            try:
                tasks = os.listdir(f"/proc/{pid}/task")
            except OSError:  # exited
                continue
            for task in tasks:
                try:
                    with open(f"/proc/{pid}/task/{task}/children") as fh:
                        todo += [int(c) for c in fh.read().split()]
                except OSError:  # that thread exited meanwhile
                    pass
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self._tree():
                try:
                    with open(f"/proc/{pid}/status") as fh:
                        rss = next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmRSS:"))
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:  # every time: a fresh fork shows its parent's
                        self.cmdlines[pid] = fh.read().replace(b"\0", b" ").decode(errors="replace")
                except (OSError, StopIteration):
                    continue
                self.peaks[pid] = max(self.peaks.get(pid, 0), rss)
            time.sleep(self.interval)

    def _is_worker(self, pid: int) -> bool:
        cmd = self.cmdlines.get(pid, "")
        return "launch/" in cmd and "torch.distributed.run" not in cmd

    def stop(self) -> Dict[int, int]:
        """Peaks of the processes that ran the training script (torchrun's workers, or the single process)."""
        self._stop.set()
        self._thread.join()
        return {pid: peak for pid, peak in self.peaks.items() if self._is_worker(pid)}
