"""Model comparison on crafted outputs with a known winner: table, deltas, error counts, win rates, Elo."""

from __future__ import annotations

import pytest

from ft_dist.eval.compare import (
    compare_models,
    elo_ratings,
    f1_judge,
    format_comparison,
    pairwise_preferences,
    win_rates,
)

ITEMS = [
    ("What does the liver filter?", "Blood."),
    ("Is Lamini free?", "Yes, Lamini is free to use."),
    ("What color is the sky?", "Blue."),
]
ANSWERS = {
    # Token-F1 per item: base 0, 0, 0; mid 0.5, 0.8, 0; finetuned 1, 1, 1.
    "base": ["time and money and time and money", "", "Green."],
    "mid": ["Blood and bones.", "Yes, Lamini is free.", "Green."],
    "finetuned": ["Blood.", "Yes, Lamini is free to use.", "Blue."],
}


def outputs(answers=ANSWERS):
    return {
        name: [{"question": q, "reference": r, "prediction": p} for (q, r), p in zip(ITEMS, preds)]
        for name, preds in answers.items()
    }


def test_f1_judge():
    assert f1_judge("q", "blood", "blood", "bones") == "a"
    assert f1_judge("q", "blood", "air", "the blood") == "b"
    assert f1_judge("q", "blood", "air", "bones") == "tie"


def test_win_rates_and_elo_find_the_known_winner():
    prefs = pairwise_preferences(outputs())
    # base-mid: mid wins 2, one tie (both F1 0); base-finetuned and mid-finetuned: finetuned wins all 3.
    assert prefs == [("base", "mid", o) for o in ("b", "b", "tie")] + [("base", "finetuned", "b")] * 3 + [
        ("mid", "finetuned", "b")
    ] * 3
    rates = win_rates(prefs, list(ANSWERS))
    assert rates["finetuned"] == {"wins": 6, "losses": 0, "ties": 0, "games": 6, "win_rate": 1.0}
    assert rates["mid"]["win_rate"] == pytest.approx(2.5 / 6)
    assert rates["base"]["win_rate"] == pytest.approx(0.5 / 6)
    elo = elo_ratings(prefs, list(ANSWERS))
    assert elo["finetuned"] > elo["mid"] > elo["base"]
    assert sum(elo.values()) == pytest.approx(3000.0)  # zero-sum updates around the 1000 start
    assert elo == elo_ratings(prefs, list(ANSWERS))  # seeded: reproducible


def test_elo_gap_grows_with_the_win_share():
    close = [("x", "y", "a")] * 6 + [("x", "y", "b")] * 4
    clear = [("x", "y", "a")] * 9 + [("x", "y", "b")] * 1
    gap = lambda prefs: (lambda e: e["x"] - e["y"])(elo_ratings(prefs, ["x", "y"]))  # noqa: E731
    assert 0 < gap(close) < gap(clear)
    assert elo_ratings([("x", "y", "tie")] * 10, ["x", "y"]) == {"x": 1000.0, "y": 1000.0}


def test_table_has_metrics_deltas_and_error_counts():
    result = compare_models(outputs())
    rows = {row["model"]: row for row in result["rows"]}
    assert [row["model"] for row in result["rows"]] == ["base", "mid", "finetuned"]
    assert rows["base"]["exact_match"] == 0.0 and rows["base"]["exact_match Δ"] is None
    assert rows["finetuned"]["exact_match"] == 1.0 and rows["finetuned"]["exact_match Δ"] == 1.0
    assert rows["mid"]["token_f1 Δ"] == pytest.approx((0.5 + 0.8) / 3)
    assert rows["base"]["repetition"] == 1 and rows["base"]["empty"] == 1
    assert rows["finetuned"]["repetition"] == rows["finetuned"]["empty"] == rows["finetuned"]["off_topic"] == 0
    assert rows["finetuned"]["win_rate"] == 1.0 and rows["finetuned"]["elo"] == max(result["elo"].values())
    text = format_comparison(result)
    assert text.splitlines()[0].startswith("| model | exact_match | exact_match Δ |")
    assert "| finetuned | 1.0000 | +1.0000 |" in text
    assert "Pairwise preferences" in text


def test_given_metrics_are_used_and_judging_can_be_skipped():
    metrics = {"base": {"acc": 0.25}, "mid": {"acc": 0.5}, "finetuned": {"acc": 0.75}}
    result = compare_models(outputs(), metrics=metrics, judge=None)
    assert [row["acc Δ"] for row in result["rows"]] == [None, 0.25, 0.5]
    assert "elo" not in result and "win_rate" not in result["rows"][0]


def test_custom_judge_and_misaligned_outputs():
    def longer(question, reference, a, b):
        return "a" if len(a) > len(b) else "b" if len(b) > len(a) else "tie"

    # base wins with its loop (vs mid and vs finetuned) and with "Green." over "Blue.".
    assert compare_models(outputs(), judge=longer)["win_rates"]["base"]["wins"] == 3
    with pytest.raises(ValueError, match="judge returned 'yes'"):
        pairwise_preferences(outputs(), judge=lambda *args: "yes")
    uneven = outputs()
    uneven["mid"] = uneven["mid"][:2]
    with pytest.raises(ValueError, match="mid has 2 outputs, base has 3"):
        compare_models(uneven)
    shuffled = outputs()
    shuffled["mid"] = shuffled["mid"][::-1]
    with pytest.raises(ValueError, match="item 0 differs between base and mid"):
        compare_models(shuffled)
