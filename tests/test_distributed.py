"""Every strategy with real processes on CPU/gloo: same losses and weights as one process with the same global batch.

Tolerance: fp32 everywhere, dropout off (its masks depend on how the batch is split); strategies differ from the single-process run only in the order of floating-point
reductions (all-reduce, reduce-scatter, partitioned updates), so losses agree to rtol 1e-4 and final weights to
atol 2e-5 after 5 AdamW steps at lr 1e-3. The ranks' gathered weights must agree exactly.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from dist_utils import PARAM_DIGEST_HOOKS, digests, env, final_weights, free_port, hooked_train_script, losses, single, torchrun

pytestmark = pytest.mark.slow
STEPS = 5


def common(model_dir: Path, cache_dir: Path, out: Path, *extra: str):
    return [f"model.name_or_path={model_dir}", "model.from_config=false", "model.tokenizer=embedded:char",
            f"data.cache_dir={cache_dir}", "data.limit=400", "data.test_size=40", f"train.max_steps={STEPS}",
            "train.log_every=1", "train.eval_every=0", "train.warmup_steps=0", "train.lr=1e-3",
            "eval.before_training=false", "eval.max_examples=4", "eval.max_new_tokens=4", f"output_dir={out}", *extra]


@pytest.fixture(scope="module")
def reference(model_dir, cache_dir, tmp_path_factory):
    """Single-process runs, global batch 8 = micro 4 x accum 2, full and LoRA."""
    runs = {}
    for name, extra in (("full", []), ("lora", ["peft=lora", "peft.r=4", "peft.dropout=0"])):
        out = tmp_path_factory.mktemp(f"ref-{name}")
        proc = single(common(model_dir, cache_dir, out, "train.micro_batch_size=4", "train.grad_accum=2", *extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = out
    return runs


def assert_matches(run: Path, ref: Path) -> None:
    got, want = losses(run), losses(ref)
    assert len(got) == STEPS and want[-1] < want[0]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-5)
    ranks = digests(run)
    assert len(ranks) == 2 and ranks[0] == ranks[1], "ranks disagree on the gathered weights"
    a, b = final_weights(run), final_weights(ref)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5, msg=k)


@pytest.fixture(scope="module")
def digesting(tmp_path_factory) -> Path:
    """launch/train.py with the parameter-digest hooks installed (tests/dist_utils.py)."""
    return hooked_train_script(tmp_path_factory.mktemp("hooks"), PARAM_DIGEST_HOOKS)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"])
def test_strategy_matches_single_process(strategy, model_dir, cache_dir, reference, tmp_path, digesting):
    proc = torchrun(common(model_dir, cache_dir, tmp_path, f"strategy={strategy}", "train.micro_batch_size=2",
                           "train.grad_accum=2"), script=digesting)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "global batch 8 = micro 2 x accum 2 x world 2" in proc.stdout
    # The default loss is chunked under every strategy (FSDP2 wraps the untied head as its own FSDPLinear unit).
    assert "loss: chunked cross-entropy" in proc.stdout
    assert_matches(tmp_path, reference["full"])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
def test_lora_under_strategy_matches_single_process(strategy, model_dir, cache_dir, reference, tmp_path, digesting):
    proc = torchrun(common(model_dir, cache_dir, tmp_path, f"strategy={strategy}", "train.micro_batch_size=2",
                           "train.grad_accum=2", "peft=lora", "peft.r=4", "peft.dropout=0"), script=digesting)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert re.search(r"\d[\d,]* trainable \(lora\)", proc.stdout)
    assert_matches(tmp_path, reference["lora"])


def test_two_nodes_on_one_host(model_dir, cache_dir, reference, tmp_path, digesting):
    port = free_port()
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend",
            "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"ft-{port}"]
    args = common(model_dir, cache_dir, tmp_path, "strategy=ddp", "train.micro_batch_size=2", "train.grad_accum=2")
    procs = [subprocess.Popen([*node, str(digesting), *args], cwd=REPO, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert sum("global batch 8 = micro 2 x accum 2 x world 2" in o for o, _ in outs) == 1  # rank 0 only logs
    assert_matches(tmp_path, reference["full"])


def test_deepspeed_launcher(model_dir, cache_dir, reference, tmp_path, digesting):
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    proc = torchrun(common(model_dir, cache_dir, tmp_path, "strategy=zero2", "train.micro_batch_size=2",
                           "train.grad_accum=2"), launcher=launcher, script=digesting)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_matches(tmp_path, reference["full"])


def test_zero3_never_materialises_the_full_model(cache_dir, tmp_path):
    # ~110M parameters (440 MB in fp32) built from config under zero.Init: each parameter is partitioned as it is
    # created, so a rank's memory grows by about its half, never by the whole model.
    out = tmp_path / "run"
    args = ["model.arch.hidden_size=1024", "model.arch.intermediate_size=4096", "model.arch.num_hidden_layers=8",
            "model.arch.num_attention_heads=8", "model.arch.num_key_value_heads=8",
            f"data.cache_dir={cache_dir}", "data.limit=64", "data.test_size=8", "data.max_seq_len=192",
            "train.max_steps=1", "train.micro_batch_size=1", "eval.before_training=false", "eval.max_examples=1",
            "eval.max_new_tokens=2", f"output_dir={out}", "strategy=zero3"]
    # A fixed mmap threshold makes glibc return each freed full-size tensor to the OS at once, so RSS tracks the
    # memory actually live (with its default dynamic threshold, freed blocks linger in the heap and RSS only grows).
    proc = torchrun(args, extra_env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = re.search(r"this rank holds ([\d.]+) MB of ([\d.]+) MB of parameters; peak RSS grew ([\d.]+) MB while building",
                  proc.stdout)
    assert m, proc.stdout[-3000:]
    local, full, grew = map(float, m.groups())
    assert full > 400 and local == pytest.approx(full / 2, rel=0.05)
    # Had the whole model existed at once on this rank, RSS would have grown by at least `full`.
    assert grew < full, f"building the model grew RSS by {grew} MB, the full model is {full} MB"


def test_failure_on_one_rank_ends_all_with_one_message(cache_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\n{"question": \n' * 3)
    start = time.time()
    proc = torchrun([f"data.path={bad}", f"data.cache_dir={tmp_path / 'cache'}", "strategy=ddp",
                     f"output_dir={tmp_path / 'run'}"], timeout=300)
    assert proc.returncode != 0 and time.time() - start < 120
    assert proc.stderr.count(f"{bad}:2:") == 1, proc.stderr[-3000:]
