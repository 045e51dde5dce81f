"""The planner against published, measured GPU peaks of finetuning runs (bench/planner_points.yaml).

    python bench/planner_validation.py              # every point that can be modelled
    python bench/planner_validation.py --strict     # without the torchtune README family (kept for a stricter split)
    python bench/planner_validation.py --json out.json

Each point is a real run someone measured and published (URL, table, quote, and which statistic the figure is).
The planner predicts the same statistic for the same setup: `allocated` (and torch's `active`, which tracks it)
against its allocated figure, `reserved` against allocated + the allocator's reserve, `device` (nvidia-smi)
against reserved + the CUDA context, and `unknown` against reserved (what HF's and TRL's prints report). Printed:
measured, predicted, their ratio and error per point, the error distribution, and the cause named for any point
beyond +-35 %. Points the file marks `excluded` (unknown sequence length, parallelism the planner has no model of)
are listed with their reason and left out of the statistics. No GPU is needed: this checks the planner's
arithmetic against figures measured elsewhere.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ft_dist.planner.memory import GIB, MemoryBreakdown, estimate_memory  # noqa: E402
from ft_dist.planner.params import architecture  # noqa: E402
from ft_dist.planner.workload import TrainingSetup  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
POINTS = Path(__file__).with_name("planner_points.yaml")
STATISTIC = {"allocated": "allocated", "active": "allocated", "reserved": "reserved", "device": "total",
             "unknown": "reserved"}
CAUSE_LIMIT = 0.35


def arch_of(point: Dict[str, Any]) -> Dict[str, Any]:
    if point.get("conf"):
        return yaml.safe_load((REPO / "conf" / "model" / f"{point['conf']}.yaml").read_text())["arch"]
    return dict(point["arch"])


def setup_of(point: Dict[str, Any]) -> TrainingSetup:
    fields = dict(point["setup"])
    for key in ("lora_targets", "ds_bucket_elems"):
        if key in fields:
            fields[key] = tuple(fields[key])
    known = TrainingSetup.__dataclass_fields__
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise SystemExit(f"{POINTS.name}: point {point['id']}: unknown setup field(s) {unknown}; expected some of "
                         f"{', '.join(known)}")
    return TrainingSetup(**fields, device="cuda")


def predict(point: Dict[str, Any]) -> MemoryBreakdown:
    return estimate_memory(architecture(arch_of(point)), setup_of(point))


def evaluate(points: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for p in points:
        mem = predict(p)
        predicted = getattr(mem, STATISTIC[p["statistic"]]) / GIB
        rows.append({"id": p["id"], "family": p.get("family", p.get("source")), "statistic": p["statistic"],
                     "measured_gib": p["value_gib"], "predicted_gib": round(predicted, 3),
                     "ratio": round(predicted / p["value_gib"], 4), "error": round(predicted / p["value_gib"] - 1, 4),
                     "peak_phase": mem.peak_phase, "largest_term": mem.largest_term(),
                     "cause": p.get("known_cause") or "", "url": p.get("url", "")})
    return rows


def summary(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    errors = [abs(r["error"]) for r in rows]
    return {
        "points": len(rows),
        "families": len({r["family"] for r in rows}),
        "median_abs_error": round(statistics.median(errors), 4) if errors else None,
        "within_10pct": round(sum(e <= 0.10 for e in errors) / len(errors), 4) if errors else None,
        "within_20pct": round(sum(e <= 0.20 for e in errors) / len(errors), 4) if errors else None,
        "worst": max(rows, key=lambda r: abs(r["error"]))["id"] if rows else None,
        "beyond_35pct_without_cause": [r["id"] for r in rows if abs(r["error"]) > CAUSE_LIMIT and not r["cause"]],
    }


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default=str(POINTS))
    ap.add_argument("--strict", action="store_true", help="leave out the torchtune README family")
    ap.add_argument("--json", help="also write the rows and the summary here")
    args = ap.parse_args(argv)
    points = yaml.safe_load(Path(args.points).read_text())
    used = [p for p in points if not p.get("excluded") and not (args.strict and p.get("family") == "torchtune-readme")]
    left_out = [p for p in points if p not in used]
    rows = evaluate(used)
    print(f"{'point':44} {'stat':9} {'measured':>9} {'planned':>8} {'ratio':>6} {'error':>7}  peak term")
    for r in sorted(rows, key=lambda r: (r["family"], r["id"])):
        flag = "  <- " + r["cause"] if abs(r["error"]) > CAUSE_LIMIT else ""
        print(f"{r['id'][:44]:44} {r['statistic']:9} {r['measured_gib']:>9.2f} {r['predicted_gib']:>8.2f} "
              f"{r['ratio']:>6.2f} {100 * r['error']:>+6.1f}%  {r['largest_term']}{flag}")
    s = summary(rows)
    errors = sorted(100 * r["error"] for r in rows)
    quart = statistics.quantiles(errors, n=4) if len(errors) >= 4 else errors
    print(f"\n{s['points']} points from {s['families']} source families; median |error| "
          f"{100 * s['median_abs_error']:.1f} %; within +-10 %: {100 * s['within_10pct']:.0f} %; within +-20 %: "
          f"{100 * s['within_20pct']:.0f} %; error quartiles {', '.join(f'{q:+.1f} %' for q in quart)}; "
          f"worst {s['worst']}")
    if s["beyond_35pct_without_cause"]:
        print(f"beyond +-35 % with no named cause: {', '.join(s['beyond_35pct_without_cause'])}")
    print(f"left out ({len(left_out)}):")
    for p in left_out:
        print(f"  {p['id']}: {p.get('excluded') or 'strict: torchtune README family'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": s, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
