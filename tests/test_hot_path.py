"""The training step's hot path, checked on CPU: one device-to-host read per optimizer step, batches collated ahead
in the sampler's order (worker processes or a thread), padding-free rows for flash-attention, torch.compile per
block, and the FLOP count behind MFU against a hand count.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import compose
from dist_utils import hooked_train_script, losses, single, torchrun

TINY_LLAMA = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


def tiny_llama(lora: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, attn_implementation="sdpa"))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    return model


def test_training_flops_match_a_hand_count_with_and_without_lora():
    from ft_dist.flops import catalog_gpu, peak_flops, training_flops

    h, i, v, layers, kv = 64, 160, 96, 2, 32  # kv = 2 KV heads x head_dim 16
    block = h * h + h * kv + h * kv + h * h + 3 * h * i  # q, k, v, o; gate, up, down
    dense = layers * block + h * v  # the LM head is a matmul, the embedding lookup is not
    attention = 6 * layers * h  # per s^2: q_dim = 4 heads x 16 = 64
    full = training_flops(tiny_llama())
    assert full.per_token == 6 * dense and full.attention_per_sq == attention
    # LoRA r=4 on q (64->4->64) and v (64->4->32): adapters train (6), the frozen base only forwards and passes
    # gradients to its input (4); no weight gradient for a frozen weight.
    adapters = layers * ((h * 4 + 4 * h) + (h * 4 + 4 * kv))
    lora = training_flops(tiny_llama(lora=True))
    assert lora.per_token == 4 * dense + 6 * adapters and lora.attention_per_sq == attention
    # A step: 100 tokens in sequences of 60 and 40.
    assert full.step(100, 60**2 + 40**2) == 6 * dense * 100 + attention * (60**2 + 40**2)

    # The peak: configured, else the catalog's for the GPU by name and memory, else none (CPU: no MFU).
    assert peak_flops(torch.device("cpu"), "bf16", 1.5) == 1.5e12
    assert peak_flops(torch.device("cpu"), "bf16") is None
    assert catalog_gpu("NVIDIA H100 80GB HBM3", 85.0)["peak_tflops"]["bf16"] == 989
    assert catalog_gpu("NVIDIA A100-SXM4-40GB", 42.5)["memory_gb"] == 40
    assert catalog_gpu("Tesla V100-SXM2-32GB", 34.0)["memory_gb"] == 32
    assert catalog_gpu("NVIDIA L4", 23.8)["peak_tflops"]["bf16"] == 121  # not the L40S
    assert catalog_gpu("NVIDIA GeForce RTX 4090", 25.0) is None


def test_padding_free_rows_give_the_padded_loss_and_the_boundaries_transformers_derives():
    """A micro-batch laid out as one row (collate_flat, what flash_attention_2 runs) has the loss of the same
    examples padded (collate), and carries the cu_seq_lens that transformers itself would derive from positions."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    from ft_dist.data.batching import collate, collate_flat

    g = torch.Generator().manual_seed(0)

    def example(n):
        ids = torch.randint(3, 96, (n,), generator=g).tolist()
        labels = [-100] * (n // 2) + ids[n // 2:]
        return {"input_ids": ids, "labels": labels}

    def packed(*lengths):  # one packed row: examples end to end, positions restarting
        row = {"input_ids": [], "labels": [], "position_ids": []}
        for n in lengths:
            e = example(n)
            row["input_ids"] += e["input_ids"]
            row["labels"] += [-100] + e["labels"][1:]
            row["position_ids"] += list(range(n))
        return row

    model = tiny_llama().eval()
    for rows in ([example(9), example(17), example(5)], [packed(7, 12), packed(20), packed(4, 4, 9)]):
        n_items = sum(sum(label != -100 for label in r["labels"]) for r in rows)
        padded, flat = collate(rows, pad_id=0), collate_flat(rows)
        assert flat["input_ids"].shape[0] == 1 and flat["input_ids"].shape[1] == sum(len(r["input_ids"]) for r in rows)
        with torch.no_grad():
            want = model(**padded, use_cache=False, num_items_in_batch=n_items).loss
            got = model(**flat, use_cache=False, num_items_in_batch=n_items).loss
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(flat["position_ids"])
        assert flat["cu_seq_lens_q"].tolist() == cu_q.tolist() == cu_k.tolist()
        assert flat["max_length_q"] == flat["max_length_k"] == int(max_q)


def test_batches_collated_ahead_are_the_sampler_s_in_workers_and_in_a_thread():
    from datasets import Dataset

    from ft_dist.data.batching import GlobalBatchSampler, collate, examples_from_rows
    from ft_dist.data.loader import StepDataset, step_batches

    g = torch.Generator().manual_seed(1)
    rows = []
    for k in range(40):
        n = int(torch.randint(4, 30, (1,), generator=g))
        ids = torch.randint(3, 96, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] + ids[1:], "num_loss_tokens": n - 1})
    data = Dataset.from_list(rows)
    sampler = GlobalBatchSampler(len(data), 4, 2, 2, 1, seed=7)  # rank 1 of 2
    dataset = StepDataset(data, sampler, pad_id=0, flatten=False)
    steps = range(1, 9)  # across an epoch boundary (5 steps an epoch), from a resumed step
    for workers in (0, 2):
        got = list(step_batches(dataset, steps, workers, pin=False))
        assert [s.step for s in got] == list(steps), workers
        for s in got:
            want = [collate(examples_from_rows(data[m]), 0) for m in sampler.micro_batches(s.step)]
            assert s.n_global == sum(data["num_loss_tokens"][i] for i in sampler.global_indices(s.step))
            assert len(s.batches) == 2 and all(
                torch.equal(a[k], b[k]) for a, b in zip(s.batches, want) for k in b
            ), (workers, s.step)
            assert s.tokens == sum(int(b["attention_mask"].sum()) for b in want)
            assert s.seq_sq == sum(int(n) ** 2 for b in want for n in b["attention_mask"].sum(1))
    # A consumer that stops early (preemption) ends the thread instead of leaving it blocked.
    it = step_batches(dataset, steps, 0, pin=False)
    next(it)
    it.close()


# Counts the host reads of tensors (.item(), float(), bool(), .tolist(), ...) that ft-dist's own code makes inside
# each optimizer step, from the step's first forward to the after-step hook; a library's reads inside its own code
# (e.g. the CPU optimizer's step counters) are not ft-dist's. The mode is thread-local, as the check needs: the data
# pipeline's thread and workers read CPU batches, never the device.
SYNC_COUNTER = """
import json, os, sys
from pathlib import Path
from torch.overrides import TorchFunctionMode

READS = {"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu"}
FT_DIST = os.path.join(os.path.dirname(hooks.__file__), "")
counts, where = {}, {}

class Reads(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS:
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(FT_DIST):
                counts[self.step] = counts.get(self.step, 0) + 1
                where.setdefault(self.step, []).append(f"{caller.f_code.co_filename}:{caller.f_lineno}")
        return func(*args, **(kwargs or {}))

mode = Reads()

def start(step, rank):
    mode.step = step
    counts[step] = 0
    mode.__enter__()
    return False

def stop(step, rank):
    mode.__exit__(None, None, None)
    out = Path(os.environ["SYNC_COUNT_DIR"]) / f"rank{rank}.json"
    out.write_text(json.dumps({"counts": counts, "where": where}))

hooks.install("nan_loss", start)
hooks.install("after_step", stop)
"""


def test_the_loop_reads_the_device_once_per_step_under_fsdp2_with_loader_workers(model_dir, cache_dir, tmp_path):
    """FSDP2 on 2 ranks, gradient accumulation 2, batches collated by a DataLoader worker: every step reads the
    device exactly once (the all-reduced loss/tokens/flags with the gradient norm), log steps included."""
    script = hooked_train_script(tmp_path, SYNC_COUNTER)
    out = tmp_path / "run"
    proc = torchrun([f"model.name_or_path={model_dir}", "model.from_config=false", "model.tokenizer=embedded:char",
                     f"data.cache_dir={cache_dir}", "data.limit=200", "data.test_size=20", "strategy=fsdp",
                     "train.max_steps=4", "train.micro_batch_size=2", "train.grad_accum=2", "train.log_every=2",
                     "train.num_workers=1", "train.peak_tflops=0.5", "eval.before_training=false",
                     "eval.max_examples=2", "eval.max_new_tokens=2", f"output_dir={out}"],
                    script=script, extra_env={"SYNC_COUNT_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["counts"] == {str(s): 1 for s in range(1, 5)}, (rank, seen["where"])
        assert all("ft_dist/dist.py:" in w for ws in seen["where"].values() for w in ws), seen["where"]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in logged if "tokens_per_s" in m]
    assert [m["step"] for m in steps] == [2, 4]
    for m in steps:  # MFU from the configured CPU peak: achieved TFLOP/s per device over 0.5
        assert m["tokens_per_s_per_gpu"] == pytest.approx(m["tokens_per_s"] / 2)
        assert m["mfu"] == pytest.approx(m["tflops_per_gpu"] / 0.5) and 0 < m["mfu"]


def test_compiled_blocks_train_like_eager(model_dir, cache_dir, tmp_path):
    """train.compile=true (torch.compile per block, inductor on CPU) against eager: the same losses over 3 AdamW
    steps to rtol 1e-4 (fused kernels reorder floating-point sums; nothing else differs)."""
    args = [f"model.name_or_path={model_dir}", "model.from_config=false", "model.tokenizer=embedded:char",
            f"data.cache_dir={cache_dir}", "data.limit=100", "data.test_size=10", "train.max_steps=3",
            "train.micro_batch_size=4", "train.log_every=1", "train.lr=1e-3", "train.warmup_steps=0",
            "eval.before_training=false", "eval.max_examples=2", "eval.max_new_tokens=2"]
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        cache = tmp_path / f"inductor-{compiled}"  # where inductor writes the kernels it generates
        proc = single([*args, f"train.compile={str(compiled).lower()}", f"output_dir={out}"],
                      extra_env={"TORCHINDUCTOR_CACHE_DIR": str(cache)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[compiled] = losses(out)
        assert any(cache.rglob("*.py")) == compiled, "the compiled run generated no kernels (or the eager one did)"
    assert len(runs[True]) == 3 and runs[True][-1] < runs[True][0]
    torch.testing.assert_close(torch.tensor(runs[True]), torch.tensor(runs[False]), rtol=1e-4, atol=1e-5)


def test_compile_and_flash_attention_refuse_what_they_cannot_run():
    from ft_dist.errors import ConfigError

    with pytest.raises(ConfigError, match="train.compile.*strategy=fsdp"):
        compose(["strategy=zero3", "train.compile=true"])
    with pytest.raises(ConfigError, match="flash-attn package.*use sdpa"):
        compose(["model.attn_implementation=flash_attention_2"])
