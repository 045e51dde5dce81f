"""The embedded generator task and documents: `ft-data generate` end to end on a CPU, with nothing downloaded.

A real run asks a capable LLM (a served one, `generate.backend=openai`) to write pairs about its documents. The
embedded tiny model cannot do that untaught, so the README's walkthrough first teaches it the reply format on
`demo_generator.jsonl`: a registry record in the prompt, and as reply a JSON list of two grounded pairs that ask
for the record's city and job (the embedded extraction task, `ft_dist/data/demo.py`). It then writes pairs for the
embedded documents (`documents/registry.jsonl`: records it has never seen), and the student trains on what the
filters kept. Deterministic; regenerate both files with `write_assets(Path("ft_dist/assets"))`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, List

from ft_dist.data.demo import make_documents, question, record
from ft_dist.generate.prompt import render
from ft_dist.generate.schema import PromptConfig

TEMPLATE = "Pairs {n_pairs} {style}: {chunk} JSON:"
"""The walkthrough's prompt.template: short, because the generator is a character-level model."""
ASKED = ("city", "job")


def make_generator_examples(n: int, seed: int = 1) -> List[Dict[str, str]]:
    """n (prompt, reply) pairs that teach the reply format: the rendered request for one record, and the JSON
    list of the pairs a good generator would write about it."""
    rng = random.Random(seed)
    cfg = PromptConfig(template=TEMPLATE, n_pairs=len(ASKED))
    out = []
    for _ in range(n):
        fields, text = record(rng)
        pairs = [{"question": question(f, text), "answer": fields[f]} for f in ASKED]
        out.append({"question": render(cfg, text), "answer": json.dumps(pairs)})
    return out


def write_assets(assets: Path, examples: int = 3000, documents: int = 3000) -> None:
    """demo_generator.jsonl and documents/registry.jsonl under `assets` (the package's ft_dist/assets)."""
    (assets / "documents").mkdir(parents=True, exist_ok=True)
    rows = make_generator_examples(examples)
    (assets / "demo_generator.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = make_documents(documents)
    (assets / "documents" / "registry.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
