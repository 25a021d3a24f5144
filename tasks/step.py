"""Prefect tasks of one GRPO step: sample -> score -> advantages -> update (the flow writes the step's
Parquet once, between the last two: tasks/journal.py).

Each takes what it needs explicitly (the config, a checkpoint or tokenizer reference, the step's
table) and loads what is not in memory (tasks/workspace.py). Nothing is cached by Prefect: the run
folder is the truth (stages/run_layout.py), so a resumed run reads a finished step's Parquet file
instead of asking a cache what an earlier process did. Sampling and scoring retry a passing fault;
the update is not idempotent and never retries: a failed step is redone from the last checkpoint.
Under `cluster.backend: ray` the same tasks drive the run's Ray actors instead (tasks/cluster.py).
"""
from __future__ import annotations

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE

from configs import PipelineConfig
from models.trainer import grpo_update as run_grpo_update
from stages import advantages, rewards, sampling
from models.lora import merged
from stages.checkpoints import folder_bytes, save_checkpoint
from stages.faults import crash_point
from tasks import cluster
from tasks.retries import RETRY
from tasks.workspace import WORKSPACE


@task(cache_policy=NO_CACHE, **RETRY)
def sample_groups(cfg: PipelineConfig, policy: str, questions: list[dict], step: int, tokenizer: str,
                  sampling_round: int = 0, reference: str | None = None) -> pa.Table:
    """G outputs per question from the policy at `policy`, seeded by the step and its sampling round (0: the
    step's questions; 1, 2, ...: dynamic sampling's further draws, flows/iterative_grpo.py `scored_groups`).
    `tokenizer`: the run's first policy, on disk, whose tokenizer is the policy's (the Ray backend's replicas
    hold the model, and a new replica loads this one first). `reference`: pi_ref's checkpoint, which scores
    the outputs while they are drawn under `grpo.reference_while_sampling`."""
    ref = None
    if cfg.cluster.backend == "ray":
        sampler = cluster.sampler_for(cfg, policy, step, tokenizer, WORKSPACE.tokenizer_at(tokenizer, cfg))
    else:
        model, tok, _ = WORKSPACE.policy_at(policy, cfg)
        sampler = WORKSPACE.sampler_for(cfg, model, tok)
        if cfg.grpo.reference_while_sampling and reference is not None:
            ref = WORKSPACE.reference_at(reference, cfg)
    # Rounds a million steps apart: no two (step, round) of a run share a seed, and round 0 keeps the old one.
    seed = cfg.model.seed * 100_003 + step + 1_000_000 * sampling_round
    with cfg.model.compute():
        table = sampling.sample_groups(sampler, questions, cfg.prompt, group_size=cfg.sampling.group_size,
                                       seed=seed, run_id=cfg.run_id, policy_version=step,
                                       last_number=cfg.reward.verifier.last_number, reference=ref)
    crash_point("sampling")
    return table


@task(cache_policy=NO_CACHE, **RETRY)
def score_rollouts(cfg: PipelineConfig, rollouts: pa.Table, tokenizer: str, reward_models: dict[str, str]) -> pa.Table:
    """Reward columns from the configured sources; `tokenizer`: a checkpoint whose tokenizer to use;
    `reward_models`: learned source -> checkpoint (pretrained reward models come from the config).
    Under the Ray backend, a Ray task does the scoring (its worker keeps the models it loaded)."""
    if cfg.cluster.backend == "ray":
        table = cluster.run_remote(cfg, scored, cfg, rollouts, tokenizer, reward_models)
    else:
        table = scored(cfg, rollouts, tokenizer, reward_models)
    crash_point("scoring")
    return table


def scored(cfg: PipelineConfig, rollouts: pa.Table, tokenizer: str, reward_models: dict[str, str]) -> pa.Table:
    """`score_rollouts`' work, in whichever process runs it."""
    models = {name: WORKSPACE.reward_model_at(name, path, cfg) for name, path in reward_models.items()}
    pretrained = {s.name: WORKSPACE.pretrained_reward_model(s, cfg) for s in cfg.reward.sources if s.model is not None}
    return rewards.score_rollouts(rollouts, cfg.reward, tokenizer=WORKSPACE.tokenizer_at(tokenizer, cfg),
                                  reward_models=models, pretrained=pretrained,
                                  max_new_tokens=cfg.sampling.max_new_tokens)


@task(cache_policy=NO_CACHE)
def compute_advantages(cfg: PipelineConfig, rollouts: pa.Table) -> pa.Table:
    table = advantages.compute_advantages(rollouts, supervision=cfg.reward.supervision,
                                          group_size=cfg.sampling.group_size, eps=cfg.grpo.adv_eps,
                                          scale=cfg.grpo.adv_scale, process_credit=cfg.reward.process_credit)
    crash_point("advantages")
    return table


@task(cache_policy=NO_CACHE)
def grpo_update(cfg: PipelineConfig, policy: str, reference: str, rollouts: pa.Table,
                out_ckpt: str, save: bool) -> tuple[str, dict]:
    """mu GRPO updates on the step's batch. The updated policy answers for `out_ckpt` from now on,
    and is saved there (+ optimizer state; under LoRA the adapters only) when `save`, its size on disk
    in the metrics; unsaved steps are redone after a crash."""
    model, tokenizer, optimizer = WORKSPACE.policy_at(policy, cfg)
    g = cfg.grpo
    try:
        with cfg.model.compute():
            batch = advantages.update_batch(rollouts, cfg.sampling.group_size, drop_flat_groups=g.drop_flat_groups,
                                            mask_truncated=g.mask_truncated)
            # rollouts scored by the reference while sampling need no reference (a resumed process loads none)
            ref = WORKSPACE.reference_at(reference, cfg) if g.beta > 0 and batch.ref_logp is None else None
            metrics = run_grpo_update(model, optimizer, batch,
                                      pad_id=tokenizer.pad_token_id, ref_model=ref, beta=g.beta, mu=g.mu,
                                      eps_low=g.eps_low, eps_high=g.eps_high, aggregation=g.aggregation,
                                      grad_clip=g.grad_clip, micro_batch_size=g.micro_batch_size,
                                      importance_correction=g.importance_correction, importance_cap=g.importance_cap)
            metrics["rows_trained"] = float(len(batch))
    except BaseException:
        WORKSPACE.forget_policy()  # the live weights may be part-updated: nothing may take them for `policy`
        raise
    WORKSPACE.policy_moved_to(out_ckpt)
    crash_point("update")
    if save:
        saved = save_checkpoint(model, tokenizer, out_ckpt, optimizer, adapter_base=WORKSPACE.policy_base)
        metrics["checkpoint_mb"] = folder_bytes(saved) / 2**20
    return out_ckpt, metrics


@task(cache_policy=NO_CACHE)
def merge_adapters(cfg: PipelineConfig, policy: str, out_ckpt: str) -> str:
    """The LoRA policy at `policy` with its adapters folded into the base, saved (weights only) at `out_ckpt`."""
    model, tokenizer, _ = WORKSPACE.policy_at(policy, cfg)
    WORKSPACE.forget_policy()  # merging spends the live adapters: the next request loads from disk
    save_checkpoint(merged(model), tokenizer, out_ckpt)
    return out_ckpt
