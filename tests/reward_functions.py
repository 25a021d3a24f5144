"""Reward functions for `reward.sources` by import path (the README's examples; tests/test_custom_rewards.py)."""
from problems.verify import extract_answer


def format_bonus(prompts, completions, **kwargs):
    """1 when the completion gives an answer the verifier can read ('#### N', \\boxed{N}, 'the answer is N')."""
    return [1.0 if extract_answer(c) is not None else 0.0 for c in completions]


def length_penalty(prompts, completions, **kwargs):
    """-1 per 100 characters beyond the first 100: a nudge towards short answers (weight it small)."""
    return [-max(0, len(c) - 100) / 100 for c in completions]


def equation_steps(prompts, completions, steps, **kwargs):
    """A process score: 1 for each step that writes an equation, else 0."""
    return [[1.0 if "=" in s else 0.0 for s in row] for row in steps]


async def async_answer_length(prompts, completions, answer, **kwargs):
    """An async source (a judge behind an API would be one): the length of the reference answer."""
    return [float(len(a)) for a in answer]


def fails_on_35(prompts, completions, **kwargs):
    if any("35" in c for c in completions):
        raise ValueError("cannot score 35")
    return [0.5] * len(completions)


def one_too_many(prompts, completions, **kwargs):
    return [1.0] * (len(completions) + 1)
