"""Where each method's training rows come from, as rollout tables (the unified paradigm's "data source").

- grpo, ppo, online_rft: the live policy's samples (stages.sampling.sample_groups, as in the pipeline).
- rft, dpo: one offline pool sampled ONCE from the SFT model at the start (all steps' questions x G),
  scored once; step s trains on its slice of it (`pool_slice`).
- sft: the ground-truth solutions of the questions (`sft_rollouts`), one row per question, correct.

Every step's table has the rollout schema (plus `reward` once scored), so `method_batch` turns any of
them into the `models.trainer.UpdateBatch` that models/method_update.py trains on.
"""
from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.compute as pc
import torch

from models.trainer import UpdateBatch
from problems.prompts import encode_prompts, encode_sft_examples
from stages.rollout_store import ROLLOUT_SCHEMA, padded, with_columns


def pool_slice(pool: pa.Table, first_group: int, n_groups: int) -> pa.Table:
    """Groups [first_group, first_group + n_groups) of the pool, renumbered from group_index 0."""
    g = pool.column("group_index")
    part = pool.filter(pc.and_(pc.greater_equal(g, first_group), pc.less(g, first_group + n_groups)))
    shifted = pc.subtract(part.column("group_index"), pa.scalar(first_group, pa.int32()))
    return with_columns(part, {"group_index": shifted})


def sft_rollouts(questions: list[dict], tokenizer, prompt_cfg, *, run_id: str) -> pa.Table:
    """The questions' reference solutions (+ EOS) as scored rollout rows, reward 1: SFT's data
    (problems.prompts.encode_sft_examples). No policy sampled them: `policy_version` is null, the
    sampler backend "none"."""
    prompts, _ = encode_prompts(tokenizer, [q["question"] for q in questions], prompt_cfg)
    now = dt.datetime.now(dt.timezone.utc)
    rows = []
    for g, (q, (p, ids)) in enumerate(zip(questions, encode_sft_examples(tokenizer, questions, prompt_cfg))):
        rows.append({"run_id": run_id, "question_id": str(q["id"]), "group_index": g, "sample_index": 0,
                     "prompt": prompts[g], "completion": q["solution"], "prompt_ids": p, "completion_ids": ids,
                     "old_logprobs": [], "completion_length": len(ids), "truncated": False, "finish_reason": "eos",
                     "answer": str(q["answer"]), "solution": q["solution"], "extracted_answer": str(q["answer"]),
                     "correct": True, "policy_version": None, "sampler_backend": "none", "seed": 0,
                     "sampled_at": now})
    table = pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA)
    return table.append_column("reward", pa.array([1.0] * len(rows), type=pa.float32()))


def method_batch(table: pa.Table, group_size: int) -> UpdateBatch:
    """The update's batch from a step's table: token ids, correctness, reward (correctness when
    unscored) and, once computed, the advantages."""
    correct = torch.tensor(table.column("correct").to_pylist(), dtype=torch.bool)
    rewards = (torch.tensor(table.column("reward").to_pylist(), dtype=torch.float32)
               if "reward" in table.column_names else correct.float())
    return UpdateBatch(
        prompt_ids=table.column("prompt_ids").to_pylist(),
        completion_ids=table.column("completion_ids").to_pylist(),
        correct=correct, rewards=rewards, group_size=group_size,
        advantages=padded(table, "advantages") if "advantages" in table.column_names else None,
    )


def batch_metrics(t: pa.Table) -> dict[str, float]:
    """What the step trained on: reward, accuracy, length (any method's step table)."""
    n = max(1, t.num_rows)
    reward = t.column("reward" if "reward" in t.column_names else "correct").to_pylist()
    return {
        "reward_mean": sum(float(r) for r in reward) / n,
        "accuracy": sum(t.column("correct").to_pylist()) / n,
        "completion_length_mean": sum(t.column("completion_length").to_pylist()) / n,
        "truncation_rate": sum(t.column("truncated").to_pylist()) / n,
        "rows": float(t.num_rows),
    }
