"""Per-step time of every strategy against one process on the same CPU work, and DDP 2-process vs 1-process
throughput, measured in one invocation.

    python bench/strategies.py [--steps 30] [--hidden 256] [--layers 4]

Same model, data, global batch (16) and sequence length for every arm. The single-process baseline runs with
as many threads as there are cores; each of the 2 ranks gets one thread (as torchrun sets), so both use the
whole machine. Ratios > 1 mean slower than the baseline.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _runs import launch, metrics, seconds_per_step

STRATEGIES = ["ddp", "fsdp", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="threads of the single-process baseline")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ft-bench-strategies-"))
    common = [f"train.max_steps={args.steps}", "train.log_every=1", "train.eval_every=0", "eval.before_training=false",
              "eval.max_examples=2", "eval.max_new_tokens=2", f"data.cache_dir={work / 'cache'}", "data.limit=2000",
              f"model.arch.hidden_size={args.hidden}", f"model.arch.intermediate_size={4 * args.hidden}",
              f"model.arch.num_hidden_layers={args.layers}", "train.save_every=0"]
    skip = max(3, args.steps // 5)
    base_dir = work / "single"
    launch([*common, f"output_dir={base_dir}", "train.micro_batch_size=8", "train.grad_accum=2"], threads=args.threads)
    base = seconds_per_step(base_dir, skip)
    base_tps = sum(m["tokens_per_s"] for m in metrics(base_dir)[skip:] if "tokens_per_s" in m)
    print(f"model: llama {args.layers}x{args.hidden}, global batch 16, {args.steps} steps (first {skip} excluded)")
    print(f"{'strategy':<16}{'s/step':>10}{'vs single':>12}")
    print(f"{'single':<16}{base:>10.3f}{1.0:>12.2f}")
    for strategy in STRATEGIES:
        out = work / strategy
        launch([*common, f"output_dir={out}", f"strategy={strategy}", "train.micro_batch_size=4", "train.grad_accum=2"], nproc=2)
        t = seconds_per_step(out, skip)
        print(f"{strategy:<16}{t:>10.3f}{t / base:>12.2f}", flush=True)
        if strategy == "ddp":
            ddp_tps = sum(m["tokens_per_s"] for m in metrics(out)[skip:] if "tokens_per_s" in m)
            ddp_ratio = ddp_tps / base_tps
    print(f"\nDDP 2 processes vs 1 process: throughput ratio {ddp_ratio:.2f} (tokens/s, same global batch)")


if __name__ == "__main__":
    main()
