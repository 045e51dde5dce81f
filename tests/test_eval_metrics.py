"""Generation metrics on crafted pairs whose values are worked out by hand."""

from __future__ import annotations

import pytest

from ft_dist.eval.text_metrics import example_scores, normalize, rouge_l, score_generations, token_f1


def test_normalize_drops_case_punctuation_and_articles():
    assert normalize("  The Liver, filters  a BLOOD! ") == "liver filters blood"


def test_exact_and_normalised_match():
    scores = score_generations(["Paris ", "the Paris.", "Lyon"], ["Paris", "Paris", "Paris"])
    assert scores["exact_match"] == pytest.approx(1 / 3)  # only whitespace is forgiven
    assert scores["normalized_match"] == pytest.approx(2 / 3)


def test_token_f1_squad_style():
    # Prediction tokens {liver, filters, blood, daily}, reference {liver, cleans, blood}: 2 in common.
    # precision 2/4, recall 2/3, F1 = 2 * 0.5 * 0.667 / 1.167 = 4/7.
    assert token_f1("The liver filters blood daily.", "the liver cleans blood") == pytest.approx(4 / 7)
    assert token_f1("blood blood", "blood") == pytest.approx(2 / 3)  # multiset: one "blood" matches
    assert token_f1("", "") == 1.0 and token_f1("a", "blood") == 0.0  # "a" normalises away: empty vs not


def test_rouge_l_is_longest_common_subsequence_f_measure():
    # LCS of "the cat sat on the mat" / "the cat was on the mat" is 5 of 6 tokens each way.
    assert rouge_l("the cat was on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    # Word order matters for ROUGE-L but not for token-F1: reversed, LCS is 1 of 3, F1 stays 1.
    assert rouge_l("c b a", "a b c") == pytest.approx(1 / 3)
    assert token_f1("c b a", "a b c") == 1.0


def test_score_generations_averages_all_four_metrics():
    scores = score_generations(["the cat was on the mat", "Paris"], ["the cat sat on the mat", "Paris"])
    # Token-F1 drops the articles: {cat, was, on, mat} vs {cat, sat, on, mat}, 3 of 4; ROUGE-L keeps them: 5 of 6.
    assert scores == pytest.approx(
        {"exact_match": 0.5, "normalized_match": 0.5, "token_f1": (3 / 4 + 1) / 2, "rouge_l": (5 / 6 + 1) / 2}
    )
    assert example_scores("Paris", "paris") == {
        "exact_match": 0.0, "normalized_match": 1.0, "token_f1": 1.0, "rouge_l": 1.0,
    }


def test_score_generations_rejects_unpaired_lists():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        score_generations(["a", "b"], ["a"])
    assert score_generations([], []) == {"exact_match": 0.0, "normalized_match": 0.0, "token_f1": 0.0, "rouge_l": 0.0}
