"""Combining reward sources, and Math-Shepherd step labels. Pure functions, no models or files.

Every source has two views of a completion:
- outcome view: one number (verifier: 1/0 final-answer check; outcome RM: its score; process RM:
  the minimum of its step scores, the usual "a solution is as good as its weakest step"),
- process view: one number per step (verifier: the 1/0 step checks; process RM: its step scores;
  outcome RM / outcome-only scores: the score on the last step, 0 on the others).
Sources combine as a weighted sum of the same view: before group normalisation for outcome
supervision, step by step for process supervision.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def outcome_from_steps(step_scores: Sequence[float]) -> float:
    """A process score's outcome view: the weakest step (0.0 for a completion with no steps)."""
    return float(min(step_scores)) if len(step_scores) else 0.0


def steps_from_outcome(score: float, n_steps: int) -> list[float]:
    """An outcome score's process view: all of it on the last step."""
    return [0.0] * (n_steps - 1) + [float(score)] if n_steps > 0 else []


def source_weights(sources: Sequence) -> dict[str, float]:
    """[(name, weight) | RewardSource] -> {name: total weight} (a name listed twice adds up)."""
    out: dict[str, float] = {}
    for s in sources:
        name, weight = (s.name, s.weight) if hasattr(s, "name") else s
        out[name] = out.get(name, 0.0) + float(weight)
    return out


def combine_outcome(scores: Mapping[str, Sequence[float]], weights: Mapping[str, float]) -> list[float]:
    """sum_s w_s * scores[s][i] for each item i: the process combination with one step per item."""
    one_step = {name: [[x] for x in values] for name, values in scores.items()}
    return [steps[0] for steps in combine_process(one_step, weights)]


def combine_process(step_scores: Mapping[str, Sequence[Sequence[float]]],
                    weights: Mapping[str, float]) -> list[list[float]]:
    """Per step: sum_s w_s * step_scores[s][i][j]; every source must give item i the same step count."""
    missing = set(weights) - set(step_scores)
    if missing:
        raise ValueError(f"no step scores for reward sources {sorted(missing)}")
    lengths = {name: len(step_scores[name]) for name in weights}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"reward sources scored different numbers of items: {lengths}")
    n = next(iter(lengths.values()), 0)
    out = []
    for i in range(n):
        counts = {name: len(step_scores[name][i]) for name in weights}
        if len(set(counts.values())) > 1:
            raise ValueError(f"item {i}: reward sources gave different step counts {counts}")
        k = next(iter(counts.values()), 0)
        out.append([sum(w * float(step_scores[name][i][j]) for name, w in weights.items()) for j in range(k)])
    return out


def is_bad(value) -> bool:
    """None or non-finite: a score that must not reach the advantages."""
    return value is None or not math.isfinite(float(value))


def math_shepherd_labels(results: Sequence[Sequence[bool]], mode: str = "hard") -> list[float]:
    """Math-Shepherd step labels from rollouts: `results[j]` holds whether each of the k completions
    continued from the prefix ending at step j reached the right answer.

    hard: 1.0 if any completion reached it, else 0.0. soft: the fraction that did.
    A step with no rollouts is an error (its label would be made up).
    """
    if mode not in ("hard", "soft"):
        raise ValueError(f"unknown Math-Shepherd mode {mode!r}; expected 'hard' or 'soft'")
    labels = []
    for j, r in enumerate(results):
        if not len(r):
            raise ValueError(f"step {j}: no rollouts to estimate its label from")
        hits = sum(bool(x) for x in r)
        labels.append(float(hits > 0) if mode == "hard" else hits / len(r))
    return labels


def overlong_penalty(length: int, max_len: int, buffer: int) -> float:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13) of a completion of `length` tokens, with
    L_max = `max_len` (the sampling limit) and L_cache = `buffer`:

        R = 0                                        if length <= L_max - L_cache
        R = ((L_max - L_cache) - length) / L_cache   if L_max - L_cache < length <= L_max
        R = -1                                       if length > L_max

    The penalty grows linearly from 0 to -1 across the last `buffer` tokens: length is punished by
    degrees as it nears the limit, not by one cliff at it that a sound but long answer falls off too.
    """
    if not 0 < buffer < max_len:
        raise ValueError(f"the overlong buffer ({buffer}) must be above 0 and below the length limit ({max_len})")
    if length > max_len:
        return -1.0
    return min(0.0, ((max_len - buffer) - length) / buffer)
