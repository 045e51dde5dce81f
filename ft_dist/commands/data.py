"""`ft-data report|show|generate`: (generate: documents to Q&A pairs, ft_dist/generate/) prepare a dataset exactly as training would, then report on it or show examples with the
tokens that get loss marked (the analysis itself is ft_dist/eval/data_report.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Set, cast

from omegaconf import DictConfig, OmegaConf

from ft_dist import dist
from ft_dist.commands.schema import DataReportConfig
from ft_dist.config import ModelConfig
from ft_dist.data.prepare import prepare_dataset
from ft_dist.data.schema import DataConfig
from ft_dist.errors import DataError
from ft_dist.eval.data_report import flag_responses, plot_lengths, render_text, show_text
from ft_dist.generate.schema import DataGenerateConfig, fingerprint
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


def generate(cfg: DataGenerateConfig) -> int:
    """Entry point of `ft-data generate`: chunks -> replies -> filtered pairs, resumable; also under torchrun."""
    from ft_dist.generate.backends import Generator, LocalGenerator, OpenAIGenerator
    from ft_dist.generate.chunking import chunk_documents
    from ft_dist.generate.documents import input_files, read_documents
    from ft_dist.generate.output import claim
    from ft_dist.generate.pipeline import generate_chunks, merge

    gen = cfg.generate
    world = dist.init(gen.device if gen.backend == "local" else "cpu")
    try:
        tokenizer = load_tokenizer(ModelConfig(tokenizer=gen.tokenizer or gen.model_path))
        chunks = chunk_documents(
            read_documents(input_files(list(cfg.inputs)), cfg.text_field),
            tokenizer,
            cfg.chunk_tokens,
            cfg.chunk_overlap,
        )
        if not chunks:
            raise DataError("the input documents hold no text", ", ".join(cfg.inputs))
        test_texts = _test_texts(cfg.target_data, tokenizer)
        generator: Generator
        if gen.backend == "local":
            generator = LocalGenerator(gen, tokenizer, world.device)
        else:
            generator = OpenAIGenerator(gen)
        unit = gen.batch_size if gen.backend == "local" else gen.concurrency
        if world.is_main:
            claim(Path(cfg.output), fingerprint(cfg))
        dist.barrier()
        generate_chunks(cfg, chunks, generator, test_texts, unit)
        dist.barrier()
        if world.is_main:
            report = merge(cfg, chunks, generator.name)
            f = report["filtered"]
            dist.log(
                f"generated: {report['kept']} pairs kept of {report['pairs_parsed']} parsed from "
                f"{report['chunks_done']}/{report['chunks']} chunks; malformed replies {report['malformed']} "
                f"(retried {report['retried']}); filtered: " + ", ".join(f"{k} {v}" for k, v in f.items())
            )
            dist.log(f"output: {cfg.output}  report: {cfg.output}.report.json")
        return 0
    finally:
        dist.close()


def _test_texts(target: Optional[str], tokenizer: Any) -> Set[str]:
    """The normalised prompts and responses of the target dataset's test split, split exactly as ft-train would
    split `data.path=<target>` (conf/data/file.yaml)."""
    if not target:
        return set()
    from ft_dist.data.split import normalise
    from ft_dist.runtime import CONF_DIR

    file_defaults = cast(DictConfig, OmegaConf.load(CONF_DIR / "data" / "file.yaml"))
    del file_defaults["name"]  # an interpolation of data.path; the target is named below
    data_cfg = cast(
        DataConfig,
        OmegaConf.merge(OmegaConf.structured(DataConfig), file_defaults, {"path": target, "name": "target"}),
    )
    test = prepare_dataset(data_cfg, tokenizer).test
    return {normalise(t) for col in ("prompt", "response") for t in test[col]}
