"""Memory per rank at scale, in one run: real processes on this CPU, then dry runs of 7B, 13B and 70B jobs.

    python bench/scale.py [--strategies fsdp zero3] [--ranks 4] [--dry-only | --real-only] [--dry-zero3]
    python bench/scale.py --real-only --device cuda --ranks 8     # on a GPU node: device memory per phase

1. Real processes (a 405M-parameter Llama from config, saved as bf16 safetensors; the phases of tests/test_scale.py):
   every phase's peak RSS per rank, for each sharded strategy on `--ranks` ranks and for the baseline measured in
   the same invocation, DDP on 2 ranks (a whole replica per rank). Printed as ratios to the baseline's peak in the
   same phase and to the full model's fp32 states (weights + gradients + Adam, 16 bytes per parameter).
2. Dry runs (one CPU process each: the real config and strategy code on fake tensors and a fake process group):
   llama-2-7b on 8 ranks, llama-2-13b on 16, llama-2-70b on 64, FSDP2 (and ZeRO-3 with --dry-zero3), bf16,
   micro-batch 1 x 2048 tokens; per-rank peaks beside the planner's figures.
Peaks of part 1 are host RSS (the CPU is the device); MALLOC_MMAP_THRESHOLD_ is fixed so freed tensors leave RSS.
With --device cuda they are torch.cuda's peak allocated bytes per phase (memory.json), against the same bounds with
no host baseline: the GPU check of the CPU figures. It has not been run yet (no GPU was available); run it on one
node with --ranks = its GPU count.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from dist_utils import RssSampler, env, free_port  # noqa: E402
from scale_bounds import GIB, phase_bounds  # noqa: E402
import test_scale as scale  # noqa: E402

DRY = [("llama-2-7b", 8), ("llama-2-13b", 16), ("llama-2-70b", 64)]


def real_run(strategy: str, ranks: int, model: Path, work: Path, device: str = "cpu") -> Dict[str, int]:
    """Largest per-rank peak of each phase, from the run's memory.json; and the sampled peak as 'sampled'."""
    out = work / f"{strategy}-{ranks}"
    extra = [f"strategy={strategy}", f"device={device}"]
    key = "host_peak" if device == "cpu" else "device_allocated_peak"
    if ranks == 2:
        extra.append("train.grad_accum=2")  # the same global batch (4) as on 4 ranks
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(free_port()), str(REPO / "launch" / "train.py"), *scale.args(model, work / "cache", out, *extra)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env({"MALLOC_MMAP_THRESHOLD_": "131072"}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    sampler = RssSampler(proc.pid)
    _, err = proc.communicate()
    sampled = sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{strategy} on {ranks} ranks failed:\n{err[-3000:]}")
    ranks_rec = json.loads((out / "memory.json").read_text())["ranks"]
    peaks = {ph: max(r["phases"][ph][key] for r in ranks_rec if ph in r["phases"])
             for ph in ranks_rec[0]["phases"]}
    peaks["sampled"] = max(sampled.values())
    peaks["baseline"] = max(r["baseline"] for r in ranks_rec) if device == "cpu" else 0
    return peaks


def part_real(strategies: List[str], ranks: int, device: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="ft-bench-scale-"))
    model = work / "model"
    subprocess.run([sys.executable, "-c", scale.SAVE_MODEL, str(model)], check=True, env=env())
    full = scale.JOB.full_states
    print(f"model: {scale.JOB.params:,} parameters; full fp32 states (weights + grads + Adam) {full / GIB:.2f} GiB")
    t = time.time()
    base = real_run("ddp", 2, model, work, device)
    print(f"baseline: DDP on 2 ranks ({time.time() - t:.0f} s)")
    results = {}
    for strategy in strategies:
        t = time.time()
        results[strategy] = real_run(strategy, ranks, model, work, device)
        print(f"{strategy} on {ranks} ranks ({time.time() - t:.0f} s)")
    print(f"\n{'phase':<13}{'DDP GiB':>9}" + "".join(f"{s + ' GiB':>12}{'/DDP':>7}{'/full':>7}{'bound':>8}" for s in strategies))
    for phase in [p for p in base if p not in ("baseline",)]:
        row = f"{phase:<13}{base[phase] / GIB:>9.2f}"
        for s in strategies:
            got = results[s].get(phase)
            bound = phase_bounds(s, scale.JOB, ranks, results[s]["baseline"]).get(phase)
            row += (f"{got / GIB:>12.2f}{got / base[phase]:>7.2f}{got / full:>7.2f}"
                    f"{(bound / GIB if bound else float('nan')):>8.2f}") if got else f"{'-':>34}"
        print(row)
    print("(sampled: each rank's RSS read from outside every 20 ms; the others: the kernel's high-water mark per "
          "phase, memory.json)")


def part_dry(zero3: bool) -> None:
    strategies = ["fsdp"] + (["zero3"] if zero3 else [])
    print(f"\n{'job':<22}{'ranks':>6}{'states GiB':>11}{'planner':>9}{'diff':>8}{'step peak':>10}{'planner':>9}"
          f"{'act GiB':>9}{'planner':>9}{'seconds':>9}")
    for strategy in strategies:
        for model, ranks in DRY:
            out = Path(tempfile.mkdtemp(prefix="ft-dry-"))
            proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), f"model={model}",
                                   f"strategy={strategy}", f"dry_run.world_size={ranks}", "train.precision=bf16",
                                   "train.micro_batch_size=1", "data.max_seq_len=2048", f"output_dir={out}"],
                                  cwd=REPO, env=env(), capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{model} {strategy}: failed: {proc.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads((out / "dry_run.json").read_text())
            pl, tp = r["planner"], r["train_peak"]
            states = sum(r["model_states"].values())
            acts = tp.get("Activation", 0) + tp.get("Temp", 0)
            print(f"{model + ' ' + strategy:<22}{ranks:>6}{states / GIB:>11.2f}{pl['model_states'] / GIB:>9.2f}"
                  f"{100 * pl['model_states_vs_measured']:>+7.1f}%{tp['Total'] / GIB:>10.2f}"
                  f"{pl['peak_tensors'] / GIB:>9.2f}{acts / GIB:>9.2f}{pl['activations_at_peak'] / GIB:>9.2f}"
                  f"{r['seconds']:>9.0f}")
    print("(dry runs: fake tensors and a fake process group, rank 0's view; planner: ft-plan's tensor figure for the "
          "same config without the GPU-only terms)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategies", nargs="+", default=["fsdp", "zero3"])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--dry-only", action="store_true")
    ap.add_argument("--real-only", action="store_true")
    ap.add_argument("--dry-zero3", action="store_true", help="also dry-run ZeRO-3 (slower: module-by-module hooks)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = ap.parse_args()
    if not a.dry_only:
        part_real(a.strategies, a.ranks, a.device)
    if not a.real_only:
        part_dry(a.dry_zero3)


if __name__ == "__main__":
    main()
