"""ft-train beside a bare torch loop and TRL's SFTTrainer on this CPU: non-pad tokens/s and time per token slot.

Every arm trains the Pythia-70m architecture built from config (seed 42, so the same initial weights) on lamini_docs
with the GPT-NeoX tokenizer, micro-batch 8, sequence length 512, packing on, fp32, for `--warmup` + `--steps`
optimizer steps, each arm in a fresh subprocess with `--threads` threads:

- ft-train: the real CLI and loop (launch/train.py), timed from its metrics.jsonl (`train.log_every=1`): a step
  record's `time` is stamped when it is written, so the gap between two records is one whole loop iteration;
  its tokens are `tokens_per_s` x that gap. Eval and saving happen only after the last step record (untimed).
- bare: the same packed rows from ft-dist's data prep, sampler and collate (identical token slots per step), torch
  AdamW, transformers' loss (`use_cache=False`), clipping at train.max_grad_norm as the other two arms do.
- trl: SFTTrainer with `packing=True, packing_strategy="bfd"` (padding-free: 8 bins of <= 512 tokens flattened
  into one row), fp32, no gradient checkpointing, no eval, no saving, its other defaults (fused LM-head loss,
  fused AdamW) as TRL ships them; fed the same tokenized examples (ft-dist's unpacked prep). Its non-pad tokens per
  step are counted from the batches its collator yields.
- ddp: ft-train under torchrun, 2 processes x 1 thread on gloo, micro-batch halved so the global batch is the
  same, against the 1-process ft-train arm.

The arms run interleaved (repeats x [ft-train, bare, trl, ddp]), so machine noise hits all of them alike; warm-up
steps are excluded, each arm's figure is the median over repeats and each ratio the median of the per-repeat
ratios. Prints PASS/FAIL against the targets (ft-train >= 0.95x bare in non-pad tokens/s and per token slot,
>= 2.5x TRL); exits 1 on a FAIL.
Usage: python bench/throughput.py [--repeats 2] [--steps 8] [--warmup 2] [--threads 2] [--loss auto|full|chunked]
                                  [--skip trl ddp] [--json out.json]
TRL is a bench-only extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from _runs import ASSETS, REPO, launch, metrics

ARMS = ("ft-train", "bare", "trl", "ddp")
TRL_HINT = "TRL is not installed, so the TRL arm is skipped: .venv/bin/pip install -e '.[bench]'  (trl>=1.16,<2)"


def ft_overrides(args: argparse.Namespace, work: Path, packing: bool = True, ranks: int = 1) -> List[str]:
    """ft-train's overrides; the bare and TRL arms compose the same ones, so data, seed and model agree."""
    return [
        "model=pythia-70m", "model.from_config=true", f"model.tokenizer={ASSETS / 'tokenizers' / 'gpt-neox-20b'}",
        "data=lamini", f"data.path={ASSETS / 'datasets' / 'lamini_docs.jsonl'}", f"data.max_seq_len={args.seq_len}",
        f"data.packing={str(packing).lower()}", f"data.cache_dir={work / 'cache'}",
        f"train.micro_batch_size={args.micro_batch // ranks}", "train.grad_accum=1",  # the same global batch
        f"train.max_steps={args.warmup + args.steps}", "train.log_every=1", "train.eval_every=0", "train.save_every=0",
        f"train.loss={args.loss}",
        # Eval before training off; the one at the end (after the last step record) kept as small as it goes.
        "eval.before_training=false", "eval.max_examples=1", "eval.max_new_tokens=1",
    ]  # fmt: skip


def timed(args: argparse.Namespace, ends: List[float], tokens: List[int], slots: List[int], loss1: float) -> Dict:
    """Figures over the steps after warm-up; `ends[i]` is when step i+1 ended (ends[0]: the first step's start)."""
    w = args.warmup
    seconds = ends[w + args.steps] - ends[w]
    tok, slot = sum(tokens[w : w + args.steps]), sum(slots[w : w + args.steps])
    return {
        "tokens_per_s": tok / seconds,
        "s_per_step": seconds / args.steps,
        "tokens": tok,
        "seconds": seconds,
        "step_seconds": [b - a for a, b in zip(ends, ends[1:])],
        "step_tokens": tokens,
        "step_slots": slots,
        "loss_step1": loss1,
        **per_slot(tok, slot, seconds),
    }


def per_slot(tokens: int, slots: int, seconds: float) -> Dict[str, float]:
    return {"slots": slots, "non_pad_share": tokens / slots, "s_per_1k_slots": 1000 * seconds / slots} if slots else {}


# --- the arms that run in this file, each in its own subprocess --------------------------------------------------
def compose(args: argparse.Namespace, work: Path, packing: bool) -> Any:
    sys.path.insert(0, str(REPO))
    from ft_dist.commands.startup import compose_checked
    from ft_dist.config import validate

    return compose_checked("train", ft_overrides(args, work, packing), validate)


def bare_arm(args: argparse.Namespace, work: Path) -> Dict:
    import torch

    cfg = compose(args, work, packing=True)
    from ft_dist.data.batching import GlobalBatchSampler, collate, count_real_tokens, examples_from_rows
    from ft_dist.data.prepare import prepare_dataset
    from ft_dist.models import ModelSpec, load_tokenizer

    tok = load_tokenizer(cfg.model)
    train = prepare_dataset(cfg.data, tok).train
    model = ModelSpec(cfg.model, None, tok, seed=cfg.train.seed).build().train()  # ft-train's init, same seed
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sampler = GlobalBatchSampler(len(train), args.micro_batch, 1, 1, 0, cfg.train.seed)
    n_loss = train["num_loss_tokens"]
    ends, tokens, slots, losses = [time.perf_counter()], [], [], []
    for step in range(args.warmup + args.steps):
        idx = sampler.global_indices(step)
        batch = collate(examples_from_rows(train[idx]), tok.pad_token_id)
        loss = model(**batch, use_cache=False, num_items_in_batch=sum(n_loss[i] for i in idx)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # any loop reads its loss back; ft-train does too
        ends.append(time.perf_counter())
        tokens.append(count_real_tokens(batch))
        slots.append(batch["input_ids"].numel())
    return timed(args, ends, tokens, slots, losses[0])


def trl_arm(args: argparse.Namespace, work: Path) -> Dict:
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cfg = compose(args, work, packing=False)  # TRL packs the examples itself
    from ft_dist.data.prepare import prepare_dataset
    from ft_dist.models import ModelSpec, load_tokenizer

    tok = load_tokenizer(cfg.model)
    train = prepare_dataset(cfg.data, tok).train.select_columns(["input_ids", "labels"])  # labels: -100 on prompts
    model = ModelSpec(cfg.model, None, tok, seed=cfg.train.seed).build()
    ends: List[float] = []
    tokens: List[int] = []
    slots: List[int] = []

    class StepEnds(TrainerCallback):
        def on_train_begin(self, *_: Any, **__: Any) -> None:
            ends.append(time.perf_counter())

        def on_step_end(self, *_: Any, **__: Any) -> None:
            ends.append(time.perf_counter())

    config = SFTConfig(
        output_dir=str(work / "trl-out"),
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=1,
        max_length=args.seq_len,
        packing=True,
        packing_strategy="bfd",
        learning_rate=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm,
        seed=cfg.train.seed,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,  # as the others
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=tok, callbacks=[StepEnds()])
    collate = trainer.data_collator

    def counting(examples: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        # Batches come out in step order (the dataloader may fetch one ahead): call k is step k's batch.
        batch = collate(examples)
        tokens.append(sum(len(e["input_ids"]) for e in examples))  # real tokens, whatever padding was added
        slots.append(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting
    trainer.train()
    loss1 = next(r["loss"] for r in trainer.state.log_history if "loss" in r)
    return {**timed(args, ends, tokens, slots, loss1), "optimizer": config.optim, "loss_type": config.loss_type}


# --- the arms as subprocesses ----------------------------------------------------------------------------------
def run_ft(args: argparse.Namespace, work: Path, name: str, ddp: bool) -> Dict:
    out = work / name
    extra = ["strategy=ddp"] if ddp else []
    launch(
        [*ft_overrides(args, work, ranks=2 if ddp else 1), f"output_dir={out}", *extra],
        nproc=2 if ddp else 0,
        threads=1 if ddp else args.threads,
    )
    rows = [m for m in metrics(out) if "loss" in m and "tokens_per_s" in m]
    ends = [0.0] + [r["time"] for r in rows]  # time 0: the tracker's start, just before step 1 (a warm-up step)
    gaps = [b - a for a, b in zip(ends, ends[1:])]
    tokens = [round(r["tokens_per_s"] * g) for r, g in zip(rows, gaps)]  # tokens_per_s covers one step at log_every=1
    return timed(args, ends, tokens, [], rows[0]["loss"])  # slots: from the bare arm (same rows), see with_slots


def run_here(args: argparse.Namespace, work: Path, arm: str) -> Dict:
    result = work / f"{arm}.json"
    cmd = [
        sys.executable,
        __file__,
        "--arm",
        arm,
        "--work",
        str(work),
        "--result",
        str(result),
        *(f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("steps", "warmup", "micro_batch", "seq_len", "loss")),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{arm} arm failed:\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def with_slots(ft: Dict, bare: Dict, args: argparse.Namespace) -> Dict:
    """ft-train's slot counts are the bare arm's (same rows, sampler and collate); its tokens must agree too."""
    w = args.warmup
    slots = sum(bare["step_slots"][w : w + args.steps])
    off = abs(ft["tokens"] - bare["tokens"]) / bare["tokens"]
    if off > 0.01:
        print(
            f"warning: ft-train's tokens ({ft['tokens']}) differ from the bare loop's ({bare['tokens']}) by {off:.1%}"
        )
    return {**ft, **per_slot(ft["tokens"], slots, ft["seconds"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    # Defaults sized for ~13 min on 2 idle cores (TRL's steps take about twice ft-train's); more on a busy machine.
    parser.add_argument("--steps", type=int, default=8, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="threads of the 1-process arms (DDP: 1 per process)")
    parser.add_argument("--loss", default="auto", help="ft-train's train.loss (auto: chunked for GPT-NeoX)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("trl", "ddp"), help="arms to leave out")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--arm", choices=("bare", "trl"), help=argparse.SUPPRESS)  # internal: one arm in this process
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.micro_batch % 2:
        parser.error("--warmup must be >= 1 and --micro-batch even (the DDP arm halves it)")
    if args.arm:
        result = (bare_arm if args.arm == "bare" else trl_arm)(args, args.work)
        args.result.write_text(json.dumps(result))
        return

    arms = [a for a in ARMS if a not in args.skip]
    if "trl" in arms and importlib.util.find_spec("trl") is None:
        print(TRL_HINT)
        arms.remove("trl")
    work = Path(tempfile.mkdtemp(prefix="ft-bench-throughput-"))
    os.environ["TMPDIR"] = str(work)  # torchrun's torchelastic_* dirs go here, and with it
    runs: Dict[str, List[Dict]] = {arm: [] for arm in arms}
    try:
        for r in range(args.repeats):
            for arm in arms:
                t = time.time()
                if arm in ("ft-train", "ddp"):
                    runs[arm].append(run_ft(args, work, f"{arm}-{r}", ddp=arm == "ddp"))
                else:
                    runs[arm].append(run_here(args, work, arm))
                print(
                    f"repeat {r + 1}/{args.repeats} {arm}: {runs[arm][-1]['tokens_per_s']:.0f} non-pad tokens/s "
                    f"({time.time() - t:.0f} s)",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for arm in {"ft-train", "ddp"} & set(arms):
        runs[arm] = [with_slots(ft, bare, args) for ft, bare in zip(runs[arm], runs["bare"])]
    report(args, runs)


RATIOS = {  # name: (arm, baseline, figure); > 1 means the arm is faster
    "ft_over_bare_tokens_per_s": ("ft-train", "bare", "tokens_per_s"),
    "ft_over_bare_per_slot": ("ft-train", "bare", "s_per_1k_slots"),
    "ft_over_trl_tokens_per_s": ("ft-train", "trl", "tokens_per_s"),
    "ddp_over_single_tokens_per_s": ("ddp", "ft-train", "tokens_per_s"),
}
TARGETS = [
    ("ft_over_bare_tokens_per_s", 0.95, "ft-train >= 0.95x bare in non-pad tokens/s"),
    ("ft_over_bare_per_slot", 0.95, "ft-train >= 0.95x bare per token slot"),
    ("ft_over_trl_tokens_per_s", 2.5, "ft-train >= 2.5x TRL in non-pad tokens/s"),
]


def paired_ratio(runs: Dict[str, List[Dict]], arm: str, base: str, key: str) -> float:
    """Median over repeats of the arm against its baseline in the same repeat: the two ran back to back, so the
    machine's load (shared, and drifting by 2x here over minutes) cancels better than in a ratio of medians."""
    ratios = [a[key] / b[key] for a, b in zip(runs[arm], runs[base])]
    return statistics.median(1 / r if key.startswith("s_per") else r for r in ratios)


def report(args: argparse.Namespace, runs: Dict[str, List[Dict]]) -> None:
    import torch
    import transformers

    keys = ("tokens_per_s", "non_pad_share", "s_per_step", "s_per_1k_slots", "loss_step1")
    med = {arm: {k: statistics.median(x[k] for x in rs) for k in keys} for arm, rs in runs.items()}
    trl_version = importlib.util.find_spec("trl") and __import__("trl").__version__
    print(
        f"\nPythia-70m architecture from config, lamini_docs packed into rows of {args.seq_len}, micro-batch "
        f"{args.micro_batch}, fp32, {args.threads} threads; {args.steps} timed steps after {args.warmup} warm-up, "
        f"median of {args.repeats} interleaved repeats (torch {torch.__version__}, transformers "
        f"{transformers.__version__}, trl {trl_version or 'missing'})"
    )
    names = {
        "ft-train": f"ft-train (loss={args.loss})",
        "bare": "bare torch loop",
        "trl": "TRL SFTTrainer bfd",
        "ddp": "ft-train DDP 2x1 thread",
    }
    head = f"{'arm':<26}{'non-pad tok/s':>14}{'non-pad %':>11}{'s/step':>9}{'s/step per 1k slots':>21}{'loss@1':>8}"
    print(head + "  tok/s per repeat")
    for arm, m in med.items():
        each = " / ".join(f"{x['tokens_per_s']:.0f}" for x in runs[arm])  # the spread the median is taken over
        print(
            f"{names[arm]:<26}{m['tokens_per_s']:>14.0f}{100 * m['non_pad_share']:>11.1f}{m['s_per_step']:>9.2f}"
            f"{m['s_per_1k_slots']:>21.3f}{m['loss_step1']:>8.3f}  {each}"
        )
    ratios = {
        name: paired_ratio(runs, arm, base, key) if arm in runs and base in runs else None
        for name, (arm, base, key) in RATIOS.items()
    }
    print("ratios (median over repeats of each repeat's ratio):")
    labels = {
        "ft_over_bare_tokens_per_s": "ft-train / bare, non-pad tokens/s",
        "ft_over_bare_per_slot": "ft-train / bare, per token slot (bare's s/slot over ft-train's)",
        "ft_over_trl_tokens_per_s": "ft-train / TRL, non-pad tokens/s",
        "ddp_over_single_tokens_per_s": f"DDP 2 x 1 thread / 1 process x {args.threads} threads, non-pad tokens/s",
    }
    for name, value in ratios.items():
        if value is not None:
            print(f"  {labels[name]}: {value:.3f}")
    failed = False
    for name, target, what in TARGETS:
        value = ratios[name]
        verdict = "SKIP (arm not run)" if value is None else "PASS" if value >= target else "FAIL"
        failed |= verdict == "FAIL"
        print(f"{verdict}: {what}" + ("" if value is None else f" ({value:.3f})"))
    if args.json:
        settings = {k: getattr(args, k) for k in ("repeats", "steps", "warmup", "micro_batch", "seq_len", "threads")}
        versions = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_version or None}
        figures = {"settings": {**settings, "loss": args.loss, "skip": args.skip}, "versions": versions}
        args.json.write_text(json.dumps({**figures, "median": med, "ratios": ratios, "runs": runs}, indent=1))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
