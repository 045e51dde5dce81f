"""The embedded default dataset: extract one field from a short key=value record.

A clear text-in/text-out task with an exact-match metric that a 1M-parameter model learns in about a minute on a
CPU, so the README demo shows finetuning working end to end. Written by this module (names and places are common
words), so it is license-clean. Regenerate with `python -m ft_dist.data.demo`; the output is deterministic.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, List, Tuple

FIRST = "Ada Ben Cleo Dev Eli Fay Gus Hana Ivo Jun Kai Lena Milo Nia Omar Pia Quin Rosa Sam Tia Umi Vic Wes Yara Zed".split()
LAST = "Stone Rivers Park Moreau Okafor Silva Nakamura Berg Costa Hale Ivanova Khan Lund Marsh Novak Ortiz".split()
CITY = "Lisbon Oslo Lagos Lima Kyoto Dakar Quito Perth Tunis Hanoi Porto Accra Cusco Malmo Split Turin Bergen Leeds".split()
JOB = "baker nurse pilot tailor welder farmer lawyer chef miner diver plumber painter".split()
FIELDS = ("name", "city", "job", "year")


def record(rng: random.Random) -> Tuple[Dict[str, str], str]:
    """One random record and its text: the fields in a shuffled order, `key=value; ...`."""
    fields = {
        "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
        "city": rng.choice(CITY),
        "job": rng.choice(JOB),
        "year": str(rng.randint(1950, 2005)),
    }
    order = list(FIELDS)
    rng.shuffle(order)
    return fields, "; ".join(f"{k}={fields[k]}" for k in order)


def question(field: str, text: str) -> str:
    """The task's question: extract `field` from the record `text`."""
    return f"Extract the {field} from: {text}"


def make_examples(n: int, seed: int = 0) -> List[Dict[str, str]]:
    """n question/answer pairs: a shuffled record and the value of one of its fields."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        fields, text = record(rng)
        asked = rng.choice(FIELDS)
        out.append({"question": question(asked, text), "answer": fields[asked]})
    return out


def make_documents(n: int, seed: int = 2) -> List[str]:
    """The embedded documents (README, "From documents to a finetuned model"): n records of a registry, as text."""
    rng = random.Random(seed)
    return [record(rng)[1] for _ in range(n)]


def write(path: Path, n: int = 3200) -> None:
    path.write_text("".join(json.dumps(x) + "\n" for x in make_examples(n)))
