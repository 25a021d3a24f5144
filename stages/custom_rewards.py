"""Reward functions a user names by import path (`reward.sources: [{name: "my_pkg.rewards:format_bonus"}]`).

The calling convention is TRL's: `fn(prompts, completions, **fields)` with one entry per row in each list
(the rendered prompt texts, the completion texts, and as keyword lists the problem's `question_id`,
`answer`, `solution`, the row's `sample_index`, and `steps`: each completion's text cut at its step
ends), returning one float per completion (an outcome score) or one list of floats per completion,
one per step (a process score). The function may be `async`. Take `**kwargs` to ignore what you do not use.
"""
from __future__ import annotations

import asyncio
import importlib
import inspect
import math
from collections.abc import Callable

SEPARATOR = ":"


def is_function_path(name: str) -> bool:
    return SEPARATOR in name


def load_reward_function(path: str) -> Callable:
    """The callable at 'package.module:function'; ValueError saying what is wrong with the path."""
    module_name, _, attr = path.partition(SEPARATOR)
    if not module_name or not attr:
        raise ValueError(f"{path!r}: an import path is 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 -- any import failure is the path's problem to the user
        raise ValueError(f"{path!r}: cannot import {module_name!r} ({type(err).__name__}: {err})") from err
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"{path!r}: {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise ValueError(f"{path!r}: {attr!r} is not callable")
    return fn


def call_reward_function(fn: Callable, prompts: list[str], completions: list[str], fields: dict[str, list]) -> list:
    """fn's scores for these rows, awaited when fn is async; ValueError when they are not one per row."""
    out = fn(prompts, completions, **fields)
    if inspect.isawaitable(out):
        out = asyncio.run(_awaited(out))
    out = list(out)
    if len(out) != len(completions):
        raise ValueError(f"returned {len(out)} scores for {len(completions)} completions")
    return out


async def _awaited(awaitable):
    return await awaitable


def checked_score(value, n_steps: int) -> tuple[float | None, list[float] | None]:
    """(outcome, None) for a number, (None, steps) for one number per step; ValueError otherwise."""
    if isinstance(value, (list, tuple)):
        steps = [float(x) for x in value]
        if len(steps) != n_steps:
            raise ValueError(f"returned {len(steps)} step scores for a completion of {n_steps} steps")
        if not all(math.isfinite(x) for x in steps):
            raise ValueError(f"non-finite step score in {steps}")
        return None, steps
    score = float(value)
    if not math.isfinite(score):
        raise ValueError(f"non-finite score {score}")
    return score, None
