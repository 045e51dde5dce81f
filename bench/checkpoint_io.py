"""Save and resume time, and size on disk, of a checkpoint of a 70M-parameter model (Pythia-70m architecture
from config, random init, the real GPT-NeoX tokenizer) for each strategy, on CPU, in one invocation.

    python bench/checkpoint_io.py [--strategies single ddp fsdp zero2 zero3]

The baseline is the single-process save; ratios compare each strategy's save time with it.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from _runs import ASSETS, dir_size_mb, launch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategies", nargs="+", default=["single", "ddp", "fsdp", "zero2", "zero3"])
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ft-bench-ckpt-"))
    common = ["model=pythia-70m", "model.from_config=true", f"model.tokenizer={ASSETS / 'tokenizers' / 'gpt-neox-20b'}",
              "data=lamini", f"data.path={ASSETS / 'datasets' / 'lamini_docs.jsonl'}", "data.max_seq_len=128",
              f"data.cache_dir={work / 'cache'}", "train.max_steps=2", "train.save_every=1", "train.keep_checkpoints=1",
              "train.eval_every=0", "eval.before_training=false", "eval.max_examples=1", "eval.max_new_tokens=1",
              "train.micro_batch_size=2", "train.grad_accum=1", "train.lr=1e-4"]
    rows = []
    for strategy in args.strategies:
        out = work / strategy
        nproc = 0 if strategy == "single" else 2
        extra = ["train.micro_batch_size=4"] if strategy == "single" else [f"strategy={strategy}"]
        first = launch([*common, f"output_dir={out}", "train.max_steps=1", *extra], nproc=nproc, threads=2 if nproc == 0 else 1)
        save_s = float(re.findall(r"checkpoint: \S+ \(([\d.]+) s\)", first)[-1])
        size = dir_size_mb(next((out / "checkpoints").glob("step-*")))
        second = launch([*common, f"output_dir={out}", "train.resume_ignore_config=true", *extra], nproc=nproc, threads=2 if nproc == 0 else 1)
        resume_s = float(re.search(r"resumed from .*; ([\d.]+) s\)", second).group(1))
        rows.append((strategy, save_s, resume_s, size))
    base = rows[0][1]
    print("Pythia-70m architecture (70.4M parameters, fp32 + AdamW), CPU")
    print(f"{'strategy':<10}{'save s':>9}{'resume s':>10}{'size MB':>10}{'save vs ' + rows[0][0]:>16}")
    for strategy, save_s, resume_s, size in rows:
        print(f"{strategy:<10}{save_s:>9.2f}{resume_s:>10.2f}{size:>10.0f}{save_s / base:>16.2f}")


if __name__ == "__main__":
    main()
