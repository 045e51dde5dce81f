"""Preparation throughput (examples/s) and peak RSS at several dataset sizes: memory must not grow with size.

Each size runs in a fresh process (peak RSS is per process): it writes N synthetic question/answer lines to a
temporary JSONL, then runs the real pipeline (read, filter, dedup, split, tokenize with the GPT-NeoX tokenizer,
pack) into a temporary cache. Usage: python bench/data_prep.py 10000 100000 [1000000] [--num-proc 2]

`--limit-mib M` runs each size inside a memory cgroup capped at M MiB (cgroup v1 memory controller; needs root).
The cap counts heap and page cache alike, so a run that finishes under it shows that nothing grows with size:
the file-backed pages of the memory-mapped Arrow files are reclaimed, the heap is not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
NEOX = Path(os.environ.get("FT_DIST_ASSETS", REPO.parent / "shared" / "assets")) / "tokenizers" / "gpt-neox-20b"
WORDS = "model data train batch token layer loss rate step cache node rank shard tensor graph memory speed".split()


def write_synthetic(path: Path, n: int) -> None:
    import random

    rng = random.Random(0)
    with path.open("w") as fh:
        for i in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 25)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
            fh.write(json.dumps({"question": f"{i}: {q}?", "answer": a}) + "\n")


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def one(n: int, num_proc: int) -> dict:
    import threading

    sys.path.insert(0, str(REPO))
    from omegaconf import OmegaConf

    from ft_dist.data.prepare import prepare_dataset
    from ft_dist.data.schema import DataConfig
    from ft_dist.models import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.jsonl"
        write_synthetic(path, n)
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tok = load_tokenizer(OmegaConf.create({"tokenizer": str(NEOX), "name_or_path": None, "trust_remote_code": False}))
        cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {
            "name": "synthetic", "path": str(path), "cache_dir": str(Path(tmp) / "cache"), "test_size": 1000,
            "max_seq_len": 512, "packing": True, "num_proc": num_proc})
        # ru_maxrss also counts pages of the memory-mapped Arrow files read (file-backed, reclaimable); sample the
        # anonymous part (heap: what actually has to fit in memory) separately.
        peak_anon, done = [0], threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak_anon[0] = max(peak_anon[0], _rss_kib("RssAnon"))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        data = prepare_dataset(cfg, tok)
        seconds = time.perf_counter() - start
        done.set()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        return {"examples": n, "seconds": round(seconds, 1), "examples_per_s": round(n / seconds),
                "peak_rss_mib": round(peak / 1024), "peak_anon_rss_mib": round(peak_anon[0] / 1024), "rss_before_prepare_mib": round(base_rss / 1024),
                "worker_peak_rss_mib": round(children / 1024), "packing_efficiency": data.stats["packing"]["efficiency"],
                "train": data.stats["train"]}


@contextlib.contextmanager
def memory_cgroup(limit_mib: int | None) -> Iterator[Callable[[], None] | None]:
    """A `preexec_fn` that moves the child into a fresh memory cgroup capped at limit_mib (None: no cap)."""
    if limit_mib is None:
        yield None
        return
    group = Path(f"/sys/fs/cgroup/memory/ft-dist-bench-{os.getpid()}")
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit_mib << 20))
        (group / "memory.memsw.limit_in_bytes").write_text(str(limit_mib << 20))  # no escape into swap
        yield lambda: (group / "cgroup.procs").write_text(str(os.getpid()))
    finally:
        group.rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[10_000, 100_000])
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--limit-mib", type=int, help="cap each run's memory (heap + page cache) in a cgroup")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.num_proc)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"{'examples':>10} {'seconds':>8} {'ex/s':>8} {'peak RSS MiB':>13} {'anon MiB':>9} {'anon/first':>10} "
          f"{'(before prep)':>14} {'workers MiB':>12}")
    first_anon = None
    for n in args.sizes:
        with memory_cgroup(args.limit_mib) as enter:
            out = subprocess.run([sys.executable, __file__, "--one", str(n), "--num-proc", str(args.num_proc)], env=env,
                                 capture_output=True, text=True, preexec_fn=enter)
        if out.returncode != 0:  # e.g. killed by the cgroup's OOM killer (-9)
            sys.exit(f"{n} examples: exit {out.returncode}\n{out.stderr[-2000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        first_anon = first_anon or r["peak_anon_rss_mib"]  # the baseline: the smallest size, same invocation
        print(f"{r['examples']:>10} {r['seconds']:>8} {r['examples_per_s']:>8} {r['peak_rss_mib']:>13} {r['peak_anon_rss_mib']:>9} "
              f"{r['peak_anon_rss_mib'] / first_anon:>10.2f} {r['rss_before_prepare_mib']:>14} {r['worker_peak_rss_mib']:>12}",
              flush=True)


if __name__ == "__main__":
    main()
