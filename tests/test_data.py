"""Data pipeline on real files: readers, field mapping, template + masking, split, cache, and bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import LAMINI, NEOX_TOKENIZER, compose
from ft_dist.data.batching import GlobalBatchSampler, collate
from ft_dist.data.prepare import cache_key, prepare_dataset
from ft_dist.data.templates import render_prompt
from ft_dist.data.tokenize import IGNORE_INDEX
from ft_dist.errors import DataError
from ft_dist.models import build_char_tokenizer, load_tokenizer


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def data_cfg(path: Path, cache_dir: Path, *extra: str):
    return compose([f"data.path={path}", f"data.cache_dir={cache_dir}", *extra]).data


@pytest.fixture(scope="module")
def neox():
    from omegaconf import OmegaConf

    return load_tokenizer(OmegaConf.create({"tokenizer": str(NEOX_TOKENIZER), "name_or_path": None, "trust_remote_code": False}))


def test_labels_mask_exactly_prompt_and_padding(tmp_path, cache_dir):
    tok = build_char_tokenizer()
    rows = [{"question": f"q{i}" * (i + 1), "answer": f"a{i}"} for i in range(20)]
    cfg = data_cfg(write_jsonl(tmp_path / "d.jsonl", rows), cache_dir, "data.test_size=2")
    data = prepare_dataset(cfg, tok)
    examples = [data.train[i] for i in range(len(data.train))]
    for ex in examples:
        prompt_ids = tok(ex["prompt_text"])["input_ids"]
        response_ids = tok(ex["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ex["input_ids"] == prompt_ids + response_ids
        assert ex["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids
        assert ex["num_loss_tokens"] == len(response_ids)
    batch = collate(examples[:5], tok.pad_token_id)
    for row, ex in enumerate(examples[:5]):
        n, p = len(ex["input_ids"]), len(tok(ex["prompt_text"])["input_ids"])
        masked = (batch["labels"][row] == IGNORE_INDEX).nonzero().flatten().tolist()
        assert masked == list(range(p)) + list(range(n, batch["labels"].shape[1]))
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)


def test_template_renders_question_answer_style():
    assert render_prompt("qa", "What?") == "### Question:\nWhat?\n\n### Answer:\n"
    assert "### Input:\nctx" in render_prompt("alpaca", "Do it", "ctx")


def test_lamini_with_neox_tokenizer_masks_prompts(neox, cache_dir):
    cfg = data_cfg(LAMINI, cache_dir, "data.limit=200", "data.test_size=20", "data.max_seq_len=256")
    data = prepare_dataset(cfg, neox)
    assert len(data.train) + len(data.test) + data.stats["dropped"] == 200
    for ex in (data.train[i] for i in range(50)):
        p = len(neox(ex["prompt_text"])["input_ids"])
        assert all(x == IGNORE_INDEX for x in ex["labels"][:p])
        if len(ex["input_ids"]) < 256:  # not truncated: ends with the response and EOS
            assert ex["labels"][p:] == ex["input_ids"][p:] and ex["input_ids"][-1] == neox.eos_token_id


def test_split_is_deterministic_and_disjoint(tmp_path, cache_dir):
    tok = build_char_tokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(100)])
    a = prepare_dataset(data_cfg(path, cache_dir, "data.test_size=0.2"), tok)
    b = prepare_dataset(data_cfg(path, tmp_path / "other-cache", "data.test_size=0.2"), tok)  # rebuilt from scratch
    c = prepare_dataset(data_cfg(path, cache_dir, "data.test_size=0.2", "data.split_seed=7"), tok)
    assert a.test["source_line"] == b.test["source_line"] and len(a.test) == 20
    assert set(a.test["source_line"]) != set(c.test["source_line"])
    assert not set(a.train["source_line"]) & set(a.test["source_line"])
    assert len(a.train) == 80


def test_cache_is_reused_and_keyed_by_settings(tmp_path, cache_dir):
    tok = build_char_tokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(30)])
    first = prepare_dataset(data_cfg(path, cache_dir, "data.test_size=3"), tok)
    stamp = (first.cache_path / "stats.json").stat().st_mtime_ns
    again = prepare_dataset(data_cfg(path, cache_dir, "data.test_size=3"), tok)
    assert again.cache_path == first.cache_path and (again.cache_path / "stats.json").stat().st_mtime_ns == stamp
    assert cache_key(data_cfg(path, cache_dir, "data.test_size=3", "data.max_seq_len=64"), tok) != first.cache_path.name
    write_jsonl(path, [{"question": f"Q{i}", "answer": f"a{i}"} for i in range(30)])  # content changed
    assert cache_key(data_cfg(path, cache_dir, "data.test_size=3"), tok) != first.cache_path.name


def test_truncate_and_drop_are_counted(tmp_path, cache_dir):
    tok = build_char_tokenizer()
    rows = [{"question": "short", "answer": "ok"}] * 10 + [{"question": "long " * 20, "answer": "yes " * 10}] * 10
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cut = prepare_dataset(data_cfg(path, cache_dir, "data.test_size=2", "data.max_seq_len=160"), tok)
    assert cut.stats["truncated"] == 10 and cut.stats["dropped"] == 0
    assert max(len(x) for x in cut.train["input_ids"]) == 160
    drop = prepare_dataset(data_cfg(path, cache_dir, "data.test_size=2", "data.max_seq_len=160", "data.overlong=drop"), tok)
    assert drop.stats["dropped"] == 10 and len(drop.train) + len(drop.test) == 10


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
def test_other_formats_with_alpaca_fields(tmp_path, cache_dir, fmt):
    rows = [{"instruction": f"Add {i} and 1", "input": "" if i % 2 else f"n={i}", "output": str(i + 1)} for i in range(12)]
    path = tmp_path / f"d.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    data = prepare_dataset(compose(["data=alpaca", f"data.path={path}", f"data.cache_dir={cache_dir}", "data.test_size=2"]).data,
                           build_char_tokenizer())
    assert len(data.train) == 10
    with_context = [t for t in data.train["prompt_text"] if "### Input:\nn=" in t]
    assert with_context and all(t.startswith("Below is an instruction") for t in data.train["prompt_text"])


def test_prompt_completion_fields(tmp_path, cache_dir):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)])
    data = prepare_dataset(compose(["data=prompt_completion", f"data.path={path}", f"data.cache_dir={cache_dir}",
                                    "data.test_size=2"]).data, build_char_tokenizer())
    assert sorted(list(data.train["response"]) + list(data.test["response"])) == sorted(f"c{i}" for i in range(10))


def test_malformed_line_names_file_and_line(tmp_path, cache_dir):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "a", "answer": "b"}] * 2 + ['{"question": "c", "answer": ']
                       + [{"question": "d", "answer": "e"}])
    with pytest.raises(DataError) as info:
        prepare_dataset(data_cfg(path, cache_dir, "data.test_size=1"), build_char_tokenizer())
    assert f"{path}:3:" in str(info.value) and '{"question": "c"' in str(info.value)
    assert not any(p.name.startswith(".") or ".tmp-" in p.name for p in cache_dir.iterdir())  # nothing half-written


def test_missing_field_names_fields_present(tmp_path, cache_dir):
    path = write_jsonl(tmp_path / "f.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError) as info:
        prepare_dataset(data_cfg(path, cache_dir, "data.test_size=1"), build_char_tokenizer())
    msg = str(info.value)
    assert "'question'" in msg and "instruction, output" in msg and "data.prompt_field" in msg and f"{path}:1" in msg


def test_non_utf8_and_empty_files(tmp_path, cache_dir):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"question": "ok", "answer": "ok"}\n{"question": "caf\xe9", "answer": "x"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not UTF-8"):
        prepare_dataset(data_cfg(bad, cache_dir, "data.test_size=1"), build_char_tokenizer())
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        prepare_dataset(data_cfg(empty, cache_dir, "data.test_size=1"), build_char_tokenizer())


def test_global_batches_do_not_depend_on_world_size():
    one = GlobalBatchSampler(100, micro_batch=4, grad_accum=2, world_size=1, rank=0, seed=3)
    two = [GlobalBatchSampler(100, micro_batch=2, grad_accum=2, world_size=2, rank=r, seed=3) for r in range(2)]
    for step in range(25):  # crosses an epoch boundary (12 steps per epoch)
        merged = sorted(i for s in two for mb in s.micro_batches(step) for i in mb)
        assert merged == sorted(i for mb in one.micro_batches(step) for i in mb)
    assert one.global_indices(0) != one.global_indices(12)  # a new permutation each epoch
