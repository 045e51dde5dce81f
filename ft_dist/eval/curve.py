"""A learning curve from evaluated runs: the table, a fitted trend per model, the plot and a plain-language reading.

Input: one `CurvePoint` per finetuned run (model label, data.fraction, the training examples that run really had,
its ft-eval metrics). The trend is a least-squares line of the metric against log2(training examples) per model,
so its slope reads directly as "doubling the data adds ~X". Outputs (`write_curve`): curve.json, curve.md and
curve.png (metric and eval loss against training examples, log-x, one line per model), each written atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ft_dist.atomic_io import atomic_write_text


@dataclass
class CurvePoint:
    """One finetuned run of the curve."""

    model: str
    """The model's label on the curve (`--model LABEL: ...`)."""
    fraction: float
    """data.fraction of the run."""
    examples: Optional[int]
    """Training examples the run trained on, as its prepared data counted them (None: the run failed)."""
    metric: Optional[float]
    """The task metric from ft-eval (e.g. exact_match); None when the run or its evaluation failed."""
    eval_loss: Optional[float]
    """Mean per-token loss on the test split, from ft-eval."""
    parameters: Optional[int]
    """The model's parameter count (from the run's eval.json): which model is the larger."""
    run_dir: str
    status: str = "ok"
    """ok | failed (training) | eval_failed."""


@dataclass
class Trend:
    """metric ~= intercept + per_doubling * log2(examples), fitted by least squares."""

    per_doubling: float
    """What doubling the training examples adds to the metric, by the fit."""
    intercept: float
    points: int
    r2: Optional[float]
    """Share of the metric's variance the line explains (None with two points: a line fits two points exactly)."""
    slope_stderr: Optional[float]
    """Standard error of the slope (None with fewer than three points)."""


def fit_trend(examples: Sequence[int], metric: Sequence[float]) -> Optional[Trend]:
    """The least-squares line of metric against log2(examples); None when fewer than two distinct sizes."""
    x, y = np.log2(np.asarray(examples, dtype=float)), np.asarray(metric, dtype=float)
    if len(np.unique(x)) < 2:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    r2, stderr = None, None
    if len(x) > 2:
        residuals = y - (intercept + slope * x)
        total = float(((y - y.mean()) ** 2).sum())
        r2 = 1.0 - float((residuals**2).sum()) / total if total > 0 else None
        stderr = float(np.sqrt((residuals**2).sum() / (len(x) - 2) / ((x - x.mean()) ** 2).sum()))
    return Trend(float(slope), float(intercept), len(x), r2, stderr)


def _ok(points: Sequence[CurvePoint]) -> List[CurvePoint]:
    return sorted(
        (p for p in points if p.status == "ok" and p.metric is not None and p.examples),
        key=lambda p: p.examples or 0,
    )


def trends(points: Sequence[CurvePoint]) -> Dict[str, Optional[Trend]]:
    """The fitted trend of each model (in the order the models first appear)."""
    models = list(dict.fromkeys(p.model for p in points))
    out: Dict[str, Optional[Trend]] = {}
    for model in models:
        ok = _ok([p for p in points if p.model == model])
        out[model] = fit_trend([p.examples or 0 for p in ok], [p.metric or 0.0 for p in ok])
    return out


def _trend_sentence(model: str, trend: Optional[Trend], ok: List[CurvePoint], metric: str) -> str:
    """One honest sentence per model: a rise or fall only when the fit supports its sign."""
    if trend is None:
        return f"{model}: too few evaluated sizes ({len(ok)}) to fit a trend."
    lo, hi = ok[0], ok[-1]
    span = f"{metric} {lo.metric:.3f} at {lo.examples} examples -> {hi.metric:.3f} at {hi.examples}"
    step = f"{trend.per_doubling:+.3f} {metric} per doubling of the data"
    if trend.slope_stderr is not None and abs(trend.per_doubling) < 2 * trend.slope_stderr:
        return (
            f"{model}: {span}; no clear trend (fit {step}, within twice its standard error {trend.slope_stderr:.3f})."
        )
    if abs(trend.per_doubling) < 1e-3:
        return f"{model}: {span}; flat: more data does not move {metric} in this range."
    verb = "adds" if trend.per_doubling > 0 else "costs"
    basis = "two sizes, so a line through them" if trend.points == 2 else f"fit over {trend.points} sizes"
    where = f"{lo.examples}-{hi.examples} examples"
    return f"{model}: {span}; doubling the data {verb} ~{abs(trend.per_doubling):.3f} {metric} at {where} ({basis})."


def reading(points: Sequence[CurvePoint], metric: str) -> List[str]:
    """The plain-language reading: per model what doubling the data does, then the larger model's lead."""
    lines = []
    fitted = trends(points)
    for model, trend in fitted.items():
        lines.append(_trend_sentence(model, trend, _ok([p for p in points if p.model == model]), metric))
    full = {p.model: p for p in _ok(points) if p.fraction == 1.0}
    sized = [p for p in full.values() if p.parameters]
    if len(sized) >= 2:
        larger, smaller = max(sized, key=lambda p: p.parameters or 0), min(sized, key=lambda p: p.parameters or 0)
        lead = (larger.metric or 0.0) - (smaller.metric or 0.0)
        if abs(lead) < 1e-9:
            lines.append(
                f"At full data ({larger.examples} examples) {larger.model} and {smaller.model} tie on {metric}."
            )
        else:
            word = "ahead of" if lead > 0 else "behind"
            lines.append(
                f"At full data ({larger.examples} examples) the larger model, {larger.model} "
                f"({larger.parameters:,} parameters), is {word} {smaller.model} ({smaller.parameters:,}) "
                f"by {abs(lead):.3f} {metric}."
            )
    elif len(fitted) >= 2:
        lines.append("No comparison at full data: not every model has an evaluated run with data.fraction=1.0.")
    failed = [p for p in points if p.status != "ok"]
    if failed:
        lines.append("Not on the curve: " + ", ".join(f"{p.model} @ {p.fraction} ({p.status})" for p in failed) + ".")
    return lines


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))


def render_markdown(points: Sequence[CurvePoint], metric: str, title: str) -> str:
    """curve.md: the table (one row per run), the fitted trends and the reading."""
    header = ["model", "data.fraction", "training examples", metric, "eval_loss", "status", "run"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in sorted(points, key=lambda p: (p.model, p.fraction)):
        cells = [p.model, _cell(p.fraction), _cell(p.examples), _cell(p.metric), _cell(p.eval_loss), p.status]
        rows.append("| " + " | ".join([*cells, p.run_dir]) + " |")
    fits = ["| model | per doubling | intercept | sizes | r2 |", "|---|---|---|---|---|"]
    for model, t in trends(points).items():
        if t is None:
            fits.append(f"| {model} | - | - | - | - |")
        else:
            fits.append(f"| {model} | {t.per_doubling:+.4f} | {t.intercept:.4f} | {t.points} | {_cell(t.r2)} |")
    return (
        f"# Learning curve: {title}\n\n{metric} on the same held-out test split for every run.\n\n"
        + "\n".join(rows)
        + f"\n\n## Trend: {metric} = intercept + per_doubling x log2(training examples)\n\n"
        + "\n".join(fits)
        + "\n\n## Reading\n\n"
        + "\n".join(f"- {line}" for line in reading(points, metric))
        + "\n"
    )


def curve_figure(points: Sequence[CurvePoint], metric: str, title: str) -> Any:
    """The figure: the metric (left) and eval loss (right) against training examples, log-x, a line per model
    with its fitted trend dashed. Returned unsaved, so callers (and tests) can read its labels and legend."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, (ax_m, ax_l) = plt.subplots(1, 2, figsize=(11, 4.2))
    fitted = trends(points)
    for i, model in enumerate(fitted):
        ok = _ok([p for p in points if p.model == model])
        if not ok:
            continue
        color = f"C{i}"
        xs = [float(p.examples or 0) for p in ok]
        ax_m.plot(xs, [p.metric for p in ok], "o-", color=color, label=model)
        trend = fitted[model]
        if trend is not None:
            grid = np.geomspace(min(xs), max(xs), 50)
            ax_m.plot(
                grid,
                trend.intercept + trend.per_doubling * np.log2(grid),
                "--",
                color=color,
                alpha=0.5,
                label=f"{model} fit: {trend.per_doubling:+.3f} per doubling",
            )
        losses = [(p.examples, p.eval_loss) for p in ok if p.eval_loss is not None]
        if losses:
            ax_l.plot(*zip(*losses), "o-", color=color, label=model)
    sizes = sorted({p.examples for p in _ok(points) if p.examples})
    for ax, ylabel in ((ax_m, metric), (ax_l, "eval loss (test split)")):
        ax.set_xscale("log")
        if sizes:  # ticks at the measured sizes, as plain counts (a log axis would print 3x10^2)
            ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("training examples (log scale)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    ax_m.set_title(f"{metric} vs training examples")
    ax_l.set_title("eval loss vs training examples")
    fig.suptitle(f"Learning curve: {title}")
    fig.tight_layout()
    return fig


def write_curve(out_dir: Path, points: Sequence[CurvePoint], metric: str, title: str) -> Dict[str, Path]:
    """Write curve.json, curve.md and curve.png into out_dir (each atomically); returns their paths."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / f"curve.{name}" for name in ("json", "md", "png")}
    fitted = trends(points)
    record = {
        "title": title,
        "metric": metric,
        "points": [asdict(p) for p in points],
        "trends": {m: (asdict(t) if t is not None else None) for m, t in fitted.items()},
        "reading": reading(points, metric),
    }
    atomic_write_text(paths["json"], json.dumps(record, indent=2))
    atomic_write_text(paths["md"], render_markdown(points, metric, title))
    fig = curve_figure(points, metric, title)
    tmp = paths["png"].with_name(f".curve.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, paths["png"])
    return paths
