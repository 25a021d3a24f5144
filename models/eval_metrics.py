"""Sampling-based evaluation metrics: Pass@K, Maj@K, and the unbiased pass@k estimator.

Pure functions over Python lists (one row per question, one entry per sample). Rows may
have different lengths. An empty list of questions is an error, not 0: a metric over no
questions is undefined and almost always a bug upstream.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence


def _check_questions(rows: Sequence, name: str) -> None:
    if len(rows) == 0:
        raise ValueError(f"{name}: no questions")


def pass_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Fraction of questions with at least one correct sample among their K.

    correct: [n_questions][K] flags. A question with no samples counts wrong.
    """
    _check_questions(correct, "pass_at_k")
    return sum(any(bool(c) for c in row) for row in correct) / len(correct)


def majority_answer(answers: Sequence[Hashable | None]) -> Hashable | None:
    """The most frequent non-None answer; None if there is none.

    Ties go to the tied answer whose first occurrence comes earliest in `answers`
    (sample order), so the result does not depend on hashing or sorting.
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == top)


def maj_at_k(answers: Sequence[Sequence[Hashable | None]], truth: Sequence[Hashable]) -> float:
    """Fraction of questions whose majority-vote answer equals the truth (self-consistency).

    answers: [n_questions][K] extracted final answers (already normalised, e.g. by the
    task's verifier), None where no answer could be extracted; None answers do not vote.
    truth: [n_questions]. Ties: see `majority_answer` (first-seen among the tied).
    A question with no answer at all counts wrong.
    """
    _check_questions(answers, "maj_at_k")
    if len(answers) != len(truth):
        raise ValueError(f"{len(answers)} answer rows but {len(truth)} truths")
    hits = 0
    for row, t in zip(answers, truth):
        voted = majority_answer(row)
        hits += voted is not None and voted == t
    return hits / len(answers)


def pass_at_k_unbiased(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021):

        1 - C(n - c, k) / C(n, k)

    computed as 1 - prod_{i = n-c+1}^{n} (1 - k / i), stable for large n.
    Needs 0 <= c <= n and 1 <= k <= n.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k_unbiased(correct: Sequence[Sequence[bool]], k: int) -> float:
    """Mean over questions of pass_at_k_unbiased(n_q, c_q, k); correct: [n_questions][n_q]."""
    _check_questions(correct, "mean_pass_at_k_unbiased")
    return sum(pass_at_k_unbiased(len(row), sum(map(bool, row)), k) for row in correct) / len(correct)
