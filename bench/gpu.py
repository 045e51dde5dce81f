"""ft-train on one GPU: tokens/s, TFLOP/s, MFU and peak memory of a 1B full finetune, an 8B LoRA and an 8B QLoRA,
beside TRL's SFTTrainer on the 1B and the planner's prediction for each.

    python bench/gpu.py [--out bench_gpu.json] [--arms 1b-full,1b-full-trl,8b-lora,8b-qlora] [--steps 20]
    python bench/gpu.py --cpu-smoke      # every arm on tiny shapes on this CPU: tests the script end to end

Arms (one process, strategy=single, bf16 autocast over fp32 master weights, packed rows of 2048 tokens, models
built from config with random init, `--warmup` + `--steps` optimizer steps, first `--warmup` untimed):
- 1b-full: conf/model/llama-3.2-1b.yaml (model.from_config=true), full finetune through ft-train's CLI
  (`launch/train.py k=v ...`), torch.compile per transformer block (train.compile=true), micro-batch 8.
- 1b-full-trl: the same model, examples (ft-dist's own tokenization, unpacked) and shapes in TRL's SFTTrainer,
  `packing=True, packing_strategy="bfd"`, no gradient checkpointing, no eval or saving, eager (TRL's other defaults:
  fused LM-head loss, fused AdamW, dataloader in the main process). Skipped in one line without TRL.
- 8b-lora: the Llama-3-8B shape (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336, vocab 128256,
  rope_theta 500000; a config.json handed over as `model.config`), peft=lora, micro-batch 4, eager.
- 8b-qlora: the same with peft=qlora over a bf16 copy of that random model written to disk first (QLoRA quantizes
  pretrained weights as they load); skipped in one line if bitsandbytes cannot quantize on this device.

Data: synthetic instruction/response pairs (prompts of 1/32-1/4 of a row, responses 1/16-5/8) written to a temp
JSONL, tokenized by the embedded character tokenizer (nothing to download or carry; ids stay far below the 128256
vocab, which the LM head still computes in full) or `--tokenizer DIR`. Eval before training is off; the final eval
and save (1 test example, 1 new token, LoRA adapters unmerged) come after the last step record, untimed.

Measured, steady state after warm-up. ft-train arms, from metrics.jsonl (`train.log_every=1`: a record's `time` is
stamped when written, so the gap between two is one loop iteration): tokens/s per GPU (`tokens_per_s_per_gpu`, else
`tokens_per_s`), `tflops_per_gpu`, `mfu`, peak `memory_gb` / `memory_reserved_gb`, each "n/a" where the key is
missing (then the planner check's measured train-phase peak stands in for memory; on a CPU "allocated" is the peak
RSS). The TRL arm: step ends from a callback, the non-pad tokens its collator yields, torch.cuda's peaks. Every arm
also gets TFLOP/s from the planner's FLOP count (ft_dist/planner/throughput.py: 6N full, 4N LoRA, + attention) and
MFU against --peak-tflops or the catalog's dense bf16 peak for this GPU (989 on an H200). Planner: ft-train's
`planner_check` from eval.json (predicted vs measured allocated and reserved); for TRL, `estimate_memory` of arm 1's
setup (`run_setup.setup_of`) with TRL's loss and optimizer; for every arm the planner's tokens/s at its catalog MFU.
All of it is printed and written to --out after each arm, so a run cut short keeps what finished.

On the lent device machine (one H200, no internet; python3 there has torch, transformers, peft, accelerate but not
hydra-core, omegaconf, datasets, ... nor TRL or bitsandbytes), prepare the wheels here once, from the repo root:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        hydra-core==1.3.8 omegaconf==2.3.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 rapidfuzz==3.14.6 \
        nltk==3.10.4 defusedxml==0.7.1 bitsandbytes==0.50.2 trl==1.16.0
    python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3 rouge-score==0.1.2   # sdists: pure Python

(about 50 MB, bitsandbytes 43 of it; with the repo well under the 64 MiB a call carries). Then one `run` call with
carry [".whl"] and timeout_s 570 (the arms are sized for about 8 minutes; --budget-s stops starting arms after 480 s
and kills one running past 510 s), this command (the backslash-newlines may stay):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=/tmp/site || exit; set -o pipefail; PYTHONUNBUFFERED=1 python3 bench/gpu.py \
    --out $OUT/bench_gpu.json --logs $OUT 2>&1 | tee $OUT/bench_gpu.log

A GPT-NeoX or GPT-2 tokenizer instead (../shared/assets is not on that machine): copy
../shared/assets/tokenizers/gpt-neox-20b into a folder that .git/info/exclude ignores (e.g. .tok/), add it to carry,
and pass `--tokenizer .tok/gpt-neox-20b`. A rerun of some arms only: `--arms 8b-lora,8b-qlora`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _runs import REPO, metrics  # noqa: E402

ARMS = ("1b-full", "1b-full-trl", "8b-lora", "8b-qlora")
LLAMA3_8B = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
    rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
)  # fmt: skip
TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
"""--cpu-smoke's shape for every arm (the 128256 vocabulary stays)."""
MICRO_BATCH = {"1b-full": 8, "1b-full-trl": 8, "8b-lora": 4, "8b-qlora": 4}
"""Planner (H200, seq 2048, chunked loss): 1B full 50 GiB allocated, 8B LoRA 99, 8B QLoRA 95 of 140."""
OPTIONAL_KEYS = ("train.compile", "train.peak_tflops", "train.num_workers")
"""Keys being added to ft-train: dropped, with one line, while this checkout's schema lacks them."""
WORDS = (
    "the a of record field value city year name job answer report notes extract summary list table each which "
    "model reads writes short long first last between after before because unless during whose following "
    "describe explain compare Oslo Bergen Lima Kyoto 1982 1968 2004 welder pilot baker nurse engineer"
).split()
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}


# --- setup shared by the arms ----------------------------------------------------------------------------------
def synthetic_jsonl(path: Path, tokenizer: Any, tokens: int, seq_len: int, seed: int = 0) -> int:
    """Instruction/response pairs totalling about `tokens` tokens (each example fits a row); returns the count."""
    rng = random.Random(seed)
    probe = " ".join(rng.choice(WORDS) for _ in range(400))
    chars_per_token = len(probe) / len(tokenizer(probe)["input_ids"])

    def text(n_tokens: int) -> str:
        words: List[str] = []
        while sum(len(w) + 1 for w in words) < n_tokens * chars_per_token:
            words.append(rng.choice(WORDS))
        return " ".join(words)

    n = total = 0
    with path.open("w") as fh:
        while total < tokens or n < 64:
            p, r = rng.randint(seq_len // 32, seq_len // 4), rng.randint(seq_len // 16, seq_len * 5 // 8)
            fh.write(json.dumps({"instruction": f"{n}: {text(p)}", "response": text(r)}) + "\n")
            n, total = n + 1, total + p + r
    return n


def known_key(key: str) -> bool:
    from ft_dist.config import RunConfig

    node: Any = RunConfig()
    for part in key.split("."):
        if not hasattr(node, part):
            return False
        node = getattr(node, part)
    return True


def attention() -> str:
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"


def versions() -> Dict[str, Optional[str]]:
    out: Dict[str, Optional[str]] = {}
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "trl", "bitsandbytes", "flash-attn"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def gpu_entry(device_name: str, total_gib: float) -> Optional[Dict[str, Any]]:
    """The catalog's GPU model for this device (name prefix, nearest memory size), None off the catalog."""
    from ft_dist.planner.catalog import load_catalog

    gpus = load_catalog().gpus
    found = [(k, v) for k, v in gpus.items() if k.split("-")[0] in device_name]
    if not found:
        return None
    key, row = min(found, key=lambda kv: abs(kv[1].get("device_gib", kv[1]["memory_gb"]) - total_gib))
    return {"name": key, **row}


def planner_figures(cfg: Any, setup: Any, gpu: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The planner's memory and tokens/s for `setup` of `cfg`'s architecture (tokens/s only on a catalog GPU)."""
    from omegaconf import OmegaConf

    from ft_dist.planner.catalog import load_catalog
    from ft_dist.planner.memory import GIB, estimate_memory
    from ft_dist.planner.params import architecture
    from ft_dist.planner.throughput import step_time

    arch = architecture(OmegaConf.to_container(cfg.model.arch, resolve=True))
    mem = estimate_memory(arch, setup)
    out: Dict[str, Any] = {
        "predicted_allocated_gib": mem.allocated / GIB,
        "predicted_reserved_gib": mem.reserved / GIB,
        "peak_phase": mem.peak_phase,
    }
    catalog = load_catalog()
    inst = next((i for i in catalog.instances.values() if gpu and i.gpu == gpu["name"]), None)
    if inst is not None:
        out["predicted_tokens_per_s_per_gpu"] = step_time(arch, setup, inst, catalog.mfu).tokens_per_second
        out["catalog_mfu"] = catalog.mfu[inst.generation]
    return out


def formula_flops(cfg: Any, setup: Any) -> float:
    from omegaconf import OmegaConf

    from ft_dist.planner.params import architecture
    from ft_dist.planner.throughput import flops_per_token

    return flops_per_token(architecture(OmegaConf.to_container(cfg.model.arch, resolve=True)), setup)


# --- the arms --------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.smoke = args.cpu_smoke
        self.seq = 128 if self.smoke else 2048
        self.attn = attention()
        self.start = time.time()
        self.env = {**os.environ, **OFFLINE, "FT_DIST_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}
        if self.smoke:
            self.env["OMP_NUM_THREADS"] = "2"  # a shared 2-core machine
        self.gpu: Optional[Dict[str, Any]] = None
        if not self.smoke:
            # Asked in a child: the arms need the whole GPU, not a CUDA context held by this process all along.
            probe = (
                "import json, torch; p = torch.cuda.get_device_properties(0); "
                "print(json.dumps([p.name, p.total_memory]))"
            )
            name, total = json.loads(subprocess.check_output([sys.executable, "-c", probe], text=True).splitlines()[-1])
            self.device_name = name
            self.gpu = gpu_entry(name, total / 2**30)
        else:
            self.device_name = "cpu"
        self.peak = args.peak_tflops or (self.gpu["peak_tflops"]["bf16"] if self.gpu else 0.0)
        self.data = work / "data.jsonl"
        if args.logs:
            Path(args.logs).mkdir(parents=True, exist_ok=True)
        self.dropped = [k for k in OPTIONAL_KEYS if not known_key(k)]
        for key in self.dropped:
            print(f"note: this ft-train has no {key} yet: dropped from the overrides (its figure is n/a)")

    def mb(self, arm: str) -> int:
        return 2 if self.smoke else MICRO_BATCH[arm]

    def write_data(self, arms: Sequence[str]) -> None:
        from ft_dist.config import ModelConfig
        from ft_dist.models import load_tokenizer

        tok = load_tokenizer(ModelConfig(name="bench", tokenizer=self.args.tokenizer))
        rows = max(self.mb(a) for a in arms) * (self.args.warmup + self.args.steps)
        n = synthetic_jsonl(self.data, tok, int(1.15 * rows * self.seq), self.seq)
        print(f"data: {n} synthetic examples for {rows} packed rows of {self.seq} ({self.args.tokenizer} tokenizer)")

    def overrides(self, arm: str) -> List[str]:
        a, peft = self.args, {"8b-lora": "lora", "8b-qlora": "qlora"}.get(arm, "none")
        out = [
            f"model.tokenizer={a.tokenizer}", f"model.attn_implementation={self.attn}",
            f"data.path={self.data}", "data.prompt_field=instruction", "data.response_field=response",
            f"data.max_seq_len={self.seq}", "data.packing=true", "data.test_size=4",
            f"data.cache_dir={self.work / 'cache'}", "train.precision=bf16", f"train.max_steps={a.warmup + a.steps}",
            f"train.micro_batch_size={self.mb(arm)}", "train.grad_accum=1", "train.log_every=1", "train.eval_every=0",
            "train.save_every=0", "train.warmup_steps=0", "train.scheduler=constant",
            f"train.lr={2e-5 if peft == 'none' else 2e-4}", "train.resume=null",
            # Compile only arm 1 (its point), and not on a 2-core CPU, where inductor's C++ builds take minutes.
            f"train.compile={str(arm == '1b-full' and not self.smoke).lower()}",
            f"train.num_workers={0 if self.smoke else 2}",
            f"peft={peft}", "eval.before_training=false", "eval.max_examples=1", "eval.max_new_tokens=1",
            f"output_dir={self.work / arm}", f"device={'cpu' if self.smoke else 'cuda'}",
        ]  # fmt: skip
        if peft != "none":
            out.append("peft.merge_on_save=false")  # a merged 8B (16 GB) would be written for nothing
        if a.peak_tflops:
            out.append(f"train.peak_tflops={a.peak_tflops}")
        if arm.startswith("1b"):
            out += ["model=llama-3.2-1b", "model.from_config=true"]
            out += [f"model.arch.{k}={v}" for k, v in TINY.items()] if self.smoke else []
        else:
            shape = {**LLAMA3_8B, **(TINY if self.smoke else {})}
            config = self.work / "llama-3-8b" / "config.json"  # model.name comes from the folder
            config.parent.mkdir(exist_ok=True)
            config.write_text(json.dumps(shape))
            out += ["model=llama-3.2-1b", f"model.config={config}"]
            if peft == "qlora":
                out += [f"model.name_or_path={self.work / 'llama-3-8b-bf16'}", "model.from_config=false"]
            else:
                out.append("model.from_config=true")
        return [o for o in out if o.split("=", 1)[0] not in self.dropped]

    def compose(self, overrides: List[str]) -> Any:
        from ft_dist.commands.startup import compose_checked
        from ft_dist.config import validate

        return compose_checked("train", overrides, validate)

    def remaining(self) -> float:
        return self.args.budget_s - (time.time() - self.start)

    def run(self, name: str, cmd: List[str]) -> int:
        """Run `cmd` (log to work/<name>.log, copied to --logs); kill its process group past the time budget."""
        log = self.work / f"{name}.log"
        with log.open("w") as fh:
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                code = proc.wait(timeout=max(30.0, self.remaining() + 30))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = -9
                fh.write(f"\n[bench] killed: past the time budget (--budget-s {self.args.budget_s:g})\n")
        if self.args.logs:
            shutil.copy(log, Path(self.args.logs) / f"gpu_{name}.log")
        if code:
            print(f"{name}: exit {code}; last lines of its log:")
            print("\n".join("    " + line for line in log.read_text(errors="replace").splitlines()[-25:]))
        return code

    def ft_train(self, arm: str) -> Dict[str, Any]:
        overrides = self.overrides(arm)
        cfg = self.compose(overrides)  # the run's config, checked here: a bad override costs no GPU time
        if arm == "8b-qlora":
            spec = {"arch": {**LLAMA3_8B, **(TINY if self.smoke else {})}, "dir": str(self.work / "llama-3-8b-bf16")}
            spec_file = self.work / "base.json"
            spec_file.write_text(json.dumps({**spec, "device": "cpu" if self.smoke else "cuda"}))
            code = self.run("8b-qlora-base", [sys.executable, __file__, "--write-model", str(spec_file)])
            if code == 3:
                return {"status": "skipped", "reason": "bitsandbytes cannot quantize on this device"}
            if code:
                return {"status": "failed", "reason": f"writing the bf16 base exited {code}"}
        code = self.run(arm, [sys.executable, str(REPO / "launch" / "train.py"), *overrides])
        run_dir = self.work / arm
        out: Dict[str, Any] = {"stack": "ft-train", "overrides": overrides}
        if code or not (run_dir / "metrics.jsonl").exists():
            return {**out, "status": "failed", "reason": f"ft-train exited {code}"}
        from omegaconf import OmegaConf

        from ft_dist.planner.run_setup import setup_of

        ran = OmegaConf.load(run_dir / "config.yaml")
        setup = setup_of(ran, device="cpu" if self.smoke else "cuda")
        rows = [m for m in metrics(run_dir) if "loss" in m]
        w = self.args.warmup
        ends = [0.0] + [r["time"] for r in rows]  # 0: the tracker's start, just before step 1
        gaps = [b - a for a, b in zip(ends, ends[1:])][w:]
        rate = [r.get("tokens_per_s_per_gpu", r.get("tokens_per_s")) for r in rows][w:]
        timed = rows[w:]
        out.update(status="ok", steps=len(rows), timed_steps=len(timed))
        if timed and None not in rate:
            out["tokens_per_s_per_gpu"] = sum(t * g for t, g in zip(rate, gaps)) / sum(gaps)
            out["tokens_per_s_per_gpu_median"] = statistics.median(rate)  # a late recompile shows as the gap
        for key in ("tflops_per_gpu", "mfu"):
            vals = [r[key] for r in timed if isinstance(r.get(key), (int, float))]
            out[key] = statistics.median(vals) if vals else None
        for key, name in (("memory_gb", "peak_allocated_gib"), ("memory_reserved_gb", "peak_reserved_gib")):
            vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            out[name] = max(vals) if vals else None
        report = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").exists() else {}
        check = report.get("planner_check") or {}
        out["planner_check"] = check or None
        if check.get("device") == "cuda":  # the train-phase peaks it measured stand in for a missing key
            out["peak_allocated_gib"] = out["peak_allocated_gib"] or check["measured_allocated"] / 2**30
            out["peak_reserved_gib"] = out["peak_reserved_gib"] or check["measured_reserved"] / 2**30
        return self.finish(out, cfg, setup)

    def trl(self) -> Dict[str, Any]:
        try:
            import trl  # noqa: F401
        except Exception as err:  # missing, or built for other transformers
            print(f"1b-full-trl: skipped, TRL does not import here ({str(err).splitlines()[0][:120]})")
            return {"stack": "trl", "status": "skipped", "reason": f"TRL does not import: {err}"}
        overrides = [o for o in self.overrides("1b-full") if not o.startswith(("train.compile", "data.packing"))]
        overrides.append("data.packing=false")  # TRL packs the examples itself
        spec = {
            "overrides": overrides, "steps": self.args.warmup + self.args.steps, "warmup": self.args.warmup,
            "micro_batch": self.mb("1b-full-trl"), "seq_len": self.seq, "device": "cpu" if self.smoke else "cuda",
            "result": str(self.work / "trl.json"), "output_dir": str(self.work / "trl-out"),
        }  # fmt: skip
        spec_file = self.work / "trl-spec.json"
        spec_file.write_text(json.dumps(spec))
        code = self.run("1b-full-trl", [sys.executable, __file__, "--trl-worker", str(spec_file)])
        if code:
            return {"stack": "trl", "status": "failed", "reason": f"TRL worker exited {code}"}
        out = {"stack": "trl", "status": "ok", **json.loads(Path(spec["result"]).read_text())}
        from ft_dist.planner.run_setup import setup_of

        cfg = self.compose(overrides)
        # Arm 1's setup with what TRL does differently: its loss (a fused LM head since TRL 1.x) and optimizer.
        loss = "fused" if out.pop("fused_lm_head") else "full"
        optimizer = "adamw" if "fused" in out["optimizer"] else "adamw_foreach"
        setup = setup_of(cfg, device="cpu" if self.smoke else "cuda").but(loss=loss, optimizer=optimizer)
        return self.finish(out, cfg, setup)

    def finish(self, out: Dict[str, Any], cfg: Any, setup: Any) -> Dict[str, Any]:
        """The planner's figures and the formula's TFLOP/s / MFU beside what was measured."""
        out.update(
            model=cfg.model.name, peft=setup.peft, micro_batch=setup.micro_batch, seq_len=setup.seq_len,
            tokens_per_step=setup.micro_batch * setup.seq_len, attention=cfg.model.attn_implementation,
            compile=bool(cfg.train.get("compile", False)) and out["stack"] == "ft-train",
        )  # fmt: skip
        out["planner"] = planner_figures(cfg, setup, self.gpu)
        tps = out.get("tokens_per_s_per_gpu")
        if tps:
            out["tflops_per_gpu_formula"] = tps * formula_flops(cfg, setup) / 1e12
            out["mfu_formula"] = out["tflops_per_gpu_formula"] / self.peak if self.peak else None
            out["tflops_per_gpu"] = out.get("tflops_per_gpu") or out["tflops_per_gpu_formula"]
            out["mfu"] = out.get("mfu") or out["mfu_formula"]
        return out


# --- worker processes ------------------------------------------------------------------------------------------
def write_model(spec_file: str) -> int:
    """A random bf16 model in HF format for QLoRA to load; exit 3 if bitsandbytes cannot quantize on the device."""
    import torch

    spec = json.loads(Path(spec_file).read_text())
    device = torch.device(spec["device"])
    try:
        import bitsandbytes.functional as bnbf

        bnbf.quantize_4bit(torch.ones(64, 64, device=device, dtype=torch.bfloat16))
    except Exception as err:
        print(f"bitsandbytes cannot quantize on {device}: {err}")
        return 3
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(spec["arch"])
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    torch.manual_seed(0)
    with device:  # initialised where it is fast: 8B normal draws on one GPU take seconds
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(spec["dir"])
    print(f"wrote {sum(p.numel() for p in model.parameters()):,} bf16 parameters to {spec['dir']}")
    return 0


def trl_worker(spec_file: str) -> int:
    """TRL's SFTTrainer on arm 1's model and examples; writes its timed figures to spec["result"]."""
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from ft_dist.commands.startup import compose_checked
    from ft_dist.config import validate
    from ft_dist.data.prepare import prepare_dataset
    from ft_dist.models import ModelSpec, load_tokenizer

    spec = json.loads(Path(spec_file).read_text())
    cuda = spec["device"] == "cuda"
    cfg = compose_checked("train", spec["overrides"], validate)
    tok = load_tokenizer(cfg.model)
    train = prepare_dataset(cfg.data, tok).train.select_columns(["input_ids", "labels"])  # labels: -100 on prompts
    model = ModelSpec(cfg.model, None, tok, seed=cfg.train.seed).build()  # ft-train's init, same seed, fp32
    ends: List[float] = []
    tokens: List[int] = []

    class StepEnds(TrainerCallback):
        def on_train_begin(self, *_: Any, **__: Any) -> None:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            ends.append(time.perf_counter())

        def on_step_end(self, *_: Any, **__: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    # transformers 5.2x renamed gradient_checkpointing (TRL's default: on); ft-train's arm runs without.
    renamed = "activation_checkpointing" in {f.name for f in dataclasses.fields(SFTConfig)}
    config = SFTConfig(
        output_dir=spec["output_dir"],
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=1,
        max_length=spec["seq_len"],
        packing=True,
        packing_strategy="bfd",
        learning_rate=cfg.train.lr,
        lr_scheduler_type="constant",
        max_grad_norm=cfg.train.max_grad_norm,
        seed=cfg.train.seed,
        use_cpu=not cuda,
        bf16=True,
        **{"activation_checkpointing" if renamed else "gradient_checkpointing": False},
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=tok, callbacks=[StepEnds()])
    collate = trainer.data_collator

    def counting(examples: List[Dict[str, Any]]) -> Dict[str, Any]:
        # The dataloader runs in this process (TRL's default of 0 workers): call k collates step k's batch.
        tokens.append(sum(len(e["input_ids"]) for e in examples))
        return collate(examples)

    trainer.data_collator = counting
    trainer.train()
    w, n = spec["warmup"], spec["steps"]
    seconds = ends[n] - ends[w]
    if cuda:
        allocated, reserved = torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
    else:
        import resource

        allocated, reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, None  # RSS, as ft-train
    from trl.trainer import utils as trl_utils

    result = {
        "steps": n,
        "timed_steps": n - w,
        "tokens_per_s_per_gpu": sum(tokens[w:n]) / seconds if seconds > 0 else None,
        "peak_allocated_gib": allocated,
        "peak_reserved_gib": reserved,
        "optimizer": str(getattr(config.optim, "value", config.optim)),
        "fused_lm_head": hasattr(trl_utils, "add_fused_lm_head"),
        "trl": importlib.metadata.version("trl"),
    }
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


# --- report ----------------------------------------------------------------------------------------------------
def fmt(value: Optional[float], spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale, spec)


def line(arm: str, r: Dict[str, Any]) -> str:
    if r["status"] != "ok":
        return f"{arm}: {r['status']} ({r.get('reason', '')})"
    p = r["planner"]
    check = r.get("planner_check") or {}
    errors = "".join(
        f", {k} {100 * check[f'error_{k}']:+.1f} %" for k in ("allocated", "reserved", "rss") if check.get(f"error_{k}")
    )
    return (
        f"{arm} ({r['stack']}, {r['model']}, peft {r['peft']}, micro-batch {r['micro_batch']} x {r['seq_len']}, "
        f"{r['attention']}, compile {'on' if r['compile'] else 'off'}): "
        f"{fmt(r.get('tokens_per_s_per_gpu'), ',.0f')} tokens/s/GPU, {fmt(r.get('tflops_per_gpu'), '.1f')} TFLOP/s/GPU "
        f"(formula {fmt(r.get('tflops_per_gpu_formula'), '.1f')}), MFU {fmt(r.get('mfu'), '.1f', 100)} %, "
        f"peak {fmt(r.get('peak_allocated_gib'), '.2f')} GiB allocated / {fmt(r.get('peak_reserved_gib'), '.2f')} "
        f"reserved; planner {p['predicted_allocated_gib']:.2f} / {p['predicted_reserved_gib']:.2f} GiB{errors}, "
        f"{fmt(p.get('predicted_tokens_per_s_per_gpu'), ',.0f')} tokens/s/GPU; {r['wall_s']:.0f} s"
    )


def table(results: Dict[str, Dict[str, Any]]) -> None:
    print(
        f"\n{'arm':<13}{'tok/s/GPU':>11}{'TFLOP/s':>9}{'MFU %':>7}{'alloc GiB':>10}{'resv GiB':>9}"
        f"{'plan alloc':>11}{'plan resv':>10}{'plan tok/s':>11}{'wall s':>7}"
    )
    for arm, r in results.items():
        if r["status"] != "ok":
            print(f"{arm:<13}{r['status']}: {r.get('reason', '')}")
            continue
        p = r["planner"]
        print(
            f"{arm:<13}{fmt(r.get('tokens_per_s_per_gpu'), ',.0f'):>11}{fmt(r.get('tflops_per_gpu'), '.1f'):>9}"
            f"{fmt(r.get('mfu'), '.1f', 100):>7}{fmt(r.get('peak_allocated_gib'), '.2f'):>10}"
            f"{fmt(r.get('peak_reserved_gib'), '.2f'):>9}{p['predicted_allocated_gib']:>11.2f}"
            f"{p['predicted_reserved_gib']:>10.2f}{fmt(p.get('predicted_tokens_per_s_per_gpu'), ',.0f'):>11}"
            f"{r['wall_s']:>7.0f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench_gpu.json"))
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--steps", type=int, help="timed steps per arm (default 20; --cpu-smoke 2)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 5, compile included; --cpu-smoke 0)")
    ap.add_argument("--tokenizer", default="embedded:char", help="tokenizer dir (default: the built-in char one)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="per GPU, for MFU (0: the planner's catalog)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="start no arm after this; kill one past it + 30 s")
    ap.add_argument("--logs", help="copy each arm's log into this folder (e.g. $OUT)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (runs, data, logs)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: tests this script")
    ap.add_argument("--write-model", help=argparse.SUPPRESS)  # internal: the QLoRA arm's bf16 base
    ap.add_argument("--trl-worker", help=argparse.SUPPRESS)  # internal: the TRL arm in its own process
    args = ap.parse_args()
    os.environ.update(OFFLINE)  # nothing is downloaded, here or in the arms
    if args.write_model:
        sys.exit(write_model(args.write_model))
    if args.trl_worker:
        sys.exit(trl_worker(args.trl_worker))
    arms = [a for a in args.arms.split(",") if a]
    if unknown := set(arms) - set(ARMS):
        ap.error(f"unknown arms {sorted(unknown)}; expected some of {', '.join(ARMS)}")
    args.steps = args.steps or (2 if args.cpu_smoke else 20)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.cpu_smoke else 5)
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU here; nothing measured (run it on a GPU machine, or --cpu-smoke to test it)")
        return
    work = Path(tempfile.mkdtemp(prefix="ft-bench-gpu-"))
    bench = Bench(args, work)
    info = {
        "device": bench.device_name, "catalog_gpu": bench.gpu and bench.gpu["name"], "peak_tflops": bench.peak,
        "attention": bench.attn, "steps": args.steps, "warmup": args.warmup, "seq_len": bench.seq,
        "tokenizer": args.tokenizer, "smoke": args.cpu_smoke, "versions": versions(), "dropped_keys": bench.dropped,
    }  # fmt: skip
    print(
        f"device {bench.device_name} (catalog {info['catalog_gpu']}, peak {bench.peak:g} TFLOP/s), attention "
        f"{bench.attn}, {args.warmup} + {args.steps} steps per arm, versions {json.dumps(info['versions'])}",
        flush=True,
    )
    results: Dict[str, Dict[str, Any]] = {}
    try:
        bench.write_data(arms)
        for arm in arms:
            if bench.remaining() < 30:
                results[arm] = {"status": "skipped", "reason": f"past the time budget (--budget-s {args.budget_s:g})"}
            else:
                t = time.time()
                try:
                    results[arm] = bench.trl() if arm == "1b-full-trl" else bench.ft_train(arm)
                except Exception as err:  # this script's own error in one arm: the others still run
                    results[arm] = {"status": "failed", "reason": f"{type(err).__name__}: {err}"}
                results[arm]["wall_s"] = time.time() - t
                if not args.keep:  # the 1B's final model alone is 2.5 GB
                    shutil.rmtree(work / arm, ignore_errors=True)
            print(line(arm, results[arm]), flush=True)
            args.out.write_text(json.dumps({**info, "arms": results}, indent=1, default=str))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work dir kept: {work}")
    table(results)
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
