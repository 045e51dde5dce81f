"""The memory planner against real models, DeepSpeed's estimators and MemTracker on real CPU tensors."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ft_dist.planner.api import plan
from ft_dist.planner.catalog import load_catalog
from ft_dist.planner.memory import estimate_memory, model_states
from ft_dist.planner.params import architecture, hf_config, with_layers
from ft_dist.planner.recommend import naive_table
from ft_dist.planner.trace import measure_step
from ft_dist.planner.workload import TrainingSetup

REPO = Path(__file__).resolve().parent.parent
MODEL_CONFS = sorted((REPO / "conf" / "model").glob("*.yaml"))
EXTRA_ARCHS = {
    "gpt2": dict(model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12),
    "qwen2": dict(model_type="qwen2", vocab_size=1000, hidden_size=256, intermediate_size=704, num_hidden_layers=3,
                  num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    "llama-mqa-bias": dict(model_type="llama", vocab_size=500, hidden_size=128, intermediate_size=344,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, attention_bias=True,
                           mlp_bias=True),
}


def _arch(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["arch"]


def _meta_model(arch: dict):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config(arch))


@pytest.mark.parametrize("arch", [_arch(p) for p in MODEL_CONFS] + list(EXTRA_ARCHS.values()),
                         ids=[p.stem for p in MODEL_CONFS] + list(EXTRA_ARCHS))
def test_param_counts_equal_meta_models(arch):
    from deepspeed.runtime.zero.stage3 import model_to_params

    model = _meta_model(arch)
    ours = architecture(arch)
    unique = sum({id(p): p.numel() for p in model.parameters()}.values())
    assert ours.total_params == unique
    # DeepSpeed's own count (data_ptr dedup is 0 on meta, so use its largest-layer rule only)
    _, largest = model_to_params(model)
    assert ours.largest_layer_params == largest


@pytest.mark.parametrize("params", [125e6, 1.3e9, 7e9, 70e9])
@pytest.mark.parametrize("nodes,gpus", [(1, 1), (1, 8), (2, 8), (4, 4)])
def test_model_states_equal_deepspeed_estimators(params, nodes, gpus):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    arch = architecture(dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_hidden_layers=max(1, round((params - 2 * 32000 * 4096) / 202383360)),
                             num_attention_heads=32))
    p, largest = arch.total_params, arch.largest_layer_params
    base = TrainingSetup(precision="bf16", nodes=nodes, gpus_per_node=gpus)
    for strategy, ds in (("zero2", lambda **k: estimate_zero2_model_states_mem_needs(p, cpu_offload=False, **k)),
                         ("zero2_offload", lambda **k: estimate_zero2_model_states_mem_needs(p, cpu_offload=True, **k)),
                         ("zero3", lambda **k: estimate_zero3_model_states_mem_needs(p, largest, cpu_offload=False,
                                                                                      **k)[:2]),
                         ("zero3_offload", lambda **k: estimate_zero3_model_states_mem_needs(p, largest, **k)[:2])):
        ds_cpu, ds_gpu = ds(num_gpus_per_node=gpus, num_nodes=nodes)
        s = model_states(arch, base.but(strategy=strategy))
        assert s.params + s.grads + s.optimizer == pytest.approx(ds_gpu, abs=4), strategy
        if nodes == 1:  # DeepSpeed's ZeRO-2 offload host term uses total GPUs and no /nodes: see docs/planner.md
            assert s.host_ram == pytest.approx(ds_cpu, rel=1e-9, abs=8), strategy


LLAMA = dict(model_type="llama", vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
LLAMA_GQA = dict(LLAMA, hidden_size=384, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=6,
                 num_key_value_heads=2)
NEOX = dict(model_type="gpt_neox", vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
            num_attention_heads=4, tie_word_embeddings=False)
LLAMA_32K = dict(LLAMA, vocab_size=32_000)  # fp32 logits of 1024 tokens: 125 MiB, a large share of the peak
LLAMA_4 = dict(LLAMA, num_hidden_layers=4)
GRID = [  # (arch, setup): sizes, batch, sequence, checkpointing, full vs LoRA, precision
    (LLAMA, TrainingSetup(precision="fp32", micro_batch=2, seq_len=256)),
    (LLAMA, TrainingSetup(precision="fp32", micro_batch=4, seq_len=128)),
    (LLAMA, TrainingSetup(precision="bf16", micro_batch=2, seq_len=256)),
    (LLAMA, TrainingSetup(precision="pure_bf16", micro_batch=2, seq_len=512)),
    (LLAMA, TrainingSetup(precision="fp32", micro_batch=2, seq_len=256, peft="lora")),
    (LLAMA, TrainingSetup(precision="bf16", micro_batch=2, seq_len=256, peft="lora")),
    (LLAMA, TrainingSetup(precision="fp32", micro_batch=4, seq_len=256, activation_checkpointing=True)),
    (LLAMA, TrainingSetup(precision="fp32", micro_batch=2, seq_len=256, attention="eager")),
    (LLAMA_GQA, TrainingSetup(precision="fp32", micro_batch=2, seq_len=256)),
    (LLAMA_GQA, TrainingSetup(precision="bf16", micro_batch=1, seq_len=512, peft="lora")),
    (LLAMA_GQA, TrainingSetup(precision="pure_bf16", micro_batch=4, seq_len=256, activation_checkpointing=True)),
    (NEOX, TrainingSetup(precision="fp32", micro_batch=2, seq_len=256)),
    (NEOX, TrainingSetup(precision="fp32", micro_batch=2, seq_len=256, peft="lora")),
    # LoRA's activations by target modules and dropout (each adapted projection keeps a dropped copy of its input).
    (LLAMA, TrainingSetup(precision="bf16", micro_batch=2, seq_len=256, peft="lora", lora_targets=("q_proj", "v_proj"))),
    (NEOX, TrainingSetup(precision="bf16", micro_batch=2, seq_len=256, peft="lora")),
    (NEOX, TrainingSetup(precision="pure_bf16", micro_batch=2, seq_len=256, peft="lora", lora_dropout=0.0)),
    (LLAMA, TrainingSetup(precision="fp32", micro_batch=2, seq_len=256, peft="lora", lora_dropout=0.0)),
    (LLAMA, TrainingSetup(precision="pure_bf16", micro_batch=2, seq_len=256, peft="lora")),  # fp32 adapters, bf16 base
    (LLAMA_GQA, TrainingSetup(precision="bf16", micro_batch=2, seq_len=256, peft="lora", lora_dropout=0.0,
                              lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"))),
    # The memory savers against their baselines (tests/test_memory_features.py checks they leave the loss alone).
    (LLAMA_32K, TrainingSetup(precision="fp32", micro_batch=2, seq_len=512, loss="full")),
    (LLAMA_32K, TrainingSetup(precision="fp32", micro_batch=2, seq_len=512, loss="chunked", loss_chunk_tokens=128)),
    (LLAMA_4, TrainingSetup(precision="fp32", micro_batch=2, seq_len=256)),
    (LLAMA_4, TrainingSetup(precision="fp32", micro_batch=2, seq_len=256, activation_checkpointing=True)),
    (LLAMA_4, TrainingSetup(precision="fp32", micro_batch=2, seq_len=256, activation_checkpointing=True,
                            checkpoint_every=2)),
]


def test_predicted_peak_and_its_growth_per_block_match_memtracker():
    """The peak within 10 %, and what each further block adds within 1 %: at 32-80 blocks that term is nearly all
    of the activations, which a two-block total alone would not show (a first-block error can hide a per-block one).
    Selective checkpointing is compared over `checkpoint_every` more blocks, so that the same share is recomputed."""
    errors, growth = [], []
    for arch, setup in GRID:
        setup = setup.but(device="cpu")
        layers = arch["num_hidden_layers"]
        deeper = with_layers(arch, layers + setup.checkpoint_every)
        measured = measure_step(arch, setup, fake=False).total
        predicted = estimate_memory(architecture(arch), setup).total
        errors.append((predicted / measured - 1, arch["model_type"], setup))
        added = measure_step(deeper, setup, fake=False).total - measured
        growth.append((estimate_memory(architecture(deeper), setup).total - predicted) / added - 1)
    worst = max(errors, key=lambda e: abs(e[0]))
    print("\n".join(f"{100 * e:+.1f}% (per block {100 * g:+.1f}%) {m} {s}" for (e, m, s), g in zip(errors, growth)))
    assert abs(worst[0]) <= 0.10, worst
    assert max(abs(g) for g in growth) <= 0.01, growth


def test_trace_mode_fake_tensors_match_real_and_scale_in_depth():
    setup = TrainingSetup(precision="fp32", micro_batch=2, seq_len=128, device="cpu")
    arch3 = dict(LLAMA, num_hidden_layers=3)
    real = measure_step(arch3, setup, fake=False).total
    from ft_dist.planner.trace import trace_full_depth

    traced = trace_full_depth(LLAMA, setup, layers=3, few=2).total
    assert traced == pytest.approx(real, rel=0.05)


def test_naive_table_reproduces_the_course_table():
    expected = {"p3.2xlarge": (7e9, 1e9), "p3.8xlarge": (7e9, 1e9), "p3.16xlarge": (7e9, 1e9),
                "p3dn.24xlarge": (14e9, 2e9), "p4d.24xlarge": (18e9, 2.5e9), "p4de.24xlarge": (32e9, 5e9)}
    rows = {r.instance: r for r in naive_table(load_catalog())}
    for name, (infer, train) in expected.items():
        assert rows[name].max_training_params == train
        assert rows[name].max_inference_params == pytest.approx(infer, rel=0.15)
        assert rows[name].zero3_node_training_params == train * rows[name].gpus


def test_planning_70b_over_the_catalog_is_fast_and_finds_a_fit():
    arch = _arch(REPO / "conf" / "model" / "llama-2-70b.yaml")
    start = time.perf_counter()
    result = plan(arch, tokens=1e8)
    assert time.perf_counter() - start < 2.0
    assert result.best is not None and result.best.fits
    assert result.best.strategy in ("zero3", "zero3_offload", "fsdp")  # 70B needs parameter sharding
    assert all(c.reason for c in result.candidates if not c.fits)
    assert all(c.memory.total <= c.usable_bytes for c in result.candidates if c.fits)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "plan.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


@pytest.mark.parametrize("args,key", [(("model=nope", "plan.tokens=1e6"), "model"),
                                      (("plan.tokens=-5",), "plan.tokens"),
                                      (("plan.tokens=1e6", "plan.instance=p9.huge"), "plan.instance")])
def test_bad_input_is_one_line_exit_2(args, key):
    out = _cli(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], out.stderr


def test_cli_json_has_the_promised_fields(tmp_path):
    import json

    out = _cli("model=llama-2-7b", "plan.tokens=1e7", "plan.format=json", "plan.instance=p4de.24xlarge",
               f"plan.output_dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["params"] == architecture(_arch(REPO / "conf" / "model" / "llama-2-7b.yaml")).total_params
    assert {"instance", "max_inference_params", "max_training_params"} <= set(data["naive"][0])
    cand = data["candidates"][0]
    for key in ("instance", "nodes", "gpus_per_node", "strategy", "micro_batch", "grad_accum",
                "activation_checkpointing", "fits", "per_gpu_bytes", "host_ram_bytes", "tokens_per_second",
                "hours", "cost_usd", "reason"):
        assert key in cand
    assert {"params", "grads", "optimizer", "activations", "allocator", "cuda_context", "allocated", "reserved", "total"} <= set(cand["per_gpu_bytes"])
    assert (tmp_path / "memory.png").stat().st_size > 1000
    assert "torchrun --nnodes" in (tmp_path / "launch.sh").read_text()


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_planned_deepspeed_buckets_are_the_ones_ft_dist_configures(strategy):
    from conftest import compose
    from ft_dist.planner.memory import ds_buckets
    from ft_dist.strategies.deepspeed import deepspeed_config

    cfg = compose(["model=llama-2-7b", f"strategy={strategy}"])
    zero = deepspeed_config(cfg.strategy, cfg.train, world_size=8, on_gpu=True, hidden=4096)["zero_optimization"]
    planned = ds_buckets(4096)
    assert zero["reduce_bucket_size"] == planned["reduce"] and zero["allgather_bucket_size"] == planned["allgather"]
    if strategy == "zero3":  # on GPUs; on CPU ft-dist turns prefetching off
        assert zero["stage3_prefetch_bucket_size"] == int(planned["prefetch"])


def test_plan_yaml_is_the_run_it_planned_memory_savers_included(tmp_path):
    from conftest import compose

    out = _cli("model=llama-2-7b", "plan.tokens=1e7", "plan.instance=p4de.24xlarge", "plan.peft=qlora",
               "plan.lora_rank=8", "plan.optimizer=paged_adamw_8bit", "plan.loss=chunked", "plan.seq_len=1024",
               "plan.activation_checkpointing=true", "plan.checkpoint_every=2", "plan.offload_activations=true",
               f"plan.output_dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    overrides = yaml.safe_load((tmp_path / "plan.yaml").read_text())["overrides"]
    cfg = compose(overrides)  # ft-train accepts it: validated like a command line
    assert (cfg.peft.method, cfg.peft.r, cfg.train.optimizer, cfg.train.loss) == ("qlora", 8, "paged_adamw_8bit", "chunked")
    assert (cfg.model.gradient_checkpointing, cfg.model.checkpoint_every, cfg.train.offload_activations) == (True, 2, True)
    assert cfg.data.max_seq_len == 1024 and cfg.strategy.name in ("single", "ddp")  # bitsandbytes' optimizers


def _plan_in_process(capsys, *overrides: str) -> str:
    """ft-plan in this process (composed and validated as the CLI does): its stdout."""
    from conftest import compose_plan

    from ft_dist.commands.plan import run

    assert run(compose_plan(list(overrides))) == 0
    return capsys.readouterr().out


def test_memory_only_plan_covers_v100_in_fp16_and_explains_rejections(capsys, tmp_path):
    out = _plan_in_process(capsys, "model=llama-2-7b", "plan.output_dir=")
    assert "memory-only plan" in out and "cost $" not in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("p3.", "p3dn."))]
    fits = [r for r in rows if len(r) == 11]  # instance nodes strategy prec mb acc AC alloc resv GPU tok/s
    assert {r[0] for r in fits} >= {"p3dn.24xlarge"} and all(r[3] == "fp16" for r in fits), out
    assert "V100-32GB has no bf16: fp16 mixed precision with loss scaling" in out
    rejected = [line for line in out.splitlines() if line.startswith("  ") and "GiB): " in line]
    assert rejected and all("largest term" in line or "runs" in line or "RAM" in line for line in rejected), out

    # On one V100 instance, with FlashAttention-2 asked for: the written run is fp16 + SDPA, and ft-train takes it.
    import json

    from conftest import compose

    data = json.loads(_plan_in_process(capsys, "model=llama-2-7b", "plan.instance=p3dn.24xlarge", "plan.peft=lora",
                                       "plan.attention=flash_attention_2", "plan.format=json",
                                       f"plan.output_dir={tmp_path}"))
    fsdp = [c for c in data["candidates"] if c["strategy"] == "fsdp"]
    assert fsdp and all(not c["fits"] and "FSDP2 runs fp32 or bf16" in c["reason"] for c in fsdp)  # as ft-train
    assert all(c["per_gpu_bytes"]["total"] > 0 for c in data["candidates"])  # rejected ones show their figure too
    text = (tmp_path / "plan.yaml").read_text()
    assert "# V100-32GB has no bf16" in text and "FlashAttention-2 needs Ampere" in text
    cfg = compose(yaml.safe_load(text)["overrides"])
    assert (cfg.train.precision, cfg.model.attn_implementation, cfg.peft.method) == ("fp16", "sdpa", "lora")


def test_any_architecture_from_a_config_json_with_its_count_checked(capsys, tmp_path):
    import json

    from ft_dist.planner.params import meta_param_count

    arch = dict(model_type="qwen3", vocab_size=4000, hidden_size=256, intermediate_size=768, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=96, tie_word_embeddings=False)
    model_dir = tmp_path / "my-qwen3"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({**arch, "architectures": ["Qwen3ForCausalLM"],
                                                       "torch_dtype": "bfloat16"}))
    out = _plan_in_process(capsys, f"model.config={model_dir / 'config.json'}", "plan.format=json",
                           "plan.instance=g5.xlarge", "plan.peft=lora", f"plan.output_dir={tmp_path / 'plan'}")
    data = json.loads(out)
    assert data["model"] == "my-qwen3" and data["params"] == data["params_meta_build"] == meta_param_count(arch)
    assert data["best"]["fits"] and data["best"]["instance"] == "g5.xlarge"
    overrides = yaml.safe_load((tmp_path / "plan" / "plan.yaml").read_text())["overrides"]
    assert f"model.name_or_path={model_dir}" in overrides
    planned = json.loads((tmp_path / "plan" / "config.json").read_text())
    assert {k: planned[k] for k in arch} == arch


def test_arch_overrides_stay_consistent_or_fail_in_one_line():
    from ft_dist.errors import ConfigError

    base = _arch(REPO / "conf" / "model" / "llama-3.2-1b.yaml")
    assert architecture(dict(base, hidden_size=4096)).head_dim == 128  # derived again, not the file's 64
    for change, key in ((dict(num_key_value_heads=5), "model.arch.num_key_value_heads"),
                        (dict(hidden_size=2050), "model.arch"),
                        (dict(num_hidden_layers=0), "model.arch.num_hidden_layers"),
                        (dict(hiden_size=4096), "model.arch.hiden_size")):
        with pytest.raises(ConfigError) as err:
            architecture(dict(base, **change))
        assert str(err.value).count("\n") == 0 and key in str(err.value), err.value


def test_fsdp_cpu_offload_keeps_model_states_on_the_host(tmp_path, capsys):
    arch = architecture(_arch(REPO / "conf" / "model" / "llama-2-70b.yaml"))
    setup = TrainingSetup(nodes=1, gpus_per_node=8, micro_batch=1, seq_len=2048, activation_checkpointing=True)
    on_gpu, offloaded = (estimate_memory(arch, setup.but(strategy=s)) for s in ("fsdp", "fsdp_offload"))
    states = 16 * arch.total_params / 8  # fp32 weights, grads and Adam moments of one rank's shard
    assert on_gpu.model_states == pytest.approx(states, rel=0.01)
    assert offloaded.model_states == offloaded.params == offloaded.grads == offloaded.optimizer == 0
    assert offloaded.host_ram >= 8 * states and offloaded.total < on_gpu.total - states
    from conftest import compose

    _plan_in_process(capsys, "model=llama-2-70b", "plan.instance=p4d.24xlarge", "plan.strategy=fsdp_offload",
                     "plan.nodes=2", f"plan.output_dir={tmp_path}")  # 1.1 TB of fp32 states: > one node's RAM
    cfg = compose(yaml.safe_load((tmp_path / "plan.yaml").read_text())["overrides"])
    assert cfg.strategy.name == "fsdp" and cfg.strategy.cpu_offload


def test_cli_zero3_model_states_equal_deepspeed_for_the_real_model(capsys):
    import json

    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params

    arch = _arch(REPO / "conf" / "model" / "llama-2-7b.yaml")
    total, largest = model_to_params(_meta_model(arch))
    total = architecture(arch).total_params  # model_to_params dedups by data_ptr, which is 0 on meta
    data = json.loads(_plan_in_process(capsys, "model=llama-2-7b", "plan.format=json", "plan.instance=p4de.24xlarge",
                                       "plan.strategy=zero3", "plan.nodes=2", "plan.output_dir="))
    _, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=8, num_nodes=2,
                                                      cpu_offload=False)
    assert data["best"]["model_states_bytes_per_gpu"] == pytest.approx(gpu, abs=4)


def test_planner_matches_published_gpu_peaks():
    """bench/planner_validation.py's acceptance, kept from regressing: the planner against published, measured
    peaks (bench/planner_points.yaml, each with its source): median |error| <= 10 %, >= 70 % of points within
    +-10 %, and none beyond +-35 % without a named cause."""
    sys.path.insert(0, str(REPO / "bench"))
    import planner_validation as pv

    points = yaml.safe_load(pv.POINTS.read_text())
    used = [p for p in points if not p.get("excluded")]
    assert len(used) >= 25 and all(p.get("url") and p.get("quote") for p in used)
    summary = pv.summary(pv.evaluate(used))
    assert summary["median_abs_error"] <= 0.10 and summary["within_10pct"] >= 0.70, summary
    assert summary["beyond_35pct_without_cause"] == [], summary
