"""Compare models (base vs finetuned, or checkpoints) answering the same test items.

`compare_models` takes each model's per-example outputs and returns one table (metrics, deltas against the first
model, error-category counts) and, with a judge, pairwise win rates and Elo ratings. Everything is a pure function
of lists and dicts; `format_comparison` prints the result as Markdown.

A judge is `judge(question, reference, answer_a, answer_b) -> "a" | "b" | "tie"`. The default, `f1_judge`,
prefers the answer with the higher SQuAD token-F1 against the reference (a tie when equal): cheap and
deterministic, but it rewards word overlap, not correctness or fluency; pass an LLM- or human-backed judge for
those.
"""

from __future__ import annotations

import random
from itertools import combinations
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from ft_dist.eval.error_analysis import Thresholds, error_report, question_of
from ft_dist.eval.text_metrics import score_generations, token_f1

Judge = Callable[[str, str, str, str], str]
Outputs = Mapping[str, Sequence[Mapping[str, Any]]]
"""Model name -> its records {question (or prompt), reference, prediction[, truncated]}, same items, same order."""
Preference = Tuple[str, str, str]
"""(model_a, model_b, outcome) with outcome "a", "b" or "tie"."""


def f1_judge(question: str, reference: str, answer_a: str, answer_b: str) -> str:
    """Prefer the answer with the higher token-F1 against the reference; "tie" when equal."""
    f1_a, f1_b = token_f1(answer_a, reference), token_f1(answer_b, reference)
    return "a" if f1_a > f1_b else "b" if f1_b > f1_a else "tie"


def _check_aligned(outputs: Outputs) -> None:
    """ValueError when models answered different items, or in another order: pairing them would be wrong."""
    names = list(outputs)
    if not names:
        raise ValueError("no models to compare")
    first = outputs[names[0]]
    for name in names[1:]:
        records = outputs[name]
        if len(records) != len(first):
            raise ValueError(f"{name} has {len(records)} outputs, {names[0]} has {len(first)}")
        for i, (a, b) in enumerate(zip(first, records)):
            if (question_of(a), a["reference"]) != (question_of(b), b["reference"]):
                raise ValueError(f"item {i} differs between {names[0]} and {name}")


def comparison_table(
    outputs: Outputs,
    metrics: Optional[Mapping[str, Mapping[str, float]]] = None,
    vocabulary: Optional[Set[str]] = None,
    thresholds: Thresholds = Thresholds(),
) -> List[Dict[str, Any]]:
    """One row per model: its metrics, `<metric> Δ` against the first model (None on the first row), error counts.

    metrics: per-model metrics to show (e.g. the eval runner's, multiple-choice accuracy included); a model without
    an entry gets `score_generations` of its outputs.
    """
    _check_aligned(outputs)
    rows: List[Dict[str, Any]] = []
    baseline: Dict[str, float] = {}
    for index, (name, records) in enumerate(outputs.items()):
        if metrics and name in metrics:
            values = dict(metrics[name])
        else:
            values = score_generations([r["prediction"] for r in records], [r["reference"] for r in records])
        if index == 0:
            baseline = values
        row: Dict[str, Any] = {"model": name}
        for key, value in values.items():
            row[key] = value
            row[f"{key} Δ"] = None if index == 0 or key not in baseline else value - baseline[key]
        row.update(error_report(records, vocabulary, thresholds)["counts"])
        rows.append(row)
    return rows


def pairwise_preferences(outputs: Outputs, judge: Judge = f1_judge) -> List[Preference]:
    """The judge's verdict on every item for every pair of models (each pair once, in the order given)."""
    _check_aligned(outputs)
    preferences = []
    for a, b in combinations(list(outputs), 2):
        for item, other in zip(outputs[a], outputs[b]):
            outcome = judge(question_of(item), item["reference"], item["prediction"], other["prediction"])
            if outcome not in ("a", "b", "tie"):
                raise ValueError(f"judge returned {outcome!r}; expected 'a', 'b' or 'tie'")
            preferences.append((a, b, outcome))
    return preferences


def win_rates(preferences: Sequence[Preference], models: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Per model: wins, losses, ties, games, and win_rate = (wins + ties / 2) / games (0.5 with no games)."""
    table = {m: {"wins": 0, "losses": 0, "ties": 0} for m in models}
    for a, b, outcome in preferences:
        if outcome == "tie":
            table[a]["ties"] += 1
            table[b]["ties"] += 1
        else:
            winner, loser = (a, b) if outcome == "a" else (b, a)
            table[winner]["wins"] += 1
            table[loser]["losses"] += 1
    out: Dict[str, Dict[str, float]] = {}
    for m, t in table.items():
        games = t["wins"] + t["losses"] + t["ties"]
        out[m] = {**t, "games": games, "win_rate": (t["wins"] + t["ties"] / 2) / games if games else 0.5}
    return out


def elo_ratings(
    preferences: Sequence[Preference],
    models: Sequence[str],
    k: float = 16.0,
    initial: float = 1000.0,
    rounds: int = 100,
    seed: int = 0,
) -> Dict[str, float]:
    """Elo ratings from pairwise outcomes (a tie scores 0.5), averaged over `rounds` shuffled game orders.

    Sequential Elo depends on the order of games; averaging over seeded shuffles (as Chatbot Arena's bootstrap
    does) removes that, and the seed keeps it reproducible. A 400-point gap means 10:1 expected odds.
    """
    rng = random.Random(seed)
    totals = dict.fromkeys(models, 0.0)
    games = list(preferences)
    for _ in range(rounds):
        rng.shuffle(games)
        ratings = dict.fromkeys(models, initial)
        for a, b, outcome in games:
            expected_a = 1.0 / (1.0 + 10 ** ((ratings[b] - ratings[a]) / 400.0))
            score_a = {"a": 1.0, "b": 0.0, "tie": 0.5}[outcome]
            ratings[a] += k * (score_a - expected_a)
            ratings[b] -= k * (score_a - expected_a)
        for m in models:
            totals[m] += ratings[m]
    return {m: totals[m] / rounds for m in models}


def compare_models(
    outputs: Outputs,
    metrics: Optional[Mapping[str, Mapping[str, float]]] = None,
    judge: Optional[Judge] = f1_judge,
    vocabulary: Optional[Set[str]] = None,
    thresholds: Thresholds = Thresholds(),
) -> Dict[str, Any]:
    """The comparison table, and with a judge (None: skip) each model's win rate and Elo rating added to its row.

    Returns {"models": names, "rows": table rows, "win_rates": {...}, "elo": {...}} (the last two only with a judge).
    """
    models = list(outputs)
    result: Dict[str, Any] = {"models": models, "rows": comparison_table(outputs, metrics, vocabulary, thresholds)}
    if judge is not None:
        preferences = pairwise_preferences(outputs, judge)
        result["win_rates"] = win_rates(preferences, models)
        result["elo"] = elo_ratings(preferences, models)
        for row in result["rows"]:
            row["win_rate"] = result["win_rates"][row["model"]]["win_rate"]
            row["elo"] = result["elo"][row["model"]]
    return result


def format_table(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None) -> str:
    """Rows as a Markdown table (floats to 4 decimals, deltas signed, None blank); columns default to all keys."""
    if not rows:
        return ""
    columns = list(columns or dict.fromkeys(key for row in rows for key in row))

    def cell(column: str, value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:+.4f}" if column.endswith("Δ") else f"{value:.4f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(c, row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def format_comparison(result: Mapping[str, Any]) -> str:
    """`compare_models`' result as Markdown: the table, then win/loss/tie counts when a judge ran."""
    text = format_table(result["rows"])
    if "win_rates" in result:
        rows = [{"model": m, **result["win_rates"][m], "elo": result["elo"][m]} for m in result["models"]]
        text += "\nPairwise preferences:\n\n" + format_table(rows)
    return text


def before_after_table(before: Optional[Dict[str, Any]], after: Dict[str, Any]) -> str:
    """A small before/after table of the task metrics and eval loss."""
    keys = [k for k in after if isinstance(after[k], float)]
    lines = [f"{'metric':<20}{'before':>12}{'after':>12}{'delta':>12}"]
    for k in keys:
        b = before.get(k) if before else None
        delta = f"{after[k] - b:+12.4f}" if isinstance(b, float) else f"{'':>12}"
        shown = f"{b:12.4f}" if isinstance(b, float) else f"{'-':>12}"
        lines.append(f"{k:<20}{shown}{after[k]:12.4f}{delta}")
    return "\n".join(lines)
