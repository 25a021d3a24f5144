"""Where each method's training rows come from, as rollout files (the unified paradigm's "data source").

- grpo, ppo, online_rft: the live policy's samples (stages.sampling.sample_groups, as in the pipeline).
- rft, dpo: one offline pool sampled ONCE from the SFT model at the start (all steps' questions x G),
  scored once; step s trains on its slice of it (`pool_slice`).
- sft: the ground-truth solutions of the questions (`sft_rollouts`), one row per question, correct.

Every step file has the rollout schema (plus `reward` once scored), so `read_method_batch` reads any
of them into a `models.method_update.MethodBatch`.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch

from models.method_update import MethodBatch
from problems.datasets import format_prompt
from stages.rollout_store import ROLLOUT_SCHEMA, padded, read_rollouts, write_atomic


def pool_slice(pool_path: str | Path, first_group: int, n_groups: int, out_path: str | Path) -> Path:
    """Groups [first_group, first_group + n_groups) of the pool as a step file (group_index from 0)."""
    out_path = Path(out_path)
    if out_path.exists():
        return out_path
    table = read_rollouts(pool_path)
    g = table.column("group_index")
    keep = pc.and_(pc.greater_equal(g, first_group), pc.less(g, first_group + n_groups))
    part = table.filter(keep)
    idx = part.schema.get_field_index("group_index")
    part = part.set_column(idx, "group_index", pc.subtract(part.column("group_index"),
                                                           pa.scalar(first_group, pa.int32())))
    return write_atomic(part, out_path)


def sft_rollouts(questions: list[dict], tokenizer, out_path: str | Path, *, run_id: str, source: str = "ground-truth"
                 ) -> Path:
    """The questions' reference solutions (+ EOS) as rollout rows: SFT's data (stages.prepare.encode_examples)."""
    out_path = Path(out_path)
    if out_path.exists():
        return out_path
    prompts = [format_prompt(q["question"]) for q in questions]
    prompt_ids = tokenizer(prompts)["input_ids"] if prompts else []
    targets = tokenizer([q["solution"] for q in questions], add_special_tokens=False)["input_ids"] if prompts else []
    now = dt.datetime.now(dt.timezone.utc)
    rows = []
    for g, (q, p, t) in enumerate(zip(questions, prompt_ids, targets)):
        ids = list(t) + [tokenizer.eos_token_id]
        rows.append({"run_id": run_id, "question_id": str(q["id"]), "group_index": g, "sample_index": 0,
                     "prompt": prompts[g], "completion": q["solution"], "prompt_ids": p, "completion_ids": ids,
                     "old_logprobs": [], "completion_length": len(ids), "truncated": False, "finish_reason": "eos",
                     "answer": str(q["answer"]), "solution": q["solution"], "extracted_answer": str(q["answer"]),
                     "correct": True, "policy_checkpoint": source, "sampler_backend": "none", "seed": 0,
                     "sampled_at": now})
    table = pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA)
    table = table.append_column("reward", pa.array([1.0] * len(rows), type=pa.float32()))
    return write_atomic(table, out_path)


def read_method_batch(path: str | Path, group_size: int) -> MethodBatch:
    table = read_rollouts(path)
    correct = torch.tensor(table.column("correct").to_pylist(), dtype=torch.bool)
    rewards = (torch.tensor(table.column("reward").to_pylist(), dtype=torch.float32)
               if "reward" in table.column_names else correct.float())
    return MethodBatch(
        prompt_ids=table.column("prompt_ids").to_pylist(),
        completion_ids=table.column("completion_ids").to_pylist(),
        correct=correct, rewards=rewards, group_size=group_size,
        advantages=padded(table, "advantages") if "advantages" in table.column_names else None,
    )


def batch_metrics(path: str | Path) -> dict[str, float]:
    """What the step trained on: reward, accuracy, length (any method's step file)."""
    t = read_rollouts(path)
    n = max(1, t.num_rows)
    reward = t.column("reward").to_pylist() if "reward" in t.column_names else t.column("correct").to_pylist()
    return {
        "reward_mean": sum(float(r) for r in reward) / n,
        "accuracy": sum(t.column("correct").to_pylist()) / n,
        "completion_length_mean": sum(t.column("completion_length").to_pylist()) / n,
        "truncation_rate": sum(t.column("truncated").to_pylist()) / n,
        "rows": float(t.num_rows),
    }
