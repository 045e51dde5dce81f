"""The run: chunk, generate this rank's batches (skipping those already in the parts files), then rank 0 merges.

Batches are cut from the full chunk list in its fixed order and batch b goes to rank b % world: a batch has the
same chunks at any world size, so greedy replies (padding included) are the same as in one process.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Set

from ft_dist import dist
from ft_dist.atomic_io import atomic_write_text
from ft_dist.generate import output
from ft_dist.generate.backends import Generator
from ft_dist.generate.chunking import Chunk
from ft_dist.generate.filters import ORDER_FILTERS, PAIR_FILTERS, DuplicateIndex, pair_verdict
from ft_dist.generate.prompt import prompt_hash, render
from ft_dist.generate.replies import parse_reply
from ft_dist.generate.schema import STYLE_FIELDS, DataGenerateConfig


def generate_chunks(
    cfg: DataGenerateConfig, chunks: List[Chunk], generator: Generator, test_texts: Set[str], unit: int
) -> None:
    """This rank's batches of `unit` chunks that no parts file has yet, appended batch by batch."""
    out = Path(cfg.output)
    world = dist.world()
    done = {r["chunk_id"] for r in output.read_parts(out)}
    part = output.parts_dir(out) / f"rank-{world.rank}.jsonl"
    batches = [chunks[i : i + unit] for i in range(0, len(chunks), unit)]
    mine = [b for n, b in enumerate(batches) if n % world.size == world.rank]
    todo = [[c for c in b if c.chunk_id not in done] for b in mine]
    todo = [b for b in todo if b]
    total = sum(len(b) for b in todo)
    dist.log(f"generate: {len(chunks)} chunks, {len(done)} done before, {total} to do here ({world.size} ranks)")
    start, finished, pairs, malformed = time.monotonic(), 0, 0, 0
    for batch in todo:
        records = _generate_batch(cfg, batch, generator, test_texts)
        output.append_batch(part, records)
        finished += len(batch)
        pairs += sum(len(r["pairs"]) for r in records)
        malformed += sum(r["malformed"] for r in records)
        eta = (time.monotonic() - start) / finished * (total - finished)
        dist.log(f"  chunks {finished}/{total}  pairs parsed {pairs}  malformed {malformed}  eta {eta:.0f}s")


def _generate_batch(
    cfg: DataGenerateConfig, batch: List[Chunk], generator: Generator, test_texts: Set[str]
) -> List[Dict[str, Any]]:
    prompts = [render(cfg.prompt, c.text) for c in batch]
    parsed: List[Any] = [None] * len(batch)
    attempts = [0] * len(batch)
    pending = list(range(len(batch)))
    for _ in range(1 + cfg.generate.malformed_retries):  # bounded: a reply that never parses counts as malformed
        replies = generator.complete([prompts[i] for i in pending])
        for i, reply in zip(pending, replies):
            attempts[i] += 1
            parsed[i] = parse_reply(reply, cfg.prompt.style)
        pending = [i for i in pending if parsed[i] is None]
        if not pending:
            break
    records = []
    for c, pairs, n in zip(batch, parsed, attempts):
        verdicts = [
            {"q": q, "a": a, "drop": pair_verdict(q, a, c.text, cfg.filters, test_texts)} for q, a in pairs or []
        ]
        records.append(
            {"chunk_id": c.chunk_id, "doc": c.doc_id, "attempts": n, "malformed": pairs is None, "pairs": verdicts}
        )
    return records


def _row(style: str, q: str, a: str, provenance: Dict[str, Any]) -> Dict[str, Any]:
    if style == "chat":
        return {
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            "provenance": provenance,
        }
    first, second = STYLE_FIELDS[style]
    return {first: q, second: a, "provenance": provenance}


def merge(cfg: DataGenerateConfig, chunks: List[Chunk], generator_name: str) -> Dict[str, Any]:
    """Rank 0: the output rebuilt from every parts file in chunk order, duplicates filtered in that order; returns
    the report (also written beside the output)."""
    out = Path(cfg.output)
    order = {c.chunk_id: n for n, c in enumerate(chunks)}
    by_id = {r["chunk_id"]: r for r in output.read_parts(out) if r["chunk_id"] in order}
    index = DuplicateIndex(cfg.filters)
    counts: Dict[str, int] = {k: 0 for k in (*PAIR_FILTERS, *ORDER_FILTERS)}
    rows: List[Dict[str, Any]] = []
    phash = prompt_hash(cfg.prompt)
    replies = malformed = retried = parsed = 0
    for cid in sorted(by_id, key=order.__getitem__):
        r = by_id[cid]
        replies += r["attempts"]
        retried += r["attempts"] - 1
        malformed += r["malformed"]
        for p in r["pairs"]:
            parsed += 1
            drop = p["drop"] or index.verdict(p["q"], p["a"])
            if drop:
                counts[drop] += 1
                continue
            prov = {"document": r["doc"], "chunk_id": cid, "generator": generator_name, "prompt_hash": phash}
            rows.append(_row(cfg.prompt.style, p["q"], p["a"], prov))
    output.write_jsonl(out, rows)
    report = {
        "chunks": len(chunks),
        "chunks_done": len(by_id),
        "replies": replies,
        "retried": retried,
        "malformed": malformed,
        "pairs_parsed": parsed,
        "filtered": counts,
        "kept": len(rows),
        "generator": generator_name,
        "prompt_hash": phash,
        "output": str(out),
    }
    atomic_write_text(output.report_path(out), json.dumps(report, indent=2) + "\n")
    return report
