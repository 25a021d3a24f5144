"""Scoring a step's rollouts: reward columns added to its table, in memory.

`score_rollouts(table, reward_cfg, tokenizer=..., reward_models=..., pretrained=..., max_new_tokens=...)` adds
`SCORE_FIELDS`:
- `step_ends`: completion-token indices where each step ends (newline tokens; the last token),
- `step_labels`: the verifier's per-step correctness, one per step end,
- `reward`: the weighted sum of the sources' outcome views (see `models.rewards`),
- `step_rewards`: the weighted sum of the sources' process views, one per step end,
plus `reward_<source>` (each source's outcome view, `reward_column`) and `reward_errors` (the sources
that failed on the row and were scored 0 under `on_error: zero`; empty otherwise).

Sources: `verifier` (problems.verify), the learned `outcome_rm` / `process_rm`, `overlong` (DAPO's soft
length penalty, models.rewards.overlong_penalty), a pretrained reward model under the user's label
(stages.pretrained_rewards), and a user's function named by import path (stages.custom_rewards).

A source that raises or gives a non-finite score for a row fails the call with a message naming the
row (question_id, sample_index) and the source, unless `reward_cfg.on_error == "zero"`; a source that
fails on every row of the step fails it whatever `on_error` says.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import pyarrow as pa

from models.advantages import delimiter_token_ids, step_ends_from_tokens
from models.reward_model import ValueHeadRewardModel
from models.rewards import (combine_outcome, combine_process, is_bad, outcome_from_steps, overlong_penalty,
                            source_weights, steps_from_outcome)
from problems.verify import is_correct, split_steps, step_correctness
from stages.custom_rewards import call_reward_function, checked_score, is_function_path, load_reward_function
from stages.pretrained_rewards import PretrainedRewardModel, pretrained_scores
from stages.rollout_store import with_columns

RM_SOURCES = {"outcome_rm": "outcome", "process_rm": "process"}


def reward_column(source: str) -> str:
    """The column of a source's outcome view: `reward_verifier`; a function's path with its dots and colon
    as underscores (`reward_my_pkg_rewards_format_bonus`)."""
    return "reward_" + re.sub(r"[^A-Za-z0-9_]", "_", source)


class RewardError(RuntimeError):
    """A reward source failed on a row (the message names the row and the source)."""


def step_texts(tokenizer, completion_ids: Sequence[int], step_ends: Sequence[int]) -> list[str]:
    """The decoded text of each token step (special tokens such as EOS dropped)."""
    texts, start = [], 0
    for e in step_ends:
        texts.append(tokenizer.decode(list(completion_ids[start:e + 1]), skip_special_tokens=True))
        start = e + 1
    return texts


def align_line_labels(texts: Sequence[str], line_labels: Sequence[bool]) -> list[bool]:
    """Per-token-step labels from per-line labels of `"".join(texts)` (lines as `split_steps`).

    A token step is correct when every line ending inside it is; a step in which no line ends (an
    EOS-only step after a final newline) takes the label of the step before it (False if first).
    """
    full = "".join(texts)
    ends, total = [], 0
    for t in texts:
        total += len(t)
        ends.append(total)  # exclusive char end of each step
    per_step: list[list[bool]] = [[] for _ in texts]
    pos = 0
    for k, line in enumerate(split_steps(full)):
        last = pos + len(line)  # index of the line's "\n", or len(full) for an unterminated last line
        last_char = last if last < len(full) else len(full) - 1
        j = next((j for j, e in enumerate(ends) if e > last_char), len(texts) - 1)
        if k < len(line_labels):
            per_step[j].append(bool(line_labels[k]))
        pos = last + 1
    labels: list[bool] = []
    for lab in per_step:
        labels.append(all(lab) if lab else (labels[-1] if labels else False))
    return labels


def verifier_step_labels(tokenizer, completion_ids: Sequence[int], step_ends: Sequence[int], solution: str,
                         answer: str, *, last_number: bool = False) -> list[bool]:
    """`problems.verify.step_correctness`, one label per token step."""
    texts = step_texts(tokenizer, completion_ids, step_ends)
    return align_line_labels(texts, step_correctness("".join(texts), solution, answer, last_number=last_number))


def _item(rows: list[dict], i: int) -> str:
    r = rows[i]
    return f"question_id={r.get('question_id')!r} sample_index={r.get('sample_index')}"


def _rm_scores(rm: ValueHeadRewardModel, prompts, completions, positions, batch_size: int, mode: str):
    """Per-row step scores and {row: error message}; a failing batch is retried row by row so the
    failure is pinned to a row."""
    scores: list[list[float] | None] = [None] * len(completions)
    errors: dict[int, str] = {}
    for s in range(0, len(completions), batch_size):
        idx = list(range(s, min(s + batch_size, len(completions))))
        try:
            out = rm.score([prompts[i] for i in idx], [completions[i] for i in idx], [positions[i] for i in idx],
                           batch_size=batch_size, score_mode=mode)
            for i, v in zip(idx, out):
                scores[i] = v
        except Exception:  # noqa: BLE001 -- attribute to a row below
            for i in idx:
                try:
                    scores[i] = rm.score([prompts[i]], [completions[i]], [positions[i]], score_mode=mode)[0]
                except Exception as err:  # noqa: BLE001
                    errors[i] = f"{type(err).__name__}: {err}"
    for i, v in enumerate(scores):
        if i not in errors and (v is None or any(is_bad(x) for x in v)):
            errors[i] = f"non-finite score {v}"
    return scores, errors


def _function_scores(fn, rows: list[dict], texts: list[str], steps: list[list[str]]):
    """(outcome view, process view, {row: error}) of a user's reward function (stages.custom_rewards); a
    failing batch call is retried row by row so the failure is pinned to a row."""
    prompts = [r.get("prompt") or "" for r in rows]
    fields = {k: [r.get(k) for r in rows] for k in ("question_id", "sample_index", "answer", "solution")}
    values: list = [None] * len(rows)
    errors: dict[int, str] = {}
    try:
        values = call_reward_function(fn, prompts, texts, {**fields, "steps": steps})
    except Exception:  # noqa: BLE001 -- attribute to a row below
        for i in range(len(rows)):
            try:
                values[i] = call_reward_function(fn, prompts[i:i + 1], texts[i:i + 1],
                                                 {**{k: v[i:i + 1] for k, v in fields.items()},
                                                  "steps": steps[i:i + 1]})[0]
            except Exception as err:  # noqa: BLE001
                errors[i] = f"{type(err).__name__}: {err}"
    out_v, proc_v = [], []
    for i, value in enumerate(values):
        score, step_scores = 0.0, None
        if i not in errors:
            try:
                score, step_scores = checked_score(value, len(steps[i]))
            except (TypeError, ValueError) as err:
                errors[i], score = f"{type(err).__name__}: {err}", 0.0
        if step_scores is not None:
            out_v.append(outcome_from_steps(step_scores))
            proc_v.append(step_scores)
        else:
            out_v.append(score)
            proc_v.append(steps_from_outcome(score, len(steps[i])))
    return out_v, proc_v, errors


def score_rollouts(table: pa.Table, reward_cfg, *, tokenizer,
                   reward_models: Mapping[str, ValueHeadRewardModel] | None = None,
                   pretrained: Mapping[str, PretrainedRewardModel] | None = None,
                   max_new_tokens: int | None = None, batch_size: int = 64) -> pa.Table:
    """`table` (a step's sampled rows) with the reward columns added.

    reward_cfg: a `RewardConfig` (sources, on_error, rm_score, overlong_buffer). tokenizer: the policy's
    tokenizer. reward_models: the loaded learned reward models, keyed by source name. pretrained: the
    loaded pretrained reward models, keyed by their sources' labels. max_new_tokens: the sampling limit
    (`overlong` needs it).
    """
    rows = table.select([c for c in ("question_id", "sample_index", "prompt", "prompt_ids", "completion_ids",
                                     "completion", "answer", "solution") if c in table.column_names]).to_pylist()
    weights = source_weights(reward_cfg.sources)
    pretrained_sources = {s.name: s for s in reward_cfg.sources if s.model is not None}
    delims = delimiter_token_ids(tokenizer)
    prompts = [r["prompt_ids"] for r in rows]
    completions = [r["completion_ids"] for r in rows]
    step_ends = [step_ends_from_tokens(c, delims) for c in completions]
    last_number = reward_cfg.verifier.last_number
    step_labels = [verifier_step_labels(tokenizer, c, e, r.get("solution") or "", r["answer"], last_number=last_number)
                   for r, c, e in zip(rows, completions, step_ends)]

    texts = [r["completion"] if r.get("completion") is not None
             else tokenizer.decode(completions[i], skip_special_tokens=True) for i, r in enumerate(rows)]

    outcome: dict[str, list[float]] = {}
    process: dict[str, list[list[float]]] = {}
    failed: list[list[str]] = [[] for _ in rows]
    for name in weights:
        errors: dict[int, str] = {}
        if name == "verifier":
            out_v, proc_v = [], []
            for i, r in enumerate(rows):
                try:
                    out_v.append(float(is_correct(texts[i], r["answer"], last_number=last_number)))
                except Exception as err:  # noqa: BLE001
                    errors[i] = f"{type(err).__name__}: {err}"
                    out_v.append(0.0)
                proc_v.append([float(x) for x in step_labels[i]])
        elif name in RM_SOURCES:
            kind = RM_SOURCES[name]
            rm = (reward_models or {}).get(name)
            if rm is None:
                raise RewardError(f"reward source {name!r} is configured but no {name} model was given")
            if rm.kind != kind:
                raise RewardError(f"reward source {name!r} needs a {kind} reward model, got a {rm.kind} one")
            positions = ([[len(c) - 1] for c in completions] if kind == "outcome" else step_ends)
            raw, errors = _rm_scores(rm, prompts, completions, positions, batch_size, reward_cfg.rm_score)
            out_v, proc_v = [], []
            for i, v in enumerate(raw):
                v = [0.0] * len(positions[i]) if i in errors or v is None else v
                if kind == "outcome":
                    out_v.append(float(v[0]))
                    proc_v.append(steps_from_outcome(v[0], len(step_ends[i])))
                else:
                    out_v.append(outcome_from_steps(v))
                    proc_v.append([float(x) for x in v])
        elif name == "overlong":
            if max_new_tokens is None:
                raise RewardError("reward source 'overlong' is configured but no max_new_tokens was given")
            out_v = [overlong_penalty(n, max_new_tokens, reward_cfg.overlong_buffer)
                     for n in table.column("completion_length").to_pylist()]
            proc_v = [steps_from_outcome(v, len(e)) for v, e in zip(out_v, step_ends)]
        elif name in pretrained_sources:
            rm = (pretrained or {}).get(name)
            if rm is None:
                raise RewardError(f"reward source {name!r} is configured but its model was not given")
            out_v, errors = pretrained_scores(rm, [r.get("prompt") or "" for r in rows], texts,
                                              pretrained_sources[name].batch_size)
            proc_v = [steps_from_outcome(v, len(e)) for v, e in zip(out_v, step_ends)]
        elif is_function_path(name):
            steps = [step_texts(tokenizer, c, e) for c, e in zip(completions, step_ends)]
            out_v, proc_v, errors = _function_scores(load_reward_function(name), rows, texts, steps)
        else:
            raise RewardError(f"unknown reward source {name!r}")
        if errors:
            if len(errors) == len(rows):  # zeroing every row would train on nothing but this source's failure
                i = min(errors)
                raise RewardError(f"reward source {name!r} failed on every row of the step ({len(rows)}), e.g. "
                                  f"{_item(rows, i)}: {errors[i]}")
            if reward_cfg.on_error == "fail":
                i = min(errors)
                raise RewardError(f"reward source {name!r} failed on {_item(rows, i)}: {errors[i]}"
                                  + (f" (and {len(errors) - 1} more rows)" if len(errors) > 1 else ""))
            for i in errors:  # on_error == "zero": scored 0, recorded in reward_errors
                out_v[i] = 0.0
                proc_v[i] = [0.0] * len(step_ends[i])
                failed[i].append(name)
        outcome[name], process[name] = out_v, proc_v

    columns = {
        "reward": pa.array(combine_outcome(outcome, weights), pa.float32()),
        "step_ends": pa.array(step_ends, pa.list_(pa.int32())),
        "step_rewards": pa.array(combine_process(process, weights), pa.list_(pa.float32())),
        "step_labels": pa.array(step_labels, pa.list_(pa.bool_())),
    }
    for name in weights:
        columns[reward_column(name)] = pa.array(outcome[name], pa.float32())
    columns["reward_errors"] = pa.array(failed, pa.list_(pa.string()))
    return with_columns(table, columns)

