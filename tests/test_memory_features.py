"""Chunked cross-entropy (ft_dist/loss.py) against transformers' own loss: the same loss and gradients, less memory."""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch
from torch import nn

from ft_dist.data.batching import collate, label_positions
from ft_dist.errors import ConfigError
from ft_dist.loss import CausalLMLoss

ARCH = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=101,
            max_position_embeddings=128)


def tiny(model_type: str, **arch) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"num_key_value_heads": 2} if model_type != "gpt_neox" else {}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**ARCH, **extra, **arch}))


def examples(lengths: List[int], vocab: int, seed: int = 0) -> List[Dict[str, List[int]]]:
    """Prompt + response examples; the loss falls on the response only (the prompt's labels are -100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        prompt = n // 3
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def packed(exs: List[Dict[str, List[int]]]) -> Dict[str, List[int]]:
    """One packed row of `exs`: positions restart per example, as ft_dist/data/packing.py writes them."""
    return {"input_ids": sum((e["input_ids"] for e in exs), []), "labels": sum((e["labels"] for e in exs), []),
            "position_ids": sum((list(range(len(e["input_ids"]))) for e in exs), [])}


def batch_for(layout: str, vocab: int) -> Dict[str, torch.Tensor]:
    exs = examples([23, 14, 9, 31], vocab)
    if layout == "padded":
        return collate(exs, pad_id=0)
    return collate([packed(exs[:3]), packed(exs[3:])], pad_id=0)


def loss_and_grads(model: nn.Module, loss: CausalLMLoss, batch: Dict[str, torch.Tensor], n: float):
    model.zero_grad(set_to_none=True)
    value = loss(model, batch, n)
    value.backward()
    return value.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("model_type", ["llama", "gpt_neox", "mistral", "qwen2"])
def test_chunked_loss_and_gradients_equal_full(model_type, layout):
    model = tiny(model_type)
    batch = batch_for(layout, ARCH["vocab_size"])
    n = float((batch["labels"][:, 1:] != -100).sum()) + 3  # any normaliser: the global batch's token count
    full_loss, full_grads = loss_and_grads(model, CausalLMLoss(model, "full", 1024), batch, n)
    chunked = CausalLMLoss(model, "auto", chunk_tokens=7)  # 7: chunks split examples and rows unevenly
    assert chunked.kind == "chunked"
    # Every position through the head, and (as the training loader collates them) the label positions only.
    for positions in (False, True):
        given = {**batch, "label_positions": label_positions(batch["labels"])} if positions else batch
        loss, grads = loss_and_grads(model, chunked, given, n)
        assert abs(float(loss) - float(full_loss)) <= 1e-6, (positions, float(loss), float(full_loss))
        for name, g in full_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=0, atol=1e-6, msg=f"{name} (label positions {positions})")
    # Outside a loss computation the head is the ordinary one: generation and eval see full logits.
    assert model(input_ids=batch["input_ids"]).logits.shape == (*batch["input_ids"].shape, ARCH["vocab_size"])


def test_the_head_runs_on_label_positions_only_and_the_last_chunk_is_not_recomputed():
    """Counted matmul FLOPs of one loss forward and backward (torch's FlopCounterMode): with `label_positions`, the
    LM head's three matmuls (forward, input and weight gradients: 6 x d x V a position) skip every prompt and padding
    position; and chunking recomputes in backward every chunk's head forward but the last's."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny("llama")
    batch = batch_for("padded", ARCH["vocab_size"])
    selected = {**batch, "label_positions": label_positions(batch["labels"])}

    def flops(chunk: int, b: Dict[str, torch.Tensor]) -> int:
        with FlopCounterMode(display=False) as counter:
            CausalLMLoss(model, "chunked", chunk)(model, b, 1.0).backward()
        return counter.get_total_flops()

    every, kept = batch["labels"].numel(), selected["label_positions"].numel()
    assert 0 < kept < every * 0.8  # the prompts and the padding are a real share of this batch
    per_position = 6 * ARCH["hidden_size"] * ARCH["vocab_size"]
    one_chunk = every  # no chunk is recomputed when one chunk holds them all
    assert flops(one_chunk, batch) - flops(one_chunk, selected) == per_position * (every - kept)
    chunk = 7
    last = kept - chunk * ((kept - 1) // chunk)  # the last chunk's positions
    forward_only = 2 * ARCH["hidden_size"] * ARCH["vocab_size"]
    assert flops(chunk, selected) - flops(one_chunk, selected) == forward_only * (kept - last)


def test_chunked_loss_refuses_where_it_would_not_be_exact():
    from peft import LoraConfig, get_peft_model

    gpt2 = tiny("gpt2", n_embd=32, n_layer=1, n_head=4)
    assert CausalLMLoss(gpt2, "auto", 64).kind == "full"
    with pytest.raises(ConfigError, match="train.loss.*gpt2"):
        CausalLMLoss(gpt2, "chunked", 64)
    adapted_head = get_peft_model(tiny("llama"), LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    assert CausalLMLoss(adapted_head, "auto", 64).kind == "full"
    with pytest.raises(ConfigError, match="LM head"):
        CausalLMLoss(adapted_head, "chunked", 64)


def peak_bytes(model: nn.Module, loss: CausalLMLoss, batch: Dict[str, torch.Tensor]) -> int:
    """Peak tensor bytes on the CPU during one loss forward and backward (torch's MemTracker, real tensors)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    model.zero_grad(set_to_none=True)
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        loss(model, batch, 1.0).backward()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


@pytest.mark.parametrize("vocab", [50_304, 128_256])
def test_chunked_loss_lowers_the_peak_of_loss_and_backward(vocab):
    model = tiny("llama", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1)
    exs = examples([512] * 4, vocab)
    batch = collate(exs, pad_id=0)  # 2048 tokens: fp32 logits alone are 2048 x vocab x 4 bytes
    full = peak_bytes(model, CausalLMLoss(model, "full", 256), batch)
    # With the label positions, as training collates them: the last chunk, kept from forward, is a chunk too.
    selected = {**batch, "label_positions": label_positions(batch["labels"])}
    chunked = peak_bytes(model, CausalLMLoss(model, "chunked", 256), selected)
    logits = 2048 * vocab * 4
    print(f"vocab {vocab}: peak full {full / 2**20:.0f} MiB, chunked {chunked / 2**20:.0f} MiB "
          f"({chunked / full:.2f}x); one fp32 logits tensor {logits / 2**20:.0f} MiB")
    # Full keeps the logits, their fp32 log-softmax and their gradient: at least 2 logits tensors at once.
    assert full >= 2 * logits
    # Chunked holds one 256-token chunk (8x smaller than the logits) a few times over, on top of weights and grads.
    weights_and_grads = 2 * sum(p.numel() * 4 for p in model.parameters())
    assert chunked - weights_and_grads <= 0.6 * logits, (chunked, weights_and_grads, logits)


def test_selective_checkpointing_and_activation_offload_leave_loss_and_gradients_unchanged():
    from ft_dist.activations import checkpoint_blocks, offload_activations

    batch = batch_for("padded", ARCH["vocab_size"])
    n = float((batch["labels"][:, 1:] != -100).sum())
    baseline = tiny("llama", num_hidden_layers=4)
    baseline.train()
    want = loss_and_grads(baseline, CausalLMLoss(baseline, "full", 1024), batch, n)
    for every in (1, 2):
        model = tiny("llama", num_hidden_layers=4)
        assert checkpoint_blocks(model, every) == 4 // every
        model.train()
        assert [b.gradient_checkpointing for b in model.model.layers] == [i % every == 0 for i in range(4)]
        got = loss_and_grads(model, CausalLMLoss(model, "full", 1024), batch, n)
        assert torch.equal(got[0], want[0]) and all(torch.equal(got[1][k], g) for k, g in want[1].items())
    # Offload: on this CPU-only machine the hooks are pointed at the CPU itself, so every saved activation really
    # takes the copy-out / copy-back path; what it saves on a GPU is measured by bench/memory_features.py.
    import ft_dist.activations as activations

    model = tiny("llama", num_hidden_layers=4)
    model.train()
    loss = CausalLMLoss(model, "full", 1024)
    activations.MIN_BYTES, saved_min = 1024, activations.MIN_BYTES
    try:
        with offload_activations(True, device_type="cpu") as hooks:
            value = loss(model, batch, n)
    finally:
        activations.MIN_BYTES = saved_min
    value.backward()
    assert hooks.moved > 10
    assert torch.equal(value.detach(), want[0])
    for k, g in want[1].items():
        assert torch.equal(dict(model.named_parameters())[k].grad, g), k


_LOAD_PEAK = r"""
import sys, threading, time, torch
from pathlib import Path
from ft_dist.config import ModelConfig, PeftConfig
from ft_dist.models import load_quantized

def anon():  # anonymous resident memory: what a copy of the weights would need (mapped checkpoint pages are not)
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]) * 1024

load = lambda path: load_quantized(path, PeftConfig(method="qlora"), torch.float32, torch.float32,
                                   torch.device("cpu"), ModelConfig(name="x"), {})
load(sys.argv[2])  # a tiny model first: the imports and kernels a first load pulls in are not the weights
before, peak, done = anon(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon()); time.sleep(0.002)
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
model = load(sys.argv[1])
done.set()
sampler.join()
print(peak[0] - before, sum(t.numel() * t.element_size() for t in model.state_dict().values()))
"""


def test_qlora_base_loads_quantized_without_a_full_precision_copy(tmp_path):
    """The 4-bit base is quantized tensor by tensor as transformers reads it: the load's peak is the 4-bit model
    plus one weight in full precision, never a full-precision copy of the model."""
    import os
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import REPO

    cfg = LlamaConfig(vocab_size=1000, hidden_size=1024, intermediate_size=2752, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    big, warm = tmp_path / "big", tmp_path / "warm"
    LlamaForCausalLM(cfg).save_pretrained(big, max_shard_size="100MB")  # 4+ safetensors shards, 0.4 GB fp32
    assert len(list(big.glob("*.safetensors"))) >= 4
    LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4)).save_pretrained(warm)
    # A fixed mmap threshold makes glibc return every freed tensor to the OS, so RssAnon tracks live tensors (with
    # its default, rising threshold, freed tensors stay in the heap and the peak measures fragmentation).
    proc = subprocess.run([sys.executable, "-c", _LOAD_PEAK, str(big), str(warm)], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak, kept = map(int, proc.stdout.split()[-2:])  # RssAnon's peak growth; the loaded model's tensor bytes
    fp32, largest = 4 * n_params, 4 * cfg.hidden_size * cfg.intermediate_size  # the largest weight, in fp32
    print(f"{n_params / 1e6:.0f}M parameters (fp32 {fp32 / 2**20:.0f} MiB, largest weight {largest / 2**20:.0f} MiB): "
          f"the 4-bit model keeps {kept / 2**20:.0f} MiB; the load peaked {peak / 2**20:.0f} MiB above the start")
    assert kept < 0.2 * fp32  # 4-bit blocks: 0.5 B of 4 per parameter, plus their constants and the fp32 rest
    assert peak < kept + 2 * largest  # one weight in full precision at a time (and its quantization scratch)
