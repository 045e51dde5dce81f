"""Peak memory of one training step per memory saver, against the baseline and against the planner's prediction.

    python bench/memory_features.py                    # CPU: MemTracker's peak of real tensors
    python bench/memory_features.py --device cuda      # GPU: torch.cuda.max_memory_allocated (activation offload
                                                       # only moves anything here)

Every row is one real step (forward, backward, optimizer step, then a second one so optimizer states exist) of the
same Llama-shaped model, built by the planner's tracer (QLoRA: loaded 4-bit by ft-train's own loader), with
ft-train's own loss, checkpointing, offload and optimizers. Printed: measured peak, its ratio to the baseline row,
the planner's predicted peak and ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ft_dist.activations import offload_activations  # noqa: E402
from ft_dist.config import ModelConfig, PeftConfig, TrainConfig  # noqa: E402
from ft_dist.loss import CausalLMLoss  # noqa: E402
from ft_dist.models import apply_peft, load_quantized  # noqa: E402
from ft_dist.optim import build_optimizer  # noqa: E402
from ft_dist.planner.memory import estimate_memory  # noqa: E402
from ft_dist.planner.params import architecture, hf_config  # noqa: E402
from ft_dist.planner.trace import build_model, skip_frozen  # noqa: E402
from ft_dist.planner.workload import TrainingSetup  # noqa: E402

ARCH = dict(model_type="llama", vocab_size=32_000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
BASE = TrainingSetup(precision="fp32", micro_batch=2, seq_len=512, loss="full")
FEATURES: List[Tuple[str, Dict[str, Any]]] = [
    ("baseline (full loss)", {}),
    ("chunked loss (256 tokens)", dict(loss="chunked", loss_chunk_tokens=256)),
    ("checkpoint every block", dict(activation_checkpointing=True)),
    ("checkpoint every 2nd block", dict(activation_checkpointing=True, checkpoint_every=2)),
    ("activation offload", dict(offload_activations=True)),
    ("adamw_8bit", dict(optimizer="adamw_8bit")),
    ("paged_adamw_8bit", dict(optimizer="paged_adamw_8bit")),
    ("LoRA r=16 (fp32 base)", dict(peft="lora")),
    ("QLoRA r=16 (NF4 base)", dict(peft="qlora")),
    ("all of them", dict(loss="chunked", loss_chunk_tokens=256, activation_checkpointing=True, checkpoint_every=2,
                         offload_activations=True, optimizer="adamw_8bit")),
]


def _model(setup: TrainingSetup, device: torch.device, saved: Path) -> Any:
    """The planner tracer's model; QLoRA's the way ft-train loads it (4-bit from a saved model, then LoRA)."""
    if setup.peft != "qlora":
        return build_model(ARCH, setup).to(device)
    if not (saved / "config.json").exists():
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_config(hf_config(ARCH)).save_pretrained(saved)
    peft = PeftConfig(method="qlora", r=setup.lora_rank, alpha=2 * setup.lora_rank, dropout=0.0,
                      target_modules=list(setup.lora_targets))
    base = load_quantized(str(saved), peft, torch.float32, torch.float32, device, ModelConfig(name="bench"), {})
    return apply_peft(base, peft)


def peak_bytes(setup: TrainingSetup, device: torch.device, saved: Path) -> int:
    torch.manual_seed(0)
    model = _model(setup, device, saved)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad],
                                replace(TrainConfig(), optimizer=setup.optimizer, lr=1e-4))
    loss = CausalLMLoss(model, setup.loss, setup.loss_chunk_tokens)
    ids = torch.randint(0, ARCH["vocab_size"], (setup.micro_batch, setup.seq_len), device=device)
    batch = {"input_ids": ids, "labels": ids}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with offload_activations(setup.offload_activations):
            value = loss(model, batch, 1.0)
        value.backward()
        optimizer.step()

    return _measure(step, model, optimizer, device)


def _measure(step: Callable[[], None], model: Any, optimizer: Any, device: torch.device) -> int:
    if device.type == "cuda":
        step()  # the first step creates the optimizer states; the second is the steady state measured
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    skip_frozen(tracker, model)
    tracker.track_external(model, optimizer)
    with tracker:
        step()
        tracker.reset_mod_stats()  # per-module stats are per call; the global peak is kept
        step()
    return int(tracker.get_tracker_snapshot("peak")[device]["Total"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--only", nargs="*", help="feature names (substrings) to run; default: all")
    args = ap.parse_args()
    device = torch.device(args.device)
    arch = architecture(ARCH)
    rows = [(name, BASE.but(**changes)) for name, changes in FEATURES]
    if args.only:
        rows = [rows[0]] + [r for r in rows[1:] if any(o in r[0] for o in args.only)]
    print(f"{'feature':<28}{'measured':>12}{'x base':>9}{'planned':>12}{'x base':>9}{'planned/measured':>18}")
    base_measured = base_planned = 0.0
    saved = Path(tempfile.mkdtemp(prefix="ft-dist-bench-"))  # the QLoRA row's pretrained model
    for name, setup in rows:
        if setup.offload_activations and device.type != "cuda":
            if setup == rows[-1][1]:  # "all of them": the others still apply
                name, setup = f"{name} but offload", setup.but(offload_activations=False)
            else:
                print(f"{name:<28}  (a CPU-only run has no other memory to offload to: run with --device cuda)")
                continue
        measured = peak_bytes(setup, device, saved)
        planned = estimate_memory(arch, setup.but(device="cpu")).total  # tensor bytes, as measured
        if not base_measured:
            base_measured, base_planned = measured, planned
        print(f"{name:<28}{measured / 2**20:>10.0f}Mi{measured / base_measured:>9.2f}{planned / 2**20:>10.0f}Mi"
              f"{planned / base_planned:>9.2f}{planned / measured:>18.2f}")
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
    shutil.rmtree(saved, ignore_errors=True)


if __name__ == "__main__":
    main()
