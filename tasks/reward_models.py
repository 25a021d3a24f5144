"""Prefect tasks for the reward models: initial training on SFT samples, retraining with replay.

Reward-model data iteration 0 is the SFT policy's samples; data iteration k+1 is RL iteration k's
rollouts (stages/reward_training.py lays them out and draws the replay).
"""
from __future__ import annotations

from pathlib import Path

from prefect import task

from configs import PipelineConfig
from problems.datasets import draw_questions, read_problems
from stages import reward_training, sampling
from tasks.keys import PERSISTED, stage_key
from tasks.workspace import WORKSPACE

KINDS = {"outcome_rm": "outcome", "process_rm": "process"}


def reward_models_needed(cfg: PipelineConfig) -> list[str]:
    """The learned reward sources of the config (the verifier needs no model)."""
    return [s.name for s in cfg.reward.sources if s.name in KINDS]


def _run_root(cfg: PipelineConfig, run_id: str) -> Path:
    return cfg.artifacts() / "runs" / run_id


@task(cache_key_fn=stage_key("initial-reward-models"), **PERSISTED)
def train_initial_reward_models(cfg: PipelineConfig, run_id: str, sft_ckpt: str,
                                train_path: str) -> tuple[dict[str, str], dict[str, float]]:
    """Before RL: sample the SFT policy, label by ground truth, train each learned RM on it."""
    root = _run_root(cfg, run_id)
    rm_cfg = cfg.reward_model
    model, tokenizer, _ = WORKSPACE.policy_at(sft_ckpt, cfg)
    questions = draw_questions(read_problems(train_path), rm_cfg.init_questions, f"rm-bootstrap-{cfg.data.seed}")
    samples = sampling.sample_groups(
        sft_ckpt, questions, cfg.sampling.model_copy(update={"group_size": rm_cfg.init_samples_per_question}),
        cfg.model.seed, out_path=root / "rm_bootstrap" / "samples.parquet", run_id=run_id,
        policy_checkpoint=sft_ckpt, sampler=WORKSPACE.sampler_for(cfg, model, tokenizer))
    reward_training.prepare_rm_data([samples], root, 0, tokenizer=tokenizer, seed=cfg.model.seed)
    paths, metrics = {}, {}
    for name in reward_models_needed(cfg):
        path, m = reward_training.train_initial_reward_model(
            model, KINDS[name], root, rm_cfg, cfg.model.seed, score_mode=cfg.reward.rm_score,
            pad_id=tokenizer.pad_token_id, device=cfg.model.device, tokenizer=tokenizer)
        paths[name] = str(path)
        metrics.update({f"{name}/{k}": v for k, v in m.items()})
    return paths, metrics


@task(cache_key_fn=stage_key("retrain-reward-models"), **PERSISTED)
def retrain_reward_models(cfg: PipelineConfig, run_id: str, iteration: int,
                          reward_models: dict[str, str]) -> tuple[dict[str, str], dict[str, float]]:
    """After RL iteration `iteration`: continue each RM on its rollouts plus a replay of history."""
    root = _run_root(cfg, run_id)
    data_iteration = iteration + 1
    rollouts = sorted((root / "rollouts" / f"iteration={iteration}").glob("step=*.parquet"))
    new_rows, _ = reward_training.prepare_rm_data(rollouts, root, data_iteration, tokenizer=WORKSPACE.tokenizer,
                                                  seed=cfg.model.seed + data_iteration)
    paths, metrics = {}, {}
    for name, current in reward_models.items():
        path, m = reward_training.retrain_reward_model(current, new_rows, root, data_iteration, cfg.reward_model,
                                                       cfg.model.seed, device=cfg.model.device,
                                                       tokenizer=WORKSPACE.tokenizer)
        paths[name] = str(path)
        metrics.update({f"{name}/{k}": v for k, v in m.items()})
    return paths, metrics
