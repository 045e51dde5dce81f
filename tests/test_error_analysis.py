"""Error categories on crafted answers: each detector fires on its classic case and stays quiet on a correct one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ft_dist.eval.error_analysis import (
    CATEGORIES,
    Thresholds,
    build_vocabulary,
    error_report,
    tag_errors,
    write_report,
)

ASSETS = Path(os.environ.get("FT_DIST_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
LAMINI = ASSETS / "datasets" / "lamini_docs.jsonl"
QUESTION = "What does the liver do?"
REFERENCE = "The liver filters the blood and stores energy."
# A domain vocabulary that, like real English, knows "lever": only closeness to the reference can catch it.
VOCABULARY = build_vocabulary([QUESTION, REFERENCE, "Pull the lever to open the gate.", "Time is money."])


def categories(tags) -> list:
    return [tag.category for tag in tags]


def test_correct_answers_get_no_tag():
    assert tag_errors(REFERENCE, REFERENCE, QUESTION, VOCABULARY) == []
    # A paraphrase with inflections ("filter"/"filters", "stores"/"store") is not a misspelling.
    assert tag_errors("It filters blood and stores energy.", REFERENCE, QUESTION, VOCABULARY) == []
    assert tag_errors("Liver filter the blood, store energy", REFERENCE, QUESTION, VOCABULARY) == []


def test_real_word_misspelling_is_caught_by_closeness_to_the_reference():
    assert "lever" in VOCABULARY  # the vocabulary check alone would pass it
    tags = tag_errors("The lever filters the blood and stores energy.", REFERENCE, QUESTION, VOCABULARY)
    assert categories(tags) == ["misspelling"]
    assert tags[0].evidence["words"] == [{"word": "lever", "suggestion": "liver", "reason": "near a reference word"}]
    assert "'lever' -> 'liver'" in tags[0].detail


def test_unknown_word_is_a_misspelling_with_a_suggestion():
    # "filtres" is out of vocabulary; a swap of neighbours ("sotres") counts as one edit.
    tags = tag_errors("The liver filtres the blood and sotres energy.", REFERENCE, QUESTION, VOCABULARY)
    assert categories(tags) == ["misspelling"]
    found = {w["word"]: w["suggestion"] for w in tags[0].evidence["words"]}
    assert found == {"filtres": "filters", "sotres": "stores"}
    # Without a vocabulary only the near-miss check runs; it still finds both, they are near reference words.
    assert categories(tag_errors("The liver filtres blood.", REFERENCE, QUESTION)) == ["misspelling"]


def test_repetition_reports_the_repeated_span():
    tags = tag_errors("time and money and time and money", "It saves time and money.", "Why use Lamini?")
    assert categories(tags) == ["repetition"]
    assert tags[0].evidence == {"span": "time and money", "count": 2, "n": 3}
    (run,) = tag_errors("no no no no", "No.", "Is it free?")
    assert run.evidence == {"span": "no", "count": 4}
    # The loop "a b c" is reported, not its rotation "b c a b".
    (loop,) = [t for t in tag_errors("red green blue red green blue red green blue", "red", "") if t.category ==
               "repetition"]
    assert loop.evidence == {"span": "red green blue", "count": 3, "n": 3}


def test_repetition_the_reference_shares_or_prose_repeats_is_not_an_error():
    reference = "Use the Lamini library to train, then call the Lamini library to run."
    assert tag_errors(reference, reference, "How do I use Lamini?") == []
    # Twice, far apart: how people write, not a generation loop.
    prediction = "The LLM engine runs your models, and you can call the LLM engine from Python."
    assert "repetition" not in categories(tag_errors(prediction, "Use the engine.", "How?"))


def test_too_long_uses_the_configurable_ratio():
    reference = "Yes, Lamini can be used for free."
    prediction = "Yes, Lamini can be used for free, and it also offers paid plans with support for larger teams."
    (tag,) = tag_errors(prediction, reference, "Is Lamini free?")
    assert tag.category == "too_long" and tag.evidence["words"] == 18 and tag.evidence["reference_words"] == 7
    assert tag_errors(prediction, reference, "Is Lamini free?", thresholds=Thresholds(max_length_ratio=3.0)) == []
    # A 1-word reference does not make a 3-word answer "too long": it needs min_extra_words more words.
    assert tag_errors("Yes, it is.", "Yes.", "Is it?") == []


def test_empty_and_truncated():
    assert categories(tag_errors("  ", REFERENCE, QUESTION)) == ["empty"]
    assert categories(tag_errors("", REFERENCE, QUESTION, truncated=True)) == ["empty", "truncated"]
    assert categories(tag_errors("The liver filters", REFERENCE, QUESTION, truncated=True)) == ["truncated"]


def test_off_topic_needs_low_overlap_with_question_and_reference():
    tags = tag_errors("Paris is the capital of France.", REFERENCE, QUESTION, VOCABULARY | {"paris", "capital"})
    assert "off_topic" in categories(tags)
    assert tags[-1].evidence == {"question_overlap": 0.0, "reference_overlap": 0.0}
    # Echoing the question's topic without the reference's facts is on topic.
    assert tag_errors("The liver does many things.", REFERENCE, QUESTION) == []


def test_report_counts_ranks_and_exports(tmp_path):
    records = [
        {"question": QUESTION, "reference": REFERENCE, "prediction": REFERENCE},
        {"question": QUESTION, "reference": REFERENCE, "prediction": "The lever filters the blood and stores energy."},
        # The generation runner's samples carry the templated "prompt" instead of a question.
        {"prompt": QUESTION, "reference": REFERENCE, "prediction": "", "truncated": True, "id": "x7"},
        {
            "question": "Why?",
            "reference": "It saves you time and money.",
            "prediction": "time and money and time and money | x",
        },
    ]
    report = error_report(records, VOCABULARY, worst=2)
    assert report["n"] == 4 and report["clean"] == 1
    assert report["counts"] == {
        "empty": 1, "truncated": 1, "repetition": 1, "too_long": 0, "misspelling": 1, "off_topic": 0,
    }
    assert list(report["counts"]) == list(CATEGORIES)
    # Two tags first; then the lower token-F1 (the repetition, F1 0.43, before the 'lever' answer, 0.83).
    assert [e["id"] for e in report["examples"]] == ["x7", 3, 1]
    assert report["examples"][0]["question"] == QUESTION
    assert len(report["worst"]) == 2
    jsonl, md = tmp_path / "errors.jsonl", tmp_path / "errors.md"
    write_report(report, jsonl, md)
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["x7", 3, 1]
    assert lines[2]["tags"][0]["evidence"]["words"][0]["suggestion"] == "liver"
    text = md.read_text()
    assert "| misspelling | 1 | 25.0% |" in text
    assert "time and money and time and money \\| x" in text  # a pipe cannot break the table
    assert "lever" not in text  # only the 2 worst examples are shown


@pytest.mark.skipif(not LAMINI.exists(), reason="lamini_docs.jsonl not present")
def test_references_tagged_against_themselves_are_clean_on_real_data():
    """No false positives on real answers: each lamini_docs answer, as its own prediction, gets no tag."""
    rows = [json.loads(line) for line in LAMINI.read_text().splitlines()[:200]]
    vocabulary = build_vocabulary(r["question"] + " " + r["answer"] for r in rows)
    records = [{"question": r["question"], "reference": r["answer"], "prediction": r["answer"]} for r in rows]
    assert error_report(records, vocabulary)["clean"] == len(records)
