"""The quality report of a prepared dataset (`ft-data report|show`; the command is ft_dist/commands/data.py).

The report covers counts (records, skipped lines, empty fields, duplicates, train/test, per source), the token-
length distribution (a text table and a PNG histogram), truncation and drops, the share of loss tokens, packing
efficiency when packing is on, and responses with the problems classic error analysis looks for: repetition
loops and overly long answers, found by the detectors of ft_dist.eval.error_analysis. Files written to
`output_dir`: report.json, report.md (the printed text), lengths.png, flagged.jsonl.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, List

import numpy as np

from ft_dist.data.prepare import PreparedData
from ft_dist.data.tokenize import IGNORE_INDEX
from ft_dist.eval.error_analysis import Thresholds, find_repetition, find_too_long, words


def _responses(prepared: PreparedData) -> Iterator[Dict[str, Any]]:
    """Every example's response with where it came from (the unpacked test split, and train when unpacked)."""
    for split in ("train", "test"):
        ds = getattr(prepared, split)
        if "response" not in ds.column_names:  # packed rows hold no text
            continue
        for batch in ds.select_columns(["source", "source_line", "prompt", "response"]).iter(batch_size=1000):
            for source, line, prompt, response in zip(
                batch["source"], batch["source_line"], batch["prompt"], batch["response"]
            ):
                yield {"split": split, "source": source, "source_line": line, "prompt": prompt, "response": response}


def flag_responses(prepared: PreparedData, long_ratio: float) -> Dict[str, Any]:
    """Responses that loop (find_repetition) or run far past the typical length (find_too_long vs the median)."""
    word_counts = np.array([len(words(r["response"])) for r in _responses(prepared)])
    median = max(int(np.median(word_counts)), 1) if len(word_counts) else 1
    typical = ["w"] * median  # a median-length stand-in for the reference find_too_long compares against
    thresholds = Thresholds(max_length_ratio=long_ratio)
    flagged: List[Dict[str, Any]] = []
    counts = {"repetition": 0, "too_long": 0}
    for rec in _responses(prepared):
        tokens = words(rec["response"])
        for tag in (find_repetition(tokens), find_too_long(tokens, typical, thresholds)):
            if tag is not None:
                counts[tag.category] += 1
                flagged.append({**rec, "category": tag.category, "detail": tag.detail})
    return {"median_response_words": median, "counts": counts, "flagged": flagged}


def length_table(stats: Dict[str, Any]) -> str:
    """The token-length histogram as text: one line per bin with a bar."""
    hist = stats["lengths"]["histogram"]
    top = max(hist["counts"]) or 1
    lines = [f"{'tokens':>13} {'examples':>9}"]
    cut = hist.get("max_seq_len")
    for lo, hi, n in zip(hist["edges"], hist["edges"][1:], hist["counts"]):
        mark = "  <- data.max_seq_len" if cut is not None and lo <= cut < hi else ""
        lines.append(f"{lo:>5} - {hi:<5} {n:>9} {'#' * round(40 * n / top)}{mark}")
    if cut is not None and cut >= hist["edges"][-1]:
        lines.append(f"(data.max_seq_len = {cut}: above every example)")
    return "\n".join(lines)


def plot_lengths(stats: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    hist = stats["lengths"]["histogram"]
    edges = hist["edges"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", edgecolor="black")
    cut = hist.get("max_seq_len")
    if cut is not None and cut <= edges[-1] + (edges[-1] - edges[0]) * 0.1:  # the cut-off, where it is in view
        ax.axvline(cut, color="red", linestyle="--", label=f"data.max_seq_len = {cut}")
        ax.legend()
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.set_title(f"token lengths (median {stats['lengths'].get('p50', 0)}, p99 {stats['lengths'].get('p99', 0)})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render_text(name: str, stats: Dict[str, Any], flags: Dict[str, Any], max_flagged: int) -> str:
    s = stats
    lines = [
        f"data report: {name}",
        f"records {s['records']}  skipped lines {s['skipped']}  empty {s['empty']}  duplicates {s['duplicates']}",
        f"train {s['train']}  test {s['test']}  train/test overlap {s['train_test_overlap']}",
        f"truncated {s['truncated']}  dropped (over-long) {s['dropped']}",
        f"tokens {s['tokens']}  loss tokens {s['loss_tokens']} ({100 * s['loss_token_share']:.1f} %)",
    ]
    if "packing" in s:
        p = s["packing"]
        lines.append(f"packing: {p['examples']} examples in {p['rows']} rows, {100 * p['efficiency']:.1f} % non-pad")
    lines += [f"  {e}" for e in s["skipped_examples"]]
    lines.append("per source:")
    lines += [f"  {src}: train {c['train']}  test {c['test']}" for src, c in s["per_source"].items()]
    ls = s["lengths"]
    lines.append(
        "token lengths: "
        + "  ".join(f"{k} {ls[k]}" for k in ("min", "p25", "p50", "p75", "p95", "p99", "max") if k in ls)
    )
    lines.append(length_table(s))
    lines.append(
        f"responses flagged: repetition {flags['counts']['repetition']}, overly long {flags['counts']['too_long']} "
        f"(> {flags.get('long_ratio', '')}x the median {flags['median_response_words']} words)"
    )
    for f in flags["flagged"][:max_flagged]:
        lines.append(f"  [{f['category']}] {f['source']}:{f['source_line']}: {f['detail']}")
    return "\n".join(lines)


LOSS_OPEN, LOSS_CLOSE = "\u00ab", "\u00bb"  # « »: rarer in training text than brackets


def mark_loss_tokens(tokenizer: Any, input_ids: List[int], labels: List[int]) -> str:
    """The example as the model reads it, with each run of loss-bearing tokens (label != -100) in « »."""

    pieces, start = [], 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tokenizer.decode(input_ids[start:i])
            pieces.append(f"{LOSS_OPEN}{text}{LOSS_CLOSE}" if labels[start] != IGNORE_INDEX else text)
            start = i
    return "".join(pieces)


def show_text(prepared: PreparedData, tokenizer: Any, n: int) -> str:
    """`ft-data show`: the first n training examples, rendered through the template, loss-bearing tokens marked."""
    lines = [f"{LOSS_OPEN}...{LOSS_CLOSE} marks the tokens that get loss (labels != -100); the rest is context."]
    for i, row in enumerate(prepared.train.select(range(min(n, len(prepared.train))))):
        trained = sum(label != -100 for label in row["labels"])
        lines += [
            "",
            f"--- example {i + 1}: {len(row['input_ids'])} tokens, {trained} with loss",
            mark_loss_tokens(tokenizer, row["input_ids"], row["labels"]),
        ]
    return "\n".join(lines)
