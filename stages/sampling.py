"""Sampling a step's groups: G outputs per question, one `ROLLOUT_SCHEMA` row per output, in memory.

    sample_groups(sampler, questions, prompt_cfg, group_size=G, seed=..., run_id=..., policy_version=...) -> pa.Table

Rows are laid out group after group (`group_index`, then `sample_index` 0..G-1). The caller keeps
the sampler across steps (tasks/workspace.py: the trainer's live model for `hf`, a long-lived
engine fed new weights for `vllm`) and writes the table once the step's scoring and advantages are
added (stages/rollout_store.py).
"""
from __future__ import annotations

import datetime as dt

import pyarrow as pa

from models.samplers import Sampler
from problems.prompts import encode_prompts
from problems.verify import extract_answer, is_correct
from stages.rollout_store import ROLLOUT_SCHEMA


def sample_groups(sampler: Sampler, questions: list[dict], prompt_cfg, *, group_size: int, seed: int, run_id: str,
                  policy_version: int, last_number: bool = False, reference=None) -> pa.Table:
    """`questions`: problem dicts {id, question, solution, answer}; `prompt_cfg`: a `PromptConfig`.
    `policy_version`: GRPO steps the sampling policy has taken (0: the run's starting policy).
    `last_number`: the verifier's fallback for the `correct` column (`problems.verify`).
    `reference`: a model whose log-probs of the outputs fill `ref_logprobs`, scored while the sampler
    draws (`hf` sampler only: `HFSampler.sample`)."""
    tok = sampler.tokenizer
    prompts, prompt_ids = encode_prompts(tok, [q["question"] for q in questions], prompt_cfg)
    comps = sampler.sample(prompt_ids, n=group_size, seed=seed, **({} if reference is None else {"reference": reference}))
    if len(comps) != len(questions) * group_size:
        raise RuntimeError(f"sampler returned {len(comps)} rows for {len(questions)} questions x G={group_size}")
    texts = tok.batch_decode([c.token_ids for c in comps], skip_special_tokens=True)
    now = dt.datetime.now(dt.timezone.utc)
    rows = []
    for r, (comp, text) in enumerate(zip(comps, texts)):
        g, s = divmod(r, group_size)
        q = questions[g]
        answer = str(q["answer"])
        rows.append({
            "run_id": run_id,
            "question_id": str(q["id"]),
            "group_index": g,
            "sample_index": s,
            "prompt": prompts[g],
            "completion": text,
            "prompt_ids": prompt_ids[g],
            "completion_ids": comp.token_ids,
            "old_logprobs": comp.logprobs if comp.logprobs is not None else [],
            "ref_logprobs": comp.ref_logprobs if comp.ref_logprobs is not None else [],
            "completion_length": len(comp.token_ids),
            "truncated": comp.truncated,
            "finish_reason": comp.finish_reason,
            "answer": answer,
            "solution": q.get("solution"),
            "extracted_answer": extract_answer(text, last_number=last_number),
            "correct": is_correct(text, answer, last_number=last_number),
            "policy_version": policy_version,
            "sampler_backend": sampler.backend,
            "seed": seed,
            "sampled_at": now,
        })
    return pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA)
