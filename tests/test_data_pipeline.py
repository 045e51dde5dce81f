"""Data pipeline, issue 3: sources and mixing, chat templates and masking, length policy, hygiene, bad input,
num_proc, rank-0 preparation and the quality report, on real files, the real GPT-NeoX tokenizer and lamini_docs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import LAMINI, NEOX_TOKENIZER, REPO, compose, run_cli
from ft_dist.data.prepare import prepare_dataset
from ft_dist.data.templates import CHATML_JINJA, render_prompt
from ft_dist.data.tokenize import IGNORE_INDEX
from ft_dist.errors import ConfigError, DataError
from ft_dist.models import build_char_tokenizer, load_tokenizer

TEST_COLUMNS = {"prompt", "prompt_text", "response", "input_ids", "labels", "num_loss_tokens", "source_line"}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def data_cfg(cache_dir: Path, *overrides: str):
    return compose([f"data.cache_dir={cache_dir}", *overrides]).data


@pytest.fixture(scope="module")
def neox():
    from omegaconf import OmegaConf

    return load_tokenizer(OmegaConf.create({"tokenizer": str(NEOX_TOKENIZER), "name_or_path": None, "trust_remote_code": False}))


def trained_text(tok, ex) -> str:
    return tok.decode([i for i, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE_INDEX])


# ---------------------------------------------------------------- sources


def test_folder_and_glob_read_every_format(tmp_path, cache_dir):
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"question": f"ja{i}", "answer": "x"} for i in range(5)])
    (folder / "b.csv").write_text("question,answer\n" + "".join(f"cb{i},y\n" for i in range(4)))
    pq.write_table(pa.Table.from_pylist([{"question": f"pc{i}", "answer": "z"} for i in range(3)]), folder / "c.parquet")
    (folder / "notes.txt").write_text("not data")  # other file types in a folder are ignored
    whole = prepare_dataset(data_cfg(cache_dir, f"data.path={folder}", "data.test_size=2"), build_char_tokenizer())
    assert whole.stats["records"] == 12 and len(whole.train) + len(whole.test) == 12
    only_jsonl = prepare_dataset(data_cfg(cache_dir, f"data.path={folder}/*.jsonl", "data.test_size=1"), build_char_tokenizer())
    assert sorted(list(only_jsonl.train["prompt"]) + list(only_jsonl.test["prompt"])) == [f"ja{i}" for i in range(5)]
    with pytest.raises(ConfigError, match="matches none"):
        data_cfg(cache_dir, f"data.path={folder}/*.xml")


def test_hf_dataset_with_split_from_local_repo(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # no hub here: a local dataset repository folder
    repo = tmp_path / "hfrepo" / "data"
    repo.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"question": f"t{i}", "answer": "a"} for i in range(10)]), repo / "train-00000.parquet")
    pq.write_table(pa.Table.from_pylist([{"question": f"v{i}", "answer": "b"} for i in range(6)]), repo / "test-00000.parquet")
    data = prepare_dataset(data_cfg(cache_dir, f"data.path=hf:{repo.parent}", "data.hf_split=test", "data.test_size=2"),
                           build_char_tokenizer())
    assert sorted(list(data.train["prompt"]) + list(data.test["prompt"])) == [f"v{i}" for i in range(6)]
    with pytest.raises(DataError, match="could not load HF dataset.*split 'nope'"):
        prepare_dataset(data_cfg(cache_dir, f"data.path=hf:{repo.parent}", "data.hf_split=nope", "data.test_size=2"),
                        build_char_tokenizer())


def test_sources_mixed_with_weights(tmp_path, cache_dir):
    a = write_jsonl(tmp_path / "a.jsonl", [{"question": f"a{i}", "answer": "x"} for i in range(40)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "y"} for i in range(40)])
    sources = (f"data.sources=[{{path: '{a}', name: A, weight: 2}}, {{path: '{b}', name: B, weight: 0.5, "
               f"prompt_field: prompt, response_field: completion}}]")
    data = prepare_dataset(data_cfg(cache_dir, "data.path=null", sources, "data.test_size=20"), build_char_tokenizer())
    per = data.stats["per_source"]
    assert per["A"]["test"] + per["B"]["test"] == 20 and len(data.test) == 20  # test split is not reweighted
    assert per["A"]["train"] == 2 * (40 - per["A"]["test"])  # every A example twice
    assert per["B"]["train"] == round(0.5 * (40 - per["B"]["test"]))  # a seeded half of B
    a_prompts = [p for p in data.train["prompt"] if p.startswith("a")]
    assert len(set(a_prompts)) * 2 == len(a_prompts)
    assert not set(list(data.train["prompt"])) & set(list(data.test["prompt"]))


# ---------------------------------------------------------------- templates and masking


def test_named_templates():
    assert render_prompt("qa", "What?") == "### Question:\nWhat?\n\n### Answer:\n"
    assert render_prompt("alpaca", "Do it").startswith("Below is an instruction") and "### Response:\n" in render_prompt("alpaca", "x")
    assert render_prompt("chatml", "Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt("plain", "p", "c") == "p\nc"
    with pytest.raises(ConfigError, match="data.template"):
        render_prompt("nope", "x")


def chat_rows(n: int):
    return [{"messages": [{"role": "system", "content": "Answer briefly."},
                          {"role": "user", "content": f"What is {i} plus one?"},
                          {"role": "assistant", "content": f"It is {i + 1}."},
                          {"role": "user", "content": "And doubled?"},
                          {"role": "assistant", "content": f"That is {2 * (i + 1)}."}]} for i in range(n)]


def test_chat_chatml_multiturn_loss_on_assistant_turns_only(tmp_path, cache_dir, neox):
    path = write_jsonl(tmp_path / "chat.jsonl", chat_rows(12))
    data = prepare_dataset(data_cfg(cache_dir, "data=chat", f"data.path={path}", "data.test_size=2"), neox)
    assert TEST_COLUMNS <= set(data.test.column_names)
    for ex in data.test:
        i = int(ex["response"].split()[-1].rstrip(".")) // 2 - 1
        assert trained_text(neox, ex) == f"It is {i + 1}.<|im_end|>\nThat is {2 * (i + 1)}.<|im_end|>\n<|endoftext|>"
        assert ex["prompt"] == "And doubled?"
        # What generate is given: every turn before the last answer, then the assistant header.
        assert ex["prompt_text"].startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n")
        assert ex["prompt_text"].endswith(f"It is {i + 1}.<|im_end|>\n<|im_start|>user\nAnd doubled?<|im_end|>\n<|im_start|>assistant\n")
        assert neox.decode(ex["input_ids"]).startswith(ex["prompt_text"])
        assert ex["num_loss_tokens"] == sum(1 for x in ex["labels"] if x != IGNORE_INDEX)
    everything = prepare_dataset(data_cfg(cache_dir, "data=chat", f"data.path={path}", "data.test_size=2",
                                          "data.train_on_prompt=true"), neox)
    ex = everything.train[0]
    assert ex["labels"][1:] == ex["input_ids"][1:] and ex["labels"][0] == IGNORE_INDEX


def test_ft_data_show_marks_the_tokens_that_get_loss(tmp_path, cache_dir):
    path = write_jsonl(tmp_path / "chat.jsonl", chat_rows(6))
    proc = run_cli("data", ["show", "data=chat", f"data.path={path}", "data.test_size=2", "show_examples=2",
                            f"model.tokenizer={NEOX_TOKENIZER}", f"data.cache_dir={cache_dir}", f"output_dir={tmp_path / 'o'}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = (tmp_path / "o" / "examples.md").read_text()
    assert shown.count("--- example ") == 2 and shown.strip() in proc.stdout
    first = shown.split("--- example 1")[1].split("--- example 2")[0]
    # Both assistant turns carry loss, with their end-of-turn tokens; system and user turns do not.
    marked = [m.split("\u00bb")[0] for m in first.split("\u00ab")[1:]]
    assert len(marked) == 2 and marked[0].startswith("It is ") and marked[1].startswith("That is ")
    assert all("<|im_end|>" in m and "user" not in m for m in marked)
    assert "<|im_start|>system\nAnswer briefly." in first and "Answer briefly" not in "".join(marked)


def test_tokenizer_own_chat_template_and_system_prompt(tmp_path, cache_dir, neox):
    from omegaconf import OmegaConf

    tok = load_tokenizer(OmegaConf.create({"tokenizer": str(NEOX_TOKENIZER), "name_or_path": None, "trust_remote_code": False}))
    tok.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")  # Zephyr style
    rows = [{"messages": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": f"hello {i}"}]} for i in range(8)]
    path = write_jsonl(tmp_path / "sharegpt.jsonl", rows)
    data = prepare_dataset(data_cfg(cache_dir, "data=chat", f"data.path={path}", "data.template=tokenizer",
                                    "data.system_prompt=Be kind.", "data.test_size=2"), tok)
    ex = data.test[0]
    n = ex["response"].split()[-1]
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": f"hi {n}"},
                {"role": "assistant", "content": f"hello {n}"}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert ex["input_ids"] == tok(rendered)["input_ids"]  # exactly the tokenizer's own rendering (ends with EOS)
    assert trained_text(tok, ex) == f"hello {n}<|endoftext|>"
    with pytest.raises(ConfigError, match="this one has none"):
        prepare_dataset(data_cfg(cache_dir, "data=chat", f"data.path={path}", "data.template=tokenizer", "data.test_size=2"), neox)
    assert "{% for message in messages %}" in CHATML_JINJA


# ---------------------------------------------------------------- length policy


def test_truncation_side_and_drop_counts(tmp_path, cache_dir):
    tok = build_char_tokenizer()
    rows = [{"question": "P" * 100, "answer": f"answer {i}"} for i in range(10)] + [{"question": f"s{i}", "answer": "ok"} for i in range(10)]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    left = prepare_dataset(data_cfg(cache_dir, f"data.path={path}", "data.test_size=2", "data.max_seq_len=60",
                                    "data.truncation_side=left"), tok)
    assert left.stats["truncated"] == 10 and left.stats["dropped"] == 0
    cut = [ex for ex in left.train if len(ex["input_ids"]) == 60]
    assert cut and all(tok.decode(ex["input_ids"]).endswith(ex["response"] + "<eos>") for ex in cut)  # response kept
    assert all(trained_text(tok, ex) == ex["response"] + "<eos>" for ex in cut)
    right = prepare_dataset(data_cfg(cache_dir, f"data.path={path}", "data.test_size=2", "data.max_seq_len=60"), tok)
    assert right.stats["dropped"] == 10  # the prompt alone fills 60 tokens: nothing left to learn, dropped
    dropped = prepare_dataset(data_cfg(cache_dir, f"data.path={path}", "data.test_size=2", "data.max_seq_len=60",
                                       "data.truncation_side=left", "data.overlong=drop"), tok)
    assert dropped.stats["dropped"] == 10 and dropped.stats["truncated"] == 10 and len(dropped.train) + len(dropped.test) == 10


# ---------------------------------------------------------------- split and hygiene


def test_dedup_after_normalisation_and_no_train_test_overlap(tmp_path, cache_dir):
    rows = [{"question": f"Question {i}", "answer": f"A{i}"} for i in range(30)]
    rows += [{"question": f"  question   {i} ", "answer": f"a{i}"} for i in range(10)]  # same after normalising
    rows += [{"question": "", "answer": "x"}, {"question": "q", "answer": "  "}]  # empty fields
    path = write_jsonl(tmp_path / "dups.jsonl", rows)
    data = prepare_dataset(data_cfg(cache_dir, f"data.path={path}", "data.test_size=0.25", "data.dedup=true"), build_char_tokenizer())
    assert data.stats["duplicates"] == 10 and data.stats["empty"] == 2 and data.stats["train_test_overlap"] == 0
    assert len(data.train) + len(data.test) == 30 and len(data.test) == 8  # ratio of the deduplicated 30
    keys = lambda ds: {" ".join(p.lower().split()) for p in ds["prompt"]}  # noqa: E731
    assert not keys(data.train) & keys(data.test)
    kept = prepare_dataset(data_cfg(cache_dir, f"data.path={path}", "data.test_size=10", "data.dedup=false"), build_char_tokenizer())
    assert kept.stats["duplicates"] == 0 and len(kept.train) + len(kept.test) == 40 and len(kept.test) == 10
    assert kept.stats["train_test_overlap"] >= 0  # reported, not hidden, when dedup is off


def test_lamini_with_neox_full_pipeline_stats(neox, cache_dir):
    data = prepare_dataset(data_cfg(cache_dir, "data=lamini", f"data.path={LAMINI}", "data.packing=true"), neox)
    s = data.stats
    assert s["records"] == 1400 and s["empty"] == 6 and s["duplicates"] == 2 and s["train_test_overlap"] == 0
    assert s["test"] == 139 and s["train"] == 1400 - 6 - 2 - 139 - s["dropped"]
    assert s["packing"]["efficiency"] >= 0.95 and s["packing"]["examples"] == s["train"]
    assert sum(data.train["num_examples"]) == s["train"] and sum(data.train["num_loss_tokens"]) > 0
    assert 0.5 < s["loss_token_share"] < 0.8 and s["lengths"]["p50"] > 50
    row = data.train[0]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    assert len(starts) == row["num_examples"] and all(row["labels"][i] == IGNORE_INDEX for i in starts)
    assert len(row["input_ids"]) <= 512 and set(data.test.column_names) >= TEST_COLUMNS


# ---------------------------------------------------------------- bad input


def test_on_error_skip_counts_and_names_lines(tmp_path, cache_dir):
    rows = [{"question": f"q{i}", "answer": "a"} for i in range(6)]
    path = write_jsonl(tmp_path / "bad.jsonl", rows[:3] + ['{"question": "broken", '] + [{"prompt": "wrong field"}] + rows[3:])
    with pytest.raises(DataError, match=r"bad.jsonl:4: malformed JSON"):
        prepare_dataset(data_cfg(cache_dir, f"data.path={path}", "data.test_size=1"), build_char_tokenizer())
    data = prepare_dataset(data_cfg(cache_dir, f"data.path={path}", "data.test_size=1", "data.on_error=skip"), build_char_tokenizer())
    assert data.stats["skipped"] == 2 and data.stats["records"] == 6
    assert "bad.jsonl:4:" in data.stats["skipped_examples"][0] and "fields present: prompt" in data.stats["skipped_examples"][1]
    # What ft-train prints about its data says so too (it used to read "0 dropped").
    assert "2 bad lines skipped (data.on_error=skip; first: " in data.summary() and "bad.jsonl:4:" in data.summary()


def test_a_csv_record_is_named_by_the_line_it_starts_on(tmp_path, cache_dir):
    # Record 1 spans lines 2-3, line 4 is blank, record 4 spans lines 7-8. Every error message names this line.
    path = tmp_path / "multi.csv"
    path.write_text('question,answer\n"two\nlines",a\n\nq2,b\nq3,c\n"q4","x\ny"\nq5,d\n')
    from ft_dist.data.sources import OK, SKIPPED, iter_records
    lines = [r["source_line"] for r in iter_records(data_cfg(cache_dir, f"data.path={path}", "data.on_error=skip"))]
    assert lines == [2, 5, 6, 7, 9]
    # A row with more values than the header has columns is a bad line (its columns no longer line up), not a record.
    path.write_text("question,answer\nq1,a\nq2,b,extra,fields\nq3,c\n")
    records = list(iter_records(data_cfg(cache_dir, f"data.path={path}", "data.on_error=skip")))
    assert [(r["source_line"], r["status"]) for r in records] == [(2, OK), (3, SKIPPED), (4, OK)]
    assert "4 values but the header has 2 columns" in records[1]["error"]


def test_a_user_file_gets_real_data_defaults_not_the_demos(tmp_path, cache_dir):
    # data.path=... on the default (demo) data group used to keep dedup off and test_size=200.
    path = tmp_path / "mine.csv"
    rows = [f"Q{i} é?,A{i}" for i in range(30)]
    path.write_text("question,answer\n" + "\n".join(rows + rows[:5]) + "\n")
    proc = run_cli("data", ["report", f"data.path={path}", f"model.tokenizer={NEOX_TOKENIZER}", f"data.cache_dir={cache_dir}",
                            f"output_dir={tmp_path / 'r'}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((tmp_path / "r" / "report.json").read_text())["stats"]
    assert s["duplicates"] == 5 and s["test"] == 3 and s["train"] == 27 and s["train_test_overlap"] == 0
    from ft_dist.commands.startup import compose_checked
    from ft_dist.config import validate

    cfg = compose_checked("train", [f"data.path={path}"], validate)  # what ft-train, ft-launch and ft-slurm compose
    assert cfg.data.name == "mine" and cfg.data.dedup and cfg.data.test_size == 0.1
    assert compose_checked("train", [f"data.path={path}", "data=lamini"], validate).data.name == "lamini"
    other = tmp_path / "alpaca.jsonl"
    other.write_text(json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n")
    with pytest.raises(DataError, match="fields present: instruction, output; this file looks like data.prompt_field=instruction"):
        prepare_dataset(compose_checked("train", [f"data.path={other}", f"data.cache_dir={cache_dir}"], validate).data,
                        build_char_tokenizer())


def test_one_line_errors_and_nothing_cached_on_failure(tmp_path):
    cache = tmp_path / "cache"
    chatty = write_jsonl(tmp_path / "chat.jsonl", chat_rows(3))
    with pytest.raises(DataError, match="set data.messages_field=messages"):
        prepare_dataset(data_cfg(cache, f"data.path={chatty}", "data.test_size=1"), build_char_tokenizer())
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"question": "", "answer": ""}] * 5)
    with pytest.raises(DataError, match="0 examples left after filtering \\(5 empty"):
        prepare_dataset(data_cfg(cache, f"data.path={blank}", "data.test_size=1"), build_char_tokenizer())
    latin = tmp_path / "latin1.csv"
    latin.write_bytes(b"question,answer\ncaf\xe9,x\n")
    with pytest.raises(DataError, match="latin1.csv: not UTF-8"):
        prepare_dataset(data_cfg(cache, f"data.path={latin}", "data.test_size=1"), build_char_tokenizer())
    for err in (DataError("x", "f.jsonl", 3), ConfigError("data.path", "y")):
        assert "\n" not in str(err)
    assert list(cache.iterdir()) == []  # no entry, no temporary directory left behind


# ---------------------------------------------------------------- scale: num_proc, rank 0 prepares


def test_num_proc_gives_identical_result(tmp_path, cache_dir, neox):
    path = write_jsonl(tmp_path / "n.jsonl", [{"question": f"What is item {i}?", "answer": f"Item {i} is {i * 7}."} for i in range(3000)])
    one = prepare_dataset(data_cfg(cache_dir, f"data.path={path}", "data.test_size=100"), neox)
    two = prepare_dataset(data_cfg(cache_dir, f"data.path={path}", "data.test_size=100", "data.num_proc=2"), neox)
    assert two.cache_path == one.cache_path  # num_proc does not change the result, so not the cache key either
    import shutil

    shutil.rmtree(one.cache_path)
    rebuilt = prepare_dataset(data_cfg(cache_dir, f"data.path={path}", "data.test_size=100", "data.num_proc=2"), neox)
    assert list(rebuilt.train["input_ids"]) == list(one.train["input_ids"]) and list(rebuilt.test["labels"]) == list(one.test["labels"])


RANK_SCRIPT = """
import json, os, sys, time
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
from conftest import compose
from ft_dist import dist
from ft_dist.data.prepare import builder_first, prepare_dataset
from ft_dist.models import build_char_tokenizer
dist.init("cpu", "gloo")
cfg = compose(["data.path={data}", "data.cache_dir=" + os.environ["CACHE"], "data.test_size=10",
               "data.cache_scope=" + os.environ["SCOPE"]]).data
with builder_first(cfg.cache_scope) as builds:
    pass
t = time.time()
data = prepare_dataset(cfg, build_char_tokenizer())
print(json.dumps({{"rank": dist.world().rank, "builds": builds, "cache": str(data.cache_path), "train": len(data.train)}}))
dist.close()
"""


@pytest.mark.parametrize("scope,local_ranks,builders", [("global", (0, 1), [True, False]), ("node", (0, 0), [True, True])])
def test_preparing_rank_builds_once_others_wait(tmp_path, scope, local_ranks, builders):
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(200)])
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"), data=data))
    port = str(29600 + os.getpid() % 300 + (7 if scope == "node" else 0))
    # cache_scope=node with two "nodes" on one host: each local rank 0 prepares into its own node-local dir.
    procs = []
    for rank in range(2):
        cache = tmp_path / (f"node{rank}" if scope == "node" else "shared")
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank),
               "LOCAL_RANK": str(local_ranks[rank]), "CACHE": str(cache), "SCOPE": scope, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert [r["builds"] for r in results] == builders
    assert all(r["train"] == 190 for r in results)
    dirs = {Path(r["cache"]).parent for r in results}
    assert len(dirs) == (2 if scope == "node" else 1)
    for d in dirs:  # exactly one complete entry per cache dir, no leftovers
        assert [p.name for p in d.iterdir()] == [Path(results[0]["cache"]).name]


# ---------------------------------------------------------------- quality report


def report_cfg(tmp_path, cache_dir, *overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import ft_dist.commands.startup as cli  # registers the commands' schemas
    from ft_dist.commands.schema import validate_data_run

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(cli.CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="data", overrides=[f"model.tokenizer={NEOX_TOKENIZER}", f"data.cache_dir={cache_dir}",
                                                           f"output_dir={tmp_path / 'report'}", *overrides])
    validate_data_run(cfg)
    return cfg


def test_report_counts_histogram_and_flags(tmp_path, cache_dir):
    from ft_dist.commands.data import run

    rows = [{"question": f"What does setting {i} do?", "answer": f"Setting {i} changes the batch size used."} for i in range(40)]
    rows[3]["answer"] = "time and money and time and money and time and money"
    rows[5]["answer"] = " ".join(["the model learns from examples of text"] * 8 + ["with care"])
    rows += [rows[0], {"question": "", "answer": "orphan"}]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    cfg = report_cfg(tmp_path, cache_dir, f"data.path={path}", "data.test_size=4", "data.packing=true", "data.max_seq_len=128",
                     "data.dedup=true")
    assert run(cfg) == 0
    out = tmp_path / "report"
    report = json.loads((out / "report.json").read_text())
    s = report["stats"]
    assert s["records"] == 42 and s["empty"] == 1 and s["duplicates"] == 1 and s["train"] + s["test"] == 40
    assert s["packing"]["efficiency"] > 0.5 and 0 < s["loss_token_share"] < 1
    flagged = [json.loads(x) for x in (out / "flagged.jsonl").read_text().splitlines()]
    assert {(f["source_line"], f["category"]) for f in flagged} >= {(4, "repetition"), (6, "too_long")}
    text = (out / "report.md").read_text()
    assert "duplicates 1" in text and "p50" in text and "#" in text and "packing:" in text
    # The bins span the data's own lengths (they used to span 0..max_seq_len), and the cut-off is marked.
    hist, lengths = s["lengths"]["histogram"], s["lengths"]
    assert hist["edges"][0] == lengths["min"] > 0 and hist["edges"][-2] <= lengths["max"] < hist["edges"][-1]
    assert sum(hist["counts"]) == s["train"] + s["test"] and "data.max_seq_len" in text
    assert (out / "lengths.png").read_bytes()[:4] == b"\x89PNG"


def test_ft_data_report_cli_on_lamini(tmp_path, cache_dir):
    proc = run_cli("data", ["report", "data=lamini", f"data.path={LAMINI}", f"model.tokenizer={NEOX_TOKENIZER}",
                            f"data.cache_dir={cache_dir}", f"output_dir={tmp_path}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "records 1400" in proc.stdout and "empty 6" in proc.stdout and "duplicates 2" in proc.stdout
    assert json.loads((tmp_path / "report.json").read_text())["stats"]["train_test_overlap"] == 0
    bad = run_cli("data", ["report", f"data.path={tmp_path / 'missing.jsonl'}", f"output_dir={tmp_path}/x"], timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "data.path" in bad.stderr


_COLUMN_PEAK = """
import resource, sys, tempfile
import numpy as np
from datasets import Dataset
from ft_dist.data.prepare import column
from ft_dist.data.split import split_train_test

n = 100_000
with tempfile.TemporaryDirectory() as tmp:
    def rows():  # streamed to disk, so the peak before the measurement stays low
        for i in range(n):
            yield {"key": i, "text": "lorem ipsum " * 40}

    ds = Dataset.from_generator(rows, cache_dir=tmp)
    train, _ = split_train_test(ds.select(np.arange(n)[::-1]), 1000, 0)  # index-mapped twice, as in preparation
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    keys = column(train, "key")
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert len(keys) == len(set(keys.tolist())) == n - 1000
    print(grown // 1024)
"""


def test_column_of_a_split_dataset_reads_only_that_column():
    # Preparation reads per-example numbers (keys, lengths, flags) of split datasets; gathering whole rows to get
    # them grew memory by ~0.5 KB per example (bench/data_prep.py: 1M examples). 100k int64 keys are 0.8 MB.
    proc = subprocess.run([sys.executable, "-c", _COLUMN_PEAK], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) < 16, f"peak RSS grew by {proc.stdout.split()[-1]} MiB"
