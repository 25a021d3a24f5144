"""DAPO's dynamic sampling (arXiv 2503.14476, section 3.2): which of a step's sampled groups it trains on.

A group whose G outputs all scored alike has every advantage 0: it adds no policy gradient, so a step
with many such groups learns from fewer questions than `loop.questions_per_step`. Under
`sampling.dynamic_sampling` the flow (flows/iterative_grpo.py, `scored_groups`) samples and scores
rounds of new questions until it has that many informative groups; this module does the table work:

    informative_groups(table, group_size, supervision) -> positions of the groups with a nonzero advantage
    keep_informative(rounds, questions, group_size, supervision) -> the step's table, group_index 0..n-1
    drawn_metrics(table) -> {"dynamic_groups_drawn", "dynamic_groups_flat", "dynamic_rounds"}

What was drawn travels in the kept table's schema metadata: the step's Parquet file is what a redone
step reads back (`RunJournal.stored_rollouts`), and its metrics must not depend on which happened.
"""
from __future__ import annotations

import json

import pyarrow as pa

from stages.rollout_store import with_columns

METADATA_KEY = b"dynamic_sampling"


def informative_groups(table: pa.Table, group_size: int, supervision: str) -> list[int]:
    """The positions (0, 1, ... in row order; rows group after group) of the groups whose advantages are
    not all 0, read from the scores before any advantage is computed.

    outcome: the group's rewards differ. process: the group's step rewards, pooled over its outputs, differ.
    Process advantages are made from the step rewards alone (models.advantages.process_advantages zeroes a
    group whose pooled step rewards are one value), so there a group whose outcome rewards differ but whose
    steps all scored alike is flat, and one whose outputs all got the same outcome but whose steps scored
    differently is not: "rewards differ OR step rewards differ" would keep groups the update then ignores.
    """
    if supervision == "process":
        scores = table.column("step_rewards").to_pylist()  # a list per output
    else:
        scores = [[r] for r in table.column("reward").to_pylist()]
    return [g for g in range(len(scores) // group_size)
            if len({r for row in scores[g * group_size:(g + 1) * group_size] for r in row}) > 1]


def keep_informative(rounds: list[pa.Table], questions: int, group_size: int, supervision: str) -> pa.Table:
    """The step's table from its scored sampling rounds (in draw order): the first `questions` informative
    groups, their `group_index` renumbered 0..n-1 so the rows stay group after group, with what was drawn
    in the schema metadata. Fewer than `questions` found: all of them. None at all: the first round as it
    is, every group flat, so the step goes as it would without dynamic sampling (no optimizer step,
    `flat_batch_skipped`, counted towards `grpo.warn_after_flat_steps`) and its samples are still stored."""
    drawn = pa.concat_tables(rounds)
    informative = informative_groups(drawn, group_size, supervision)
    kept = informative[:questions]
    table = drawn.take([g * group_size + s for g in kept for s in range(group_size)]) if kept else rounds[0]
    n_groups = table.num_rows // group_size
    table = with_columns(table, {"group_index": pa.array([g for g in range(n_groups) for _ in range(group_size)],
                                                         pa.int32())})
    counts = {"groups_drawn": drawn.num_rows // group_size,
              "groups_flat": drawn.num_rows // group_size - len(informative),
              "rounds": len(rounds) - 1}  # extra rounds, as sampling.dynamic_max_rounds counts them
    return table.replace_schema_metadata({**(table.schema.metadata or {}), METADATA_KEY: json.dumps(counts)})


def drawn_metrics(table: pa.Table) -> dict[str, float]:
    """The step's `dynamic_*` metrics from the counts `keep_informative` left in `table` ({} without
    dynamic sampling): groups sampled over all rounds, how many of them were flat, extra rounds taken."""
    counts = (table.schema.metadata or {}).get(METADATA_KEY)
    if counts is None:
        return {}
    return {f"dynamic_{name}": float(value) for name, value in json.loads(counts).items()}


def dynamic_note(metrics: dict[str, float], questions: int) -> str:
    """The step line's note on dynamic sampling ("" without it); it says when the step is short of groups."""
    if "dynamic_groups_drawn" not in metrics:
        return ""
    drawn, flat, rounds = (int(metrics[f"dynamic_{k}"]) for k in ("groups_drawn", "groups_flat", "rounds"))
    note = f" | dynamic sampling: {drawn} groups drawn in {rounds} extra round(s), {flat} flat"
    if drawn - flat < questions:
        note += f", only {drawn - flat} informative of the {questions} wanted"
    return note
