"""`ft-data report|show`: prepare a dataset exactly as training would, then report on it or show examples with the
tokens that get loss marked (the analysis itself is ft_dist/eval/data_report.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

from omegaconf import OmegaConf

from ft_dist import dist
from ft_dist.commands.schema import DataReportConfig
from ft_dist.data.prepare import prepare_dataset
from ft_dist.data.schema import DataConfig
from ft_dist.eval.data_report import flag_responses, plot_lengths, render_text, show_text
from ft_dist.models import load_tokenizer


def run(cfg: DataReportConfig) -> int:
    """Entry point of `ft-data` (action=report or show)."""
    out = Path(cfg.output_dir)
    tokenizer = load_tokenizer(cfg.model)
    if cfg.action == "show":  # unpacked, so each row is one example; same records, template and masking
        text = show_text(
            prepare_dataset(cast(DataConfig, OmegaConf.merge(cfg.data, {"packing": False})), tokenizer),
            tokenizer,
            cfg.show_examples,
        )
        if dist.is_main():
            out.mkdir(parents=True, exist_ok=True)
            (out / "examples.md").write_text(text + "\n")
        dist.log(text)
        return 0
    # Example-level analysis needs each example's text, which packed rows no longer hold: analyse the unpacked
    # preparation (same records, split and tokens) and take the packing figures from the packed one.
    unpacked_cfg = cast(DataConfig, OmegaConf.merge(cfg.data, {"packing": False}))
    prepared = prepare_dataset(unpacked_cfg, tokenizer)
    if cfg.data.packing:
        prepared.stats["packing"] = prepare_dataset(cfg.data, tokenizer).stats["packing"]
    flags = flag_responses(prepared, cfg.long_ratio)
    flags["long_ratio"] = cfg.long_ratio
    text = render_text(cfg.data.name, prepared.stats, flags, cfg.max_flagged)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        plot_lengths(prepared.stats, out / "lengths.png")
        (out / "report.md").write_text(text + "\n")
        report = {
            "stats": prepared.stats,
            "flag_counts": flags["counts"],
            "median_response_words": flags["median_response_words"],
            "cache": str(prepared.cache_path),
        }
        (out / "report.json").write_text(json.dumps(report, indent=2))
        with (out / "flagged.jsonl").open("w") as fh:
            for f in flags["flagged"]:
                fh.write(json.dumps(f) + "\n")
    dist.log(text)
    dist.log(f"\nreport: {out / 'report.md'}  histogram: {out / 'lengths.png'}  flagged: {out / 'flagged.jsonl'}")
    return 0
