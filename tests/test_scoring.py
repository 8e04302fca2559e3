"""The scores of generated answers (dstrain.scoring): Latin and Chinese text, empty answers, exact match."""

import pytest

from dstrain.scoring import SCORES, rouge_tokens, score


def test_an_answer_equal_to_its_reference_scores_1_on_everything():
    answer = "The capital of Australia is Canberra."
    assert score([answer], [answer]) == pytest.approx(dict.fromkeys(SCORES, 1.0))


def test_a_chinese_answer_equal_to_its_reference_scores_1_where_rouge_scores_default_would_give_0():
    from rouge_score.rouge_scorer import RougeScorer

    answer = "东汉的蔡伦改进了造纸术，使纸张成本更低。"
    assert RougeScorer(["rouge1"]).score(answer, answer)["rouge1"].fmeasure == 0
    assert score([answer], [answer]) == pytest.approx(dict.fromkeys(SCORES, 1.0))


def test_chinese_is_scored_by_character_and_latin_by_word():
    assert rouge_tokens("3加4等于7。Hello, World") == ["3", "加", "4", "等", "于", "7", "hello", "world"]
    results = score(["3加4等于8。"], ["3加4等于7。"])
    # Five of the six characters and digits agree, in order.
    assert results["rouge1"] == pytest.approx(5 / 6)
    assert results["rougeL"] == pytest.approx(5 / 6)
    assert 0 < results["bleu"] < 1 and results["exact_match"] == 0


def test_a_partly_right_latin_answer_scores_between_0_and_1():
    results = score(["The cat sleeps in the garden."], ["The cat sleeps in the garden every morning."])
    assert 0 < results["bleu"] < 1
    assert results["rouge1"] == pytest.approx(2 * 1 * (6 / 8) / (1 + 6 / 8))
    assert results["rouge2"] < results["rouge1"] and results["exact_match"] == 0


def test_short_answers_can_score_bleu():
    # Two tokens each: plain corpus BLEU would be 0 without the effective n-gram order.
    assert score(["Positive.", "Negative."], ["Positive.", "Negative."], ["bleu"]) == {"bleu": pytest.approx(1.0)}


def test_an_empty_answer_scores_0_and_exact_match_ignores_whitespace():
    assert score([""], ["Jupiter is the largest planet."]) == dict.fromkeys(SCORES, 0.0)
    matches = score(["  Jupiter  is\nthe largest planet. ", "Saturn."], ["Jupiter is the largest planet.", "Jupiter."],
                    ["exact_match"])
    assert matches == {"exact_match": 0.5}


def test_only_the_named_scores_are_computed_and_pairs_are_required():
    assert set(score(["a b"], ["a b"], ["rouge2", "exact_match"])) == {"rouge2", "exact_match"}
    with pytest.raises(ValueError, match="pairs"):
        score(["a"], [])
    with pytest.raises(ValueError, match="pairs"):
        score([], [])
