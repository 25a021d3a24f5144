"""Sampling a step's groups into the rollout store, and the pi_old pass for mu > 1.

`sample_groups` is a plain function from references to a reference (the Prefect task wraps it):
G outputs per question, one `ROLLOUT_SCHEMA` row per output, written atomically to the step's
Parquet file. A step whose file exists is complete (writes are atomic) and is returned as is,
so a resumed run neither loses nor duplicates rollouts.

Heavy objects stay in the caller's process: the flow passes the sampler it keeps across steps
(tasks/workspace.py: the trainer's live model for `hf`, a long-lived engine fed new weights for
`vllm`); without one, a sampler is built for `policy_ref` for this call.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from models.policy import completion_logprobs
from models.samplers import Sampler, make_sampler
from problems.datasets import format_prompt
from problems.verify import ANSWER_MARK, extract_answer, is_correct
from stages.rollout_store import ROLLOUT_SCHEMA, RolloutBatch, rollout_tensors, write_atomic

def sample_groups(policy_ref: str | Path, questions: list[dict], sampling_cfg, seed: int, *, out_path: str | Path,
                  run_id: str, policy_checkpoint: str | None = None, sampler: Sampler | None = None,
                  model_cfg=None) -> Path:
    """Sample `sampling_cfg.group_size` outputs per question and write them to `out_path`.

    `questions`: problem dicts {id, question, solution, answer}. `out_path`: the step's file
    (`stages.rollout_store.rollout_path(artifacts, run_id, iteration, step)`). Returns `out_path`;
    when it already exists it is returned unchanged and nothing is sampled. `sampler`: an
    already-built sampler (else one is built for `policy_ref` with `model_cfg`'s device and dtype).
    """
    out_path = Path(out_path)
    if out_path.exists():
        return out_path
    if sampler is None:
        sampler = make_sampler(sampling_cfg, policy_ref, device=getattr(model_cfg, "device", "cpu"),
                               dtype=getattr(model_cfg, "dtype", "float32"),
                               trust_remote_code=getattr(model_cfg, "trust_remote_code", False),
                               stop_marker=ANSWER_MARK, seed=seed)
    table = sample_table(sampler, questions, group_size=sampling_cfg.group_size, seed=seed, run_id=run_id,
                         policy_checkpoint=str(policy_checkpoint or policy_ref))
    return write_atomic(table, out_path)


def sample_table(sampler: Sampler, questions: list[dict], *, group_size: int, seed: int, run_id: str,
                 policy_checkpoint: str) -> pa.Table:
    tok = sampler.tokenizer
    prompts = [format_prompt(q["question"]) for q in questions]
    prompt_ids = tok(prompts)["input_ids"] if prompts else []
    comps = sampler.sample(prompt_ids, n=group_size, seed=seed)
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
            "completion_length": len(comp.token_ids),
            "truncated": comp.truncated,
            "finish_reason": comp.finish_reason,
            "answer": answer,
            "solution": q.get("solution"),
            "extracted_answer": extract_answer(text),
            "correct": is_correct(text, answer),
            "policy_checkpoint": policy_checkpoint,
            "sampler_backend": sampler.backend,
            "seed": seed,
            "sampled_at": now,
        })
    return pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA)


def old_logprobs_pass(model, batch: RolloutBatch | pa.Table, *, pad_id: int, micro_batch_size: int | None = None,
                      width: int | None = None) -> torch.Tensor:
    """pi_old for mu > 1: one no-grad, teacher-forced pass of the TRAINING model over the step's
    rollouts, before the first inner update. Returns [B, T] float32 (0 past each completion).

    Why not the sampler's stored log-probs: the sampler's numerics differ from the trainer's (KV
    cache vs full sequence, vLLM kernels, bf16), so ratio = exp(logp - sampler_logp) would not be 1
    at the first inner step and clipping would act on noise. With this pass the first inner
    update starts from ratio == 1 exactly as the paper intends. With mu == 1 no pass is needed: the
    update's own log-probs, detached, are pi_old. (The stored sampler log-probs remain for audit:
    `mean |sampler - trainer|` measures the mismatch.) The model is put in eval mode for the pass
    (no dropout) and restored.
    """
    if isinstance(batch, pa.Table):
        batch = rollout_tensors(batch, width=width)
    T = width if width is not None else batch.mask.shape[1]
    was_training = model.training
    model.eval()
    try:
        logp, _, _ = completion_logprobs(model, batch.prompt_ids, batch.completion_ids, pad_id=pad_id, width=T,
                                         micro_batch_size=micro_batch_size, with_grad=False)
    finally:
        model.train(was_training)
    return logp.detach()


def sampler_mismatch(batch: RolloutBatch, trainer_logp: torch.Tensor) -> dict[str, Any]:
    """How far the sampler's log-probs are from the trainer's on the same tokens (for MLflow)."""
    diff = (batch.old_logprobs.to(trainer_logp.device) - trainer_logp).abs()[batch.mask.to(trainer_logp.device)]
    if diff.numel() == 0:
        return {"sampler_logp_abs_diff_mean": 0.0, "sampler_logp_abs_diff_max": 0.0}
    return {"sampler_logp_abs_diff_mean": float(diff.mean()), "sampler_logp_abs_diff_max": float(diff.max())}
