import math

import pytest

from models.eval_metrics import (
    maj_at_k,
    majority_answer,
    mean_pass_at_k_unbiased,
    pass_at_k,
    pass_at_k_unbiased,
)


def test_pass_at_k():
    correct = [
        [False, False, True, False],  # any correct -> pass
        [False, False, False, False],  # none -> fail
        [True, True, True, True],  # pass
        [],  # no samples -> fail
    ]
    assert pass_at_k(correct) == 0.5
    assert pass_at_k([[1, 0], [0, 0], [0, 0]]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="no questions"):
        pass_at_k([])


def test_majority_answer_ties_go_to_first_seen():
    assert majority_answer(["3", "5", "5", "3", "7"]) == "3"  # 3 and 5 tie at 2; "3" is seen first
    assert majority_answer(["5", "3", "3", "5"]) == "5"
    assert majority_answer([None, "4", None, None, "2", "2"]) == "2"  # None does not vote
    assert majority_answer([None, None]) is None
    assert majority_answer([]) is None


def test_maj_at_k():
    answers = [
        ["12", "12", "7", None],  # majority 12 = truth
        ["3", "5", "5", "3"],  # tie 3 / 5 -> first seen "3" = truth
        ["5", "3", "3", "5"],  # tie 5 / 3 -> first seen "5" != truth "3"
        [None, None, None, None],  # no answer -> wrong
        [None, "8", None, None],  # a single vote wins over the Nones -> "8" = truth
        ["1", "2", "2", "9"],  # majority "2" != truth "1", though one sample is right
    ]
    truth = ["12", "3", "3", "4", "8", "1"]
    assert maj_at_k(answers, truth) == pytest.approx(3 / 6)
    # Pass@K of the same samples counts question 6 (and 3) as passed: pass >= maj.
    correct = [[a == t for a in row] for row, t in zip(answers, truth)]
    assert pass_at_k(correct) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="truths"):
        maj_at_k(answers, truth[:-1])


def test_pass_at_k_unbiased():
    # n = 5, c = 2, k = 2: 1 - C(3, 2) / C(5, 2) = 1 - 3 / 10 = 0.7
    assert pass_at_k_unbiased(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k_unbiased(5, 2, 1) == pytest.approx(0.4)  # k = 1: c / n
    assert pass_at_k_unbiased(5, 0, 3) == 0.0
    assert pass_at_k_unbiased(5, 3, 3) == 1.0  # n - c < k: every k-subset holds a correct one
    assert pass_at_k_unbiased(200, 13, 10) == pytest.approx(1 - math.comb(187, 10) / math.comb(200, 10))
    # k = n reduces to the plain Pass@K of the n samples.
    rows = [[True, False, False], [False, False, False], [False, True, True]]
    assert mean_pass_at_k_unbiased(rows, 3) == pytest.approx(pass_at_k(rows))
    assert mean_pass_at_k_unbiased(rows, 1) == pytest.approx((1 / 3 + 0 + 2 / 3) / 3)
    with pytest.raises(ValueError):
        pass_at_k_unbiased(3, 1, 4)
