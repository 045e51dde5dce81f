"""`ft-data generate` end to end: a tiny model finetuned here to emit the reply format (some replies parse, some do
not), served by a real `transformers serve` on 127.0.0.1, and run locally in one process and under torchrun on 2;
a SIGKILL mid-run and a resume; the one-line errors of bad input. No mock stands in for the server or the model."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import REPO
from dist_utils import env, free_port, torchrun

from ft_dist.generate.prompt import render
from ft_dist.generate.schema import PromptConfig

DATA = REPO / "launch" / "data.py"
TEMPLATE = "Pairs {n_pairs} {style}: {chunk} JSON:"
SECRET = "sk-test-secret-4b9d1e"
# What the finetuned model learns to reply per city: well-formed and grounded (Oslo, Paris, Rome), malformed (Lima), a
# too-short answer (Bern), an answer not in the text (Cairo).
REPLIES = {
    "Oslo": '[{"question": "What is Oslo?", "answer": "Oslo is the capital of Norway."}]',
    "Paris": '[{"question": "What is Paris?", "answer": "Paris is the capital of France."}]',
    "Rome": '[{"question": "What is Rome?", "answer": "Rome is the capital of Italy."}]',
    "Lima": "Sorry, no pairs here.",
    "Bern": '[{"question": "Bern?", "answer": "no"}]',
    "Cairo": '[{"question": "What is Cairo?", "answer": "zzz qqq www vvv."}]',
}
FACTS = {"Oslo": "Oslo is the capital of Norway.", "Paris": "Paris is the capital of France.",
         "Rome": "Rome is the capital of Italy."}
FILL = ["It has a port.", "Many people live there.", "The winters are cold.", "It is old.", "Trains run often."]
COMMON = ["chunk_tokens=80", "chunk_overlap=10", f"prompt.template='{TEMPLATE}'", "prompt.n_pairs=1",
          "generate.max_new_tokens=90"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded tiny model finetuned (ft-train, 200 steps) on prompts rendered by the real template."""
    root = tmp_path_factory.mktemp("gen-model")
    rng = random.Random(0)
    cfg = PromptConfig(template=TEMPLATE, n_pairs=1)
    with (root / "train.jsonl").open("w") as fh:
        for _ in range(400):
            city = rng.choice(list(REPLIES))
            sentences = [f"{city} is a city.", *rng.sample(FILL, 2)]
            if city in FACTS and rng.random() < 0.5:
                sentences.append(FACTS[city])
            rng.shuffle(sentences)
            fh.write(json.dumps({"question": render(cfg, " ".join(sentences)), "answer": REPLIES[city]}) + "\n")
    run = root / "run"
    r = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), f"data.path={root / 'train.jsonl'}",
                        "data.template=plain", "data.test_size=4", "train.max_steps=200", "train.eval_every=1000",
                        "train.micro_batch_size=16", "eval.before_training=false", f"output_dir={run}"],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return run / "final"


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of .txt/.md/.html/.jsonl documents, and a target dataset whose test split holds the Paris question."""
    d = tmp_path_factory.mktemp("gen-docs")
    (d / "a.txt").write_text("Oslo is a city. It has a port. Oslo is the capital of Norway. Many people live there. "
                             "The winters are cold.")  # two chunks
    (d / "e.txt").write_text("Rome is a city. Rome is the capital of Italy. Trains run often.")
    (d / "b.md").write_text("Paris is a city. Paris is the capital of France. It is old.")
    (d / "c.html").write_text("<html><body><p>Lima is a city.</p><script>var x;</script><p>It is old.</p></body></html>")
    rows = ["Bern is a city. The winters are cold.", "Cairo is a city. It is old.",
            "Oslo is a city. Oslo is the capital of Norway. It is old."]
    (d / "more").mkdir()
    (d / "more" / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    target = d.parent / "target.jsonl"
    target.write_text("".join(json.dumps({"question": "What is Paris?", "answer": f"Paris {i}."}) + "\n"
                              for i in range(10)))
    return d


@pytest.fixture(scope="module")
def server(trained: Path):
    """`transformers serve` (OpenAI-compatible, FastAPI + uvicorn) on 127.0.0.1 with the finetuned model."""
    port = free_port()
    exe = Path(sys.executable).parent / "transformers"
    proc = subprocess.Popen([str(exe), "serve", str(trained), "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu"], env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            time.sleep(0.5)
    yield url + "/v1"
    proc.terminate()
    proc.wait(timeout=30)


def generate(args: List[str], launcher: str = "single", key: str | None = SECRET, **kw) -> subprocess.CompletedProcess:
    extra = {"OPENAI_API_KEY": key} if key else {}
    if launcher == "torchrun":
        return torchrun(["generate", *args], nproc=2, extra_env=extra, script=DATA, **kw)
    return subprocess.run([sys.executable, str(DATA), "generate", *args], cwd=REPO, env=env(extra),
                          capture_output=True, text=True, **kw)


def rows(path: Path) -> List[Dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def served(url: str, model: Path, docs: Path, out: Path) -> List[str]:
    return [f"inputs=[{docs}]", f"output={out}", "generate.backend=openai", f"generate.base_url={url}",
            f"generate.model={model}", "generate.api=completions", f"generate.tokenizer={model}",
            "generate.concurrency=2", f"target_data={docs.parent / 'target.jsonl'}", *COMMON]


def test_through_a_real_server_then_sigkill_and_resume(server, trained, docs, tmp_path):
    """Pairs with provenance, every filter counted as reported, the key in no file; the output trains as is
    (ft-data report reads it as training would); then a run killed with SIGKILL mid-way and resumed ends with
    exactly the same pairs, none lost or doubled."""
    out = tmp_path / "full" / "generated.jsonl"
    r = generate(served(server, trained, docs, out), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out.parent / "generated.jsonl.report.json").read_text())
    kept = rows(out)
    print("server run report:", json.dumps(report))
    assert report["chunks_done"] == report["chunks"] >= 8
    assert len(kept) == report["kept"] > 0
    assert report["pairs_parsed"] == report["kept"] + sum(report["filtered"].values())
    assert report["malformed"] >= 1 and report["retried"] >= 1  # Lima's reply never parses
    for name in ("duplicate", "test_overlap", "ungrounded", "too_short"):
        assert report["filtered"][name] >= 1, name
    for row in kept:
        assert set(row["provenance"]) == {"document", "chunk_id", "generator", "prompt_hash"}
        assert row["provenance"]["chunk_id"].startswith(row["provenance"]["document"] + "#")
        assert row["answer"] in Path(row["provenance"]["document"].rsplit(":", 1)[0]).read_text()  # grounded
    assert len({(k["question"], k["answer"]) for k in kept}) == len(kept)  # no duplicates left
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and not any(SECRET in p.read_text(errors="replace") for p in written)
    assert SECRET not in r.stdout + r.stderr
    rep = subprocess.run([sys.executable, str(DATA), "report", f"data.path={out}", "data.test_size=1",
                          f"output_dir={tmp_path / 'report'}"], cwd=REPO, env=env(), capture_output=True, text=True,
                         timeout=120)
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert json.loads((tmp_path / "report" / "report.json").read_text())["stats"]["records"] == len(kept)

    # SIGKILL once the first batch is on disk (concurrency=1: one chunk a batch), then resume.
    killed = tmp_path / "killed" / "generated.jsonl"
    args = [*served(server, trained, docs, killed), "generate.concurrency=1"]
    proc = subprocess.Popen([sys.executable, str(DATA), "generate", *args], cwd=REPO,
                            env=env({"OPENAI_API_KEY": SECRET}), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = killed.parent / "generated.jsonl.parts" / "rank-0.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (part.exists() and part.read_text().count("\n") >= 2):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = part.read_text().count("\n")
    assert 2 <= before < report["chunks"], "killed before or after the work it should have cut short"
    assert not killed.exists()  # the output is only ever written whole, at the end
    print(f"killed after {before} of {report['chunks']} chunks")
    with part.open("a") as fh:  # what a kill inside a write leaves: a last line without its newline
        fh.write('{"chunks": [{"chunk_id": "torn')
    r2 = generate(args, timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert f"{before} done before" in r2.stdout
    ids = [c["chunk_id"] for line in part.read_text().splitlines() for c in json.loads(line)["chunks"]]
    assert len(ids) == len(set(ids)) == report["chunks"]  # every chunk once: nothing redone, nothing lost
    assert rows(killed) == kept
    r3 = generate(args, timeout=300)  # all done: nothing generated again, the same output
    assert r3.returncode == 0 and f"{report['chunks']} done before, 0 to do" in r3.stdout, r3.stderr[-2000:]
    assert rows(killed) == kept and part.read_text().count("\n") == before + (report["chunks"] - before)
    r4 = generate([*args, "prompt.n_pairs=2"], timeout=300)  # another prompt never resumes into these parts
    assert r4.returncode == 2 and "prompt.n_pairs" in r4.stderr and len(r4.stderr.strip().splitlines()) == 1, r4.stderr
    # The default API, chat completions, against a model without a chat template: the server answers 500 to every
    # request. One line before any chunk is read, not a run of replies counted malformed.
    chat = [a for a in served(server, trained, docs, tmp_path / "chat" / "g.jsonl") if not a.startswith("generate.api")]
    r5 = generate(chat, timeout=120)
    lines = r5.stderr.strip().splitlines()
    assert r5.returncode == 2 and len(lines) == 1 and "generate.api" in lines[0] and "500" in lines[0], r5.stderr
    assert "generate.api=completions" in lines[0] and not (tmp_path / "chat").exists()


def test_local_backend_two_ranks_equal_one(trained, docs, tmp_path):
    """The local HF backend under torchrun on 2 processes writes the same pairs as one process."""
    base = [f"inputs=[{docs}]", "generate.backend=local", f"generate.model_path={trained}",
            "generate.batch_size=2", *COMMON]
    one, two = tmp_path / "one" / "g.jsonl", tmp_path / "two" / "g.jsonl"
    r1 = generate([*base, f"output={one}"], timeout=300)
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = generate([*base, f"output={two}"], launcher="torchrun", timeout=300)
    assert r2.returncode == 0, r2.stdout[-2000:] + r2.stderr[-2000:]
    a, b = rows(one), rows(two)
    print("local run report:", (one.parent / "g.jsonl.report.json").read_text())
    assert a and a == b
    assert len(list((two.parent / "g.jsonl.parts").glob("rank-*.jsonl"))) == 2  # both ranks generated


def test_bad_input_is_one_line_and_fast(trained, docs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "generate.base_url": [f"inputs=[{docs}]", "output=o.jsonl", "generate.backend=openai",
                              f"generate.base_url=http://127.0.0.1:{free_port()}/v1", "generate.model=m",
                              f"generate.tokenizer={trained}"],
        "generate.model_path": [f"inputs=[{docs}]", "output=o.jsonl", f"generate.model_path={tmp_path / 'nope'}"],
        "inputs": [f"inputs=[{empty}]", "output=o.jsonl", f"generate.model_path={trained}"],
        "prompt.template": [f"inputs=[{docs}]", "output=o.jsonl", f"generate.model_path={trained}",
                            "prompt.template='no placeholder here'"],
    }
    for key, args in cases.items():
        start = time.monotonic()
        r = generate(args, timeout=60)
        took = time.monotonic() - start
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and key in lines[0], (key, r.stderr)
        assert took < 15, (key, took)


def test_chunks_overlap_replies_are_strict_and_near_duplicates_are_caught():
    """The pieces the end-to-end runs cannot steer: token windows overlap by chunk_overlap, a reply with a wrong
    key or stray text is malformed, and a reworded pair is a near duplicate (datasketch MinHash) but another is not."""
    from ft_dist.generate.chunking import chunk_documents
    from ft_dist.generate.documents import Document, html_text
    from ft_dist.generate.filters import DuplicateIndex, grounding
    from ft_dist.generate.replies import parse_reply
    from ft_dist.generate.schema import FilterConfig
    from ft_dist.models import build_char_tokenizer

    text = "".join(chr(ord("a") + i % 26) for i in range(250))
    chunks = chunk_documents([Document("d", text)], build_char_tokenizer(), size=100, overlap=20)
    assert [c.text for c in chunks] == [text[0:100], text[80:180], text[160:250]]
    assert parse_reply('[{"question": "q", "answer": "a"}]', "qa") == [("q", "a")]
    for bad in ('[{"question": "q", "reply": "a"}]', 'Sure! [{"question": "q", "answer": "a"}]', "[]",
                '[{"question": "q", "answer": 3}]', '{"question": "q", "answer": "a"}'):
        assert parse_reply(bad, "qa") is None, bad
    assert parse_reply('[{"instruction": "i", "response": "r"}]', "instruction") == [("i", "r")]
    index = DuplicateIndex(FilterConfig())
    assert index.verdict("What is the capital of Norway?", "Oslo is the capital city of Norway, on a fjord.") is None
    assert index.verdict("what is  the capital of Norway?", "Oslo is the capital city of Norway, on a fjord.") == \
        "duplicate"
    assert index.verdict("What is the capital of Norway?", "Oslo is the capital city of Norway, on a fjord!") == \
        "near_duplicate"
    assert index.verdict("What is the capital of France?", "Paris lies on the Seine and is the capital.") is None
    assert grounding("Oslo is the capital of Norway.", "Oslo is a city. Oslo is the capital of Norway.") == 1.0
    assert grounding("zzz qqq", "Oslo is a city.") == 0.0
    assert html_text("<p>Lima is a city.</p><script>var x;</script><style>p{}</style><p>Old.</p>") == \
        "Lima is a city.\nOld."


def test_the_embedded_generator_task_and_documents_are_what_their_builders_write(tmp_path):
    """The README walkthrough's assets: deterministic, and each generator reply is one the pipeline parses into the
    pairs it promises, grounded in the record the request holds."""
    from ft_dist.generate.demo import ASKED, TEMPLATE, write_assets
    from ft_dist.generate.filters import pair_verdict
    from ft_dist.generate.replies import parse_reply
    from ft_dist.generate.schema import FilterConfig
    from ft_dist.runtime import ASSET_DIR

    write_assets(tmp_path)
    for name in ("demo_generator.jsonl", "documents/registry.jsonl"):
        assert (tmp_path / name).read_bytes() == (ASSET_DIR / name).read_bytes(), name
    prefix, suffix = TEMPLATE.split("{chunk}")
    prefix = prefix.replace("{n_pairs}", str(len(ASKED))).replace("{style}", "question/answer")
    for row in rows(ASSET_DIR / "demo_generator.jsonl")[:200]:
        assert row["question"].startswith(prefix) and row["question"].endswith(suffix)
        chunk = row["question"][len(prefix):-len(suffix)]
        pairs = parse_reply(row["answer"], "qa")
        assert pairs is not None and [q.split()[2] for q, _ in pairs] == list(ASKED)
        assert all(pair_verdict(q, a, chunk, FilterConfig(), set()) is None for q, a in pairs)
    documents = [r["text"] for r in rows(ASSET_DIR / "documents" / "registry.jsonl")]
    taught = {row["question"][len(prefix):-len(suffix)] for row in rows(ASSET_DIR / "demo_generator.jsonl")}
    assert len(documents) == 3000 and len(taught & set(documents)) < 10  # the documents are new to the generator
