"""Prefect tasks of one GRPO step: sample -> score -> advantages -> update.

Each takes and returns references (paths). Sampling, scoring and advantages are cached by
(run, iteration, step, stage) with their results (paths) persisted, so a resumed run skips them;
the update is not idempotent, so it is never cached or retried: resume restarts it from the last
checkpoint instead (the flow reads state.json).
"""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from configs import PipelineConfig
from models.trainer import grpo_update as run_grpo_update
from stages import advantages, rewards, sampling
from stages.checkpoints import save_checkpoint
from tasks.keys import PERSISTED, stage_key
from tasks.workspace import WORKSPACE



@task(cache_key_fn=stage_key("sample"), retries=2, retry_delay_seconds=2, **PERSISTED)
def sample_groups(cfg: PipelineConfig, run_id: str, iteration: int, step: int, policy_ckpt: str,
                  questions: list[dict], out_path: str) -> str:
    model, tokenizer, _ = WORKSPACE.policy_at(policy_ckpt, cfg)
    sampler = WORKSPACE.sampler_for(cfg, model, tokenizer)
    with cfg.model.compute():
        return str(sampling.sample_groups(policy_ckpt, questions, cfg.sampling, cfg.model.seed * 100_003 + step,
                                          out_path=Path(out_path), run_id=run_id, policy_checkpoint=policy_ckpt,
                                          sampler=sampler))


@task(cache_key_fn=stage_key("score"), retries=2, retry_delay_seconds=2, **PERSISTED)
def score_rollouts(cfg: PipelineConfig, run_id: str, iteration: int, step: int, rollout_path: str,
                   reward_models: dict[str, str]) -> str:
    models = {name: WORKSPACE.reward_model_at(name, path, cfg) for name, path in reward_models.items()}
    return str(rewards.score_rollouts(Path(rollout_path), cfg.reward, reward_models=models,
                                      tokenizer=WORKSPACE.tokenizer, device=cfg.model.device))


@task(cache_key_fn=stage_key("advantages"), **PERSISTED)
def compute_advantages(cfg: PipelineConfig, run_id: str, iteration: int, step: int, rollout_path: str) -> str:
    return str(advantages.compute_advantages(
        Path(rollout_path), supervision=cfg.reward.supervision, group_size=cfg.sampling.group_size,
        eps=cfg.grpo.adv_eps, scale=cfg.grpo.adv_scale))


@task(cache_policy=NO_CACHE)
def grpo_update(cfg: PipelineConfig, policy_ckpt: str, reference_ckpt: str, rollout_path: str,
                out_ckpt: str, save: bool = True) -> tuple[str, dict]:
    """mu GRPO updates on the step's batch. The updated policy answers for `out_ckpt` from now on,
    and is saved there (+ optimizer state) when `save`; unsaved steps are redone after a crash."""
    model, tokenizer, optimizer = WORKSPACE.policy_at(policy_ckpt, cfg)
    ref = WORKSPACE.reference_at(reference_ckpt, cfg) if cfg.grpo.beta > 0 else None
    g = cfg.grpo
    with cfg.model.compute():
        metrics = run_grpo_update(model, optimizer, advantages.read_update_batch(Path(rollout_path)),
                                  pad_id=tokenizer.pad_token_id, ref_model=ref, beta=g.beta, mu=g.mu,
                                  eps_low=g.eps_low, eps_high=g.eps_high, aggregation=g.aggregation,
                                  grad_clip=g.grad_clip, micro_batch_size=g.micro_batch_size)
    if save:
        save_checkpoint(model, tokenizer, out_ckpt, optimizer)
    WORKSPACE.policy_moved_to(out_ckpt)
    return out_ckpt, metrics
