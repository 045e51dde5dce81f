"""Error analysis of generated answers: tag each with the classic failure categories, count them, and show the
worst examples beside their references, as JSONL and Markdown, so the data or the recipe can be fixed.

Categories (`CATEGORIES`):
- empty: the answer is blank.
- truncated: generation stopped at max_new_tokens without EOS (the caller knows; pass `truncated=True`).
- repetition: a loop, i.e. an n-gram repeated 3+ times or right after itself, more often than in the reference
  ("time and money and time and money"); the repeated span is reported.
- too_long: many more words than the reference.
- misspelling: a word outside the domain vocabulary, or a real word one or two edits away from a reference word it
  replaced ("lever" for "liver": "lever" is English, so only the closeness to the reference gives it away).
- off_topic: the answer shares almost no content words with the question or the reference.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

from rapidfuzz import process
from rapidfuzz.distance import OSA

from ft_dist.eval.text_metrics import token_f1

CATEGORIES = ("empty", "truncated", "repetition", "too_long", "misspelling", "off_topic")

# Function words carry no topic: they are left out of the off-topic overlap. A short fixed list keeps the check
# free of a corpus download (NLTK's stopword list needs one).
STOPWORDS = frozenset(
    "a an the and or but if of to in on at by for with from as is are was were be been being it its this that these "
    "those i you he she we they me him her us them my your his our their what which who whom how when where why "
    "do does did not no so than then there here can could will would should may might must has have had".split()
)

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


@dataclass(frozen=True)
class Thresholds:
    """When a detector fires. Defaults are for short factual answers; loosen them for long-form tasks."""

    min_repeat_ngram: int = 3
    """Shortest repeated word n-gram that counts as repetition (bigrams like "of the" repeat in normal prose)."""
    min_repeat_run: int = 3
    """A single word repeated this many times in a row ("no no no") also counts."""
    min_repeat_count: int = 3
    """An n-gram loops when it occurs this many times ..."""
    max_repeat_gap: int = 3
    """... or twice with at most this many words between ("time and money and time and money": 1)."""
    max_length_ratio: float = 2.0
    """too_long: more than this many times the reference's word count ..."""
    min_extra_words: int = 5
    """... and at least this many words more (a 1-word reference must not make a 3-word answer too long)."""
    max_edit_distance: int = 2
    """misspelling: how far (edits, a swap of neighbours counting one) a long word may be from its correction;
    shorter words get 1, since most short words are two edits from another ("this"/"that", "more"/"code")."""
    long_word_length: int = 7
    """misspelling: words this long or longer get max_edit_distance."""
    min_near_miss_overlap: float = 0.3
    """misspelling: a known word counts as a near-miss of a reference word only when the answer holds at least this
    share of the reference's content words, i.e. follows the reference; in an unrelated answer, "code" near
    "node" is chance."""
    min_word_length: int = 4
    """misspelling: shorter words are skipped; 'is'/'it' or 'of'/'on' are one edit apart and both fine."""
    min_topic_overlap: float = 0.1
    """off_topic: below this share of the answer's content words found in the question, and in the reference."""


@dataclass(frozen=True)
class ErrorTag:
    """One detected problem: its category, a one-line explanation, and the evidence (span, words, counts)."""

    category: str
    detail: str
    evidence: Dict[str, Any] = field(default_factory=dict)


def words(text: str) -> List[str]:
    """Lower-case word tokens (letters, digits, an inner apostrophe): the unit of every detector here."""
    return _WORD.findall(text.lower())


def build_vocabulary(texts: Iterable[str]) -> Set[str]:
    """Every word of `texts` (training questions and answers, references): the domain's known words."""
    vocabulary: Set[str] = set()
    for text in texts:
        vocabulary.update(words(text))
    return vocabulary


def _ngram_positions(tokens: Sequence[str], n: int) -> Dict[Tuple[str, ...], List[int]]:
    """Start positions of each n-gram, non-overlapping: "a a a a" holds "a a" at 0 and 2, not also at 1."""
    positions: Dict[Tuple[str, ...], List[int]] = {}
    for i in range(len(tokens) - n + 1):
        starts = positions.setdefault(tuple(tokens[i : i + n]), [])
        if not starts or i >= starts[-1] + n:
            starts.append(i)
    return positions


def _longest_run(tokens: Sequence[str]) -> Tuple[str, int]:
    best, best_len, run = "", 0, 0
    for i, token in enumerate(tokens):
        run = run + 1 if i and token == tokens[i - 1] else 1
        if run > best_len:
            best, best_len = token, run
    return best, best_len


def _is_loop(starts: List[int], n: int, thresholds: Thresholds) -> bool:
    # Human answers repeat a phrase now and then ("the LLM engine" twice, far apart); a generation loop repeats it
    # often or right after itself.
    closest_gap = min(b - (a + n) for a, b in zip(starts, starts[1:]))
    return len(starts) >= thresholds.min_repeat_count or closest_gap <= thresholds.max_repeat_gap


def find_repetition(
    tokens: Sequence[str], reference_tokens: Sequence[str] = (), thresholds: Thresholds = Thresholds()
) -> Optional[ErrorTag]:
    """A word run ("no no no"), or the looping n-gram (n >= min_repeat_ngram) covering the most words.

    An n-gram loops when it occurs min_repeat_count times, or twice within max_repeat_gap words of each other, and
    more often than in the reference. Coverage (count x n) picks "a b c" x 3 over its rotation "b c a b" x 2 in
    "a b c a b c a b c".
    """
    word, run = _longest_run(tokens)
    if run >= thresholds.min_repeat_run and run > _longest_run(reference_tokens)[1]:
        return ErrorTag("repetition", f"'{word}' {run} times in a row", {"span": word, "count": run})
    best: Optional[Tuple[int, int, Tuple[str, ...]]] = None  # (words covered, count, n-gram)
    # Any repeated n-gram contains repeated shorter ones, so scan upwards and stop at the first n with no repeat:
    # the cost stays proportional to the longest repeated span, not to the square of the answer's length.
    for n in range(thresholds.min_repeat_ngram, len(tokens) // 2 + 1):
        repeated = {gram: starts for gram, starts in _ngram_positions(tokens, n).items() if len(starts) >= 2}
        if not repeated:
            break
        reference_positions = _ngram_positions(reference_tokens, n)
        for gram, starts in repeated.items():
            # A phrase the reference itself repeats (a product name, say) is the answer being right, not looping.
            if len(starts) > len(reference_positions.get(gram, ())) and _is_loop(starts, n, thresholds):
                if best is None or (len(starts) * n, len(starts)) > best[:2]:
                    best = (len(starts) * n, len(starts), gram)
    if best is None:
        return None
    _, count, gram = best
    span = " ".join(gram)
    return ErrorTag("repetition", f"'{span}' {count} times", {"span": span, "count": count, "n": len(gram)})


def find_too_long(
    tokens: Sequence[str], reference_tokens: Sequence[str], thresholds: Thresholds = Thresholds()
) -> Optional[ErrorTag]:
    """Fires when the answer has > max_length_ratio x and >= min_extra_words more words than the reference."""
    n, limit = len(tokens), len(reference_tokens) * thresholds.max_length_ratio
    if n > limit and n - len(reference_tokens) >= thresholds.min_extra_words:
        ratio = n / max(len(reference_tokens), 1)
        return ErrorTag(
            "too_long",
            f"{n} words for a {len(reference_tokens)}-word reference ({ratio:.1f}x)",
            {"words": n, "reference_words": len(reference_tokens), "ratio": round(ratio, 2)},
        )
    return None


def _inflects(a: str, b: str) -> bool:
    """Two forms of one word, not a typo: one extends the other by a short suffix ("model"/"models",
    "train"/"training"), or they differ only in their last two letters ("used"/"user", "uses")."""
    short, long = sorted((a, b), key=len)
    if long.startswith(short) and len(long) - len(short) <= 3:
        return True
    stem = len(short) - 2
    return a[:stem] == b[:stem] and len(long) - len(short) <= 1


def _closest(word: str, candidates: Iterable[str], max_distance: int) -> Optional[Tuple[str, int]]:
    """The nearest candidate within max_distance OSA edits (a neighbour swap is one edit), inflections excluded."""
    best: Optional[Tuple[str, int]] = None
    for candidate, distance, _ in process.extract(
        word, list(candidates), scorer=OSA.distance, score_cutoff=max_distance, limit=None
    ):
        if _inflects(word, candidate):
            continue
        if best is None or distance < best[1]:
            best = (candidate, distance)
    return best


def _near_length(word: str, known: Set[str], max_difference: int) -> List[str]:
    # Edit distance is at least the length difference: skip the rest of a possibly large vocabulary cheaply.
    return [w for w in known if abs(len(w) - len(word)) <= max_difference]


def find_misspellings(
    tokens: Sequence[str],
    reference_tokens: Sequence[str],
    question_tokens: Sequence[str] = (),
    vocabulary: Optional[Set[str]] = None,
    thresholds: Thresholds = Thresholds(),
) -> Optional[ErrorTag]:
    """Words that look misspelt, each with a suggested correction when one is close.

    Two checks. (1) Unknown word: not in `vocabulary` (if given), the reference or the question, nor a short-suffix
    form of a word there ("filter" for "filters"); the suggestion is the closest known word, reference words first.
    (2) Near-miss: a known word that is not in the reference but is within max_edit_distance of a reference word
    the answer lacks, in an answer that otherwise follows the reference: "the lever filters blood" against "the
    liver filters blood". Numbers, function words and words shorter than min_word_length are skipped, and so are
    pairs differing only in their last two letters (word forms; a typo there, "bloom" for "blood", is missed).
    """
    reference_set, question_set = set(reference_tokens), set(question_tokens)
    answer_set = set(tokens)
    known = (vocabulary or set()) | reference_set | question_set
    # Reference words the answer left out: what a near-miss may have been meant to be.
    reference_content = _content(reference_set)
    follows_reference = len(reference_content & answer_set) >= thresholds.min_near_miss_overlap * len(reference_content)
    missing_reference = [w for w in reference_content - answer_set if len(w) >= thresholds.min_word_length]
    found: List[Dict[str, Any]] = []
    for word in dict.fromkeys(tokens):  # unique, in order of appearance
        if len(word) < thresholds.min_word_length or word.isdigit() or word in reference_set | question_set:
            continue
        max_distance = 1 if len(word) < thresholds.long_word_length else thresholds.max_edit_distance
        if vocabulary is not None and word not in vocabulary:
            if any(_inflects(word, w) for w in _near_length(word, known, 3)):
                continue  # "filter" when the data says "filters": a form of a known word
            match = _closest(word, missing_reference, max_distance) or _closest(
                word, _near_length(word, known, max_distance), max_distance
            )
            found.append({"word": word, "suggestion": match[0] if match else None, "reason": "not in vocabulary"})
            continue
        if word in STOPWORDS or not follows_reference:
            continue  # "with" for "which" is grammar, not spelling
        match = _closest(word, missing_reference, max_distance)
        if match:
            found.append({"word": word, "suggestion": match[0], "reason": "near a reference word"})
    if not found:
        return None
    detail = ", ".join(f"'{f['word']}'" + (f" -> '{f['suggestion']}'" if f["suggestion"] else "") for f in found)
    return ErrorTag("misspelling", detail, {"words": found})


def _content(tokens: Iterable[str]) -> Set[str]:
    return {t for t in tokens if t not in STOPWORDS}


def find_off_topic(
    tokens: Sequence[str],
    reference_tokens: Sequence[str],
    question_tokens: Sequence[str],
    thresholds: Thresholds = Thresholds(),
) -> Optional[ErrorTag]:
    """Fires when few of the answer's content words occur in the question and few occur in the reference."""
    answer = _content(tokens)
    if not answer:
        return None
    with_question = len(answer & _content(question_tokens)) / len(answer)
    with_reference = len(answer & _content(reference_tokens)) / len(answer)
    if max(with_question, with_reference) < thresholds.min_topic_overlap:
        return ErrorTag(
            "off_topic",
            f"{with_question:.0%} of content words in the question, {with_reference:.0%} in the reference",
            {"question_overlap": round(with_question, 3), "reference_overlap": round(with_reference, 3)},
        )
    return None


def tag_errors(
    prediction: str,
    reference: str,
    question: str = "",
    vocabulary: Optional[Set[str]] = None,
    truncated: bool = False,
    thresholds: Thresholds = Thresholds(),
) -> List[ErrorTag]:
    """All error tags of one generated answer, in `CATEGORIES` order; [] for an answer with no detected problem.

    vocabulary: known words (`build_vocabulary` over training data and references); None skips the unknown-word
      check but keeps the near-miss check against the reference.
    truncated: generation hit max_new_tokens without emitting EOS.
    """
    tokens = words(prediction)
    if not tokens:
        return [ErrorTag("empty", "no words in the answer")] + (
            [ErrorTag("truncated", "stopped at max_new_tokens")] if truncated else []
        )
    ref_tokens, question_tokens = words(reference), words(question)
    tags = [ErrorTag("truncated", "stopped at max_new_tokens without EOS")] if truncated else []
    found = (
        find_repetition(tokens, ref_tokens, thresholds),
        find_too_long(tokens, ref_tokens, thresholds),
        find_misspellings(tokens, ref_tokens, question_tokens, vocabulary, thresholds),
        find_off_topic(tokens, ref_tokens, question_tokens, thresholds),
    )
    return tags + [tag for tag in found if tag is not None]


def question_of(record: Mapping[str, Any]) -> str:
    """A record's question: its "question", else its "prompt" (the generation runner's samples carry that)."""
    return record.get("question", record.get("prompt", ""))


def error_report(
    records: Sequence[Mapping[str, Any]],
    vocabulary: Optional[Set[str]] = None,
    thresholds: Thresholds = Thresholds(),
    worst: int = 20,
) -> Dict[str, Any]:
    """Tag every record and summarise.

    records: dicts with prediction, reference, and optionally question (or prompt), truncated, id.
    Returns {"n", "counts": {category: n}, "rates": {category: share}, "clean": records with no tag,
    "examples": every tagged record (with its tags and token_f1), worst first, "worst": the first `worst` of them}.
    Worst means most tags, then lowest token-F1 against the reference.
    """
    examples = []
    for index, record in enumerate(records):
        tags = tag_errors(
            record["prediction"],
            record["reference"],
            question=question_of(record),
            vocabulary=vocabulary,
            truncated=bool(record.get("truncated", False)),
            thresholds=thresholds,
        )
        examples.append(
            {
                "id": record.get("id", index),
                "question": question_of(record),
                "reference": record["reference"],
                "prediction": record["prediction"],
                "token_f1": round(token_f1(record["prediction"], record["reference"]), 4),
                "tags": [asdict(tag) for tag in tags],
            }
        )
    counts = Counter(tag["category"] for example in examples for tag in example["tags"])
    tagged = sorted((e for e in examples if e["tags"]), key=lambda e: (-len(e["tags"]), e["token_f1"]))
    n = len(records)
    return {
        "n": n,
        "counts": {c: counts.get(c, 0) for c in CATEGORIES},
        "rates": {c: counts.get(c, 0) / n if n else 0.0 for c in CATEGORIES},
        "clean": n - len(tagged),
        "examples": tagged,
        "worst": tagged[:worst],
    }


def _cell(text: str, limit: int = 300) -> str:
    # A Markdown table cell: one line, pipes escaped, long texts cut so the table stays readable.
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def report_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: category counts, then the worst examples beside their references."""
    lines = [
        f"# Error analysis ({report['n']} answers, {report['clean']} without a tag)",
        "",
        "| category | count | share |",
        "|---|---:|---:|",
    ]
    lines += [f"| {c} | {report['counts'][c]} | {report['rates'][c]:.1%} |" for c in report["counts"]]
    lines += ["", "## Worst examples", "", "| id | question | reference | prediction | tags |", "|---|---|---|---|---|"]
    for e in report["worst"]:
        tags = "; ".join(f"{t['category']}: {t['detail']}" for t in e["tags"])
        cells = (e["id"], e["question"], e["reference"], e["prediction"], tags)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(
    report: Mapping[str, Any], jsonl_path: Union[str, Path, None], md_path: Union[str, Path, None]
) -> None:
    """Write every tagged example as one JSON line (for fixing the data) and/or the Markdown summary."""
    if jsonl_path is not None:
        with open(jsonl_path, "w", encoding="utf-8") as f:
            for example in report["examples"]:
                f.write(json.dumps(example, ensure_ascii=False) + "\n")
    if md_path is not None:
        Path(md_path).write_text(report_markdown(report), encoding="utf-8")
