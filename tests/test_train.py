"""End-to-end finetuning through the real entry points: loss falls, outputs round-trip, LoRA merges exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import LAMINI, TINY_NEOX, compose, run_cli
from dist_utils import assert_readable_by_others, resumed_at

SHORT = ["train.max_steps=80", "train.eval_every=20", "train.eval_batches=2", "train.log_every=10",
         "eval.max_examples=24", "eval.max_new_tokens=24"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("demo-run")
    proc = run_cli("train", [f"output_dir={out}", f"data.cache_dir={cache_dir}", *SHORT])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def read_metrics(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_eval_loss_falls_and_outputs_are_written(demo_run):
    evals = [m["eval_loss"] for m in read_metrics(demo_run) if "eval_loss" in m]
    assert len(evals) == 4 and evals[-1] < evals[0] * 0.8, evals
    steps = [m for m in read_metrics(demo_run) if "loss" in m]
    assert steps[-1]["loss"] < steps[0]["loss"] and all(k in steps[0] for k in ("lr", "grad_norm", "tokens_per_s", "eta_s"))
    report = json.loads((demo_run / "eval.json").read_text())
    assert report["before"]["exact_match"] == 0.0 and report["after"]["eval_loss"] == pytest.approx(evals[-1])
    # The planner's self-check: its prediction for this exact config beside the train phase's measured RSS.
    check = report["planner_check"]
    assert check["phase"] == "train" and check["device"] == "cpu" and abs(check["error_rss"]) < 0.25, check
    events = [m for m in read_metrics(demo_run) if m.get("event") == "planner_check"]
    assert len(events) == 1 and all(events[0][k] == v for k, v in check.items())
    config = (demo_run / "config.yaml").read_text()
    assert "micro_batch_size: 32" in config and "max_steps: 80" in config and "${" not in config
    assert (demo_run / "final" / "model.safetensors").is_file() and (demo_run / "final" / "tokenizer.json").is_file()

    assert_readable_by_others(demo_run / "final")


def test_saved_model_round_trips_through_plain_transformers(demo_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ft_dist.eval.generation import generate

    model = AutoModelForCausalLM.from_pretrained(demo_run / "final")
    tok = AutoTokenizer.from_pretrained(demo_run / "final")
    samples = [json.loads(line) for line in (demo_run / "samples.jsonl").read_text().splitlines()]
    from ft_dist.data.templates import render_prompt

    outs = generate(model, tok, [render_prompt("qa", s["prompt"]) for s in samples], 24, 8, torch.device("cpu"), progress=False)
    assert [o.text for o in outs] == [s["prediction"] for s in samples]


def test_eval_and_generate_commands(demo_run, cache_dir):
    proc = run_cli("eval", [f"checkpoint={demo_run}", f"output_dir={demo_run / 'eval'}", f"data.cache_dir={cache_dir}",
                            "eval.max_examples=24", "eval.max_new_tokens=24"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((demo_run / "eval" / "eval.json").read_text())
    assert result["finetuned"]["eval_loss"] < result["base"]["eval_loss"]
    assert "exact_match" in proc.stdout and "before" in proc.stdout
    proc = run_cli("generate", [f"checkpoint={demo_run}", "prompt='Extract the city from: name=Ada Stone; city=Oslo; job=chef; year=1970'",
                                "eval.max_new_tokens=24"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() and len(proc.stdout.strip().splitlines()) == 1


def test_a_run_dir_remembers_its_model_and_data(tmp_path, cache_dir):
    """ft-eval / ft-generate checkpoint=<run> read the run's model, data and template from its config.yaml."""
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Name {i}", "output": f"n{i}"}) + "\n" for i in range(40)))
    run = tmp_path / "run"
    proc = run_cli("train", [f"output_dir={run}", f"data.cache_dir={cache_dir}", f"data.path={data}", "data.template=alpaca",
                             "data.prompt_field=instruction", "data.response_field=output", "train.max_steps=2", "train.save_every=2",
                             "eval.before_training=false", "eval.max_examples=2", "eval.max_new_tokens=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("eval", [f"checkpoint={run}", f"output_dir={tmp_path / 'eval'}", f"data.cache_dir={cache_dir}",
                            "eval.max_examples=0", "eval.max_new_tokens=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["finetuned"]["examples"] == 4  # the run's own test split (10 % of 40), not the demo's 200
    proc = run_cli("generate", [f"checkpoint={run}", "prompt='Name 3'", "eval.max_new_tokens=2", "data.cache_dir=" + str(cache_dir)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Resuming in the run dir needs none of the data settings again (it used to stop: "data.path: ... differs").
    again = run_cli("train", [f"output_dir={run}", f"data.cache_dir={cache_dir}", "train.max_steps=2", "train.save_every=2",
                              "eval.before_training=false",
                              "eval.max_examples=2", "eval.max_new_tokens=2"])
    assert again.returncode == 0 and resumed_at(run) == 2, again.stderr[-3000:]
    bad = run_cli("eval", [f"checkpoint={run}", "model=llama-2-7b", f"output_dir={tmp_path / 'x'}"])
    assert bad.returncode == 2 and bad.stderr.strip() == (
        f"error: config error: model: {run} was trained with model 'tiny', not 'llama-2-7b'; drop model=llama-2-7b "
        "(the run's config.yaml supplies it) or pass another checkpoint")


def test_eval_rejects_a_directory_without_a_model(tmp_path):
    proc = run_cli("eval", [f"checkpoint={tmp_path}"], timeout=120)
    assert proc.returncode == 2 and "checkpoint" in proc.stderr and "Traceback" not in proc.stderr


# GPT-NeoX has biases on the LoRA-adapted layers (query_key_value, dense, ...): they pass through the merge unchanged.
@pytest.mark.parametrize("model", [[], TINY_NEOX], ids=["llama", "gpt_neox"])
def test_merged_lora_logits_equal_adapter_logits(model, tmp_path, cache_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ft_dist.checkpoint import save_final_model
    from ft_dist.models import apply_peft, build_model, load_tokenizer, model_tensors

    cfg = compose([*model, "peft=lora", "peft.r=4", f"data.cache_dir={cache_dir}"])
    tok = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = apply_peft(build_model(cfg.model, tok), cfg.peft)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([tok("### Question:\nExtract the job from: job=chef\n\n### Answer:\nchef")["input_ids"]])
    for _ in range(5):  # move the adapters off their zero init
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        adapter_logits = model(input_ids=ids).logits
    save_final_model(iter([model_tensors(model)]), model, tok, cfg, tmp_path / "final")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(build_model(cfg.model, tok), tmp_path / "final" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapter_logits, rtol=1e-6, atol=1e-6)


def test_pythia_from_config_with_real_neox_tokenizer_on_lamini(tmp_path, cache_dir):
    from ft_dist.commands.train import run

    cfg = compose([*TINY_NEOX, "data=lamini", f"data.path={LAMINI}", f"data.cache_dir={cache_dir}", "data.max_seq_len=128",
                   "data.limit=400", "data.test_size=40", "train.max_steps=30", "train.lr=2e-3", "train.micro_batch_size=8",
                   "train.eval_every=10", "train.eval_batches=2", "train.warmup_steps=5", "eval.before_training=false",
                   "eval.max_examples=4", "eval.max_new_tokens=8", f"output_dir={tmp_path}"])
    assert run(cfg) == 0
    evals = [m["eval_loss"] for m in read_metrics(tmp_path) if "eval_loss" in m]
    assert evals[-1] < evals[0], evals
    assert (tmp_path / "final" / "config.json").read_text().count('"gpt_neox"') == 1
    # Naming the run's own model option again keeps the run's settings of it (from_config, the local tokenizer),
    # not conf/model/pythia-70m.yaml's hub tokenizer, which is out of reach offline.
    proc = run_cli("eval", [f"checkpoint={tmp_path}", "model=pythia-70m", f"output_dir={tmp_path / 'eval'}",
                            "eval.max_examples=2", "eval.max_new_tokens=2", f"data.cache_dir={cache_dir}"],
                   env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["base"]["examples"] == 2
