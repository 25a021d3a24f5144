"""Prefect tasks for the reward models: initial training on SFT samples, retraining with replay.

Reward-model data iteration 0 is the SFT policy's samples; data iteration k+1 is RL iteration k's
rollouts (stages/reward_training.py lays them out and draws the replay). Both tasks take the run
folder, the checkpoints and the tokenizer by reference and load what they need themselves.
"""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from configs import PipelineConfig
from problems.datasets import draw_questions, read_problems
from stages import reward_training, sampling
from stages.faults import crash_point
from stages.rollout_store import open_rollouts, write_atomic
from stages.run_layout import RunLayout
from tasks import cluster
from tasks.workspace import WORKSPACE

KINDS = {"outcome_rm": "outcome", "process_rm": "process"}


def reward_models_needed(cfg: PipelineConfig) -> list[str]:
    """The learned reward sources of the config (the verifier needs no model)."""
    return [s.name for s in cfg.reward.sources if s.name in KINDS]


@task(cache_policy=NO_CACHE)
def train_initial_reward_models(cfg: PipelineConfig, run_dir: str, sft_ckpt: str,
                                train_path: str) -> tuple[dict[str, str], dict[str, float]]:
    """Before RL: sample the SFT policy, label by ground truth, train each learned RM on it.
    Returns ({source: checkpoint}, metrics)."""
    layout = RunLayout(Path(run_dir))
    rm_cfg = cfg.reward_model
    model, tokenizer, _ = WORKSPACE.policy_at(sft_ckpt, cfg)
    questions = draw_questions(read_problems(train_path), rm_cfg.init_questions, f"rm-bootstrap-{cfg.data.seed}")
    with cfg.model.compute():
        samples = sampling.sample_groups(WORKSPACE.sampler_for(cfg, model, tokenizer), questions, cfg.prompt,
                                         group_size=rm_cfg.init_samples_per_question, seed=cfg.model.seed,
                                         run_id=layout.run_id, policy_version=0,
                                         last_number=cfg.reward.verifier.last_number)
    write_atomic(samples, layout.rm_bootstrap)  # kept for audit: what the first reward models learned from
    reward_training.prepare_rm_data(samples, layout.root, 0, tokenizer=tokenizer, seed=cfg.model.seed)
    paths, metrics = {}, {}
    for name in reward_models_needed(cfg):
        path, m = reward_training.train_initial_reward_model(
            model, KINDS[name], layout.root, rm_cfg, cfg.model.seed, score_mode=cfg.reward.rm_score,
            pad_id=tokenizer.pad_token_id, device=cfg.model.device, tokenizer=tokenizer)
        paths[name] = str(path)
        metrics.update({f"{name}/{k}": v for k, v in m.items()})
    crash_point("initial_rm")
    return paths, metrics


@task(cache_policy=NO_CACHE)
def retrain_reward_models(cfg: PipelineConfig, run_dir: str, iteration: int, reward_models: dict[str, str],
                          tokenizer: str) -> tuple[dict[str, str], dict[str, float]]:
    """After RL iteration `iteration`: continue each RM on its rollouts plus a replay of history.
    `tokenizer`: a checkpoint whose tokenizer the reward models share. A Ray task under the Ray backend."""
    args = (cfg, run_dir, iteration, reward_models, tokenizer)
    out = cluster.run_remote(cfg, retrained, *args) if cfg.cluster.backend == "ray" else retrained(*args)
    crash_point("rm_retraining")
    return out


def retrained(cfg: PipelineConfig, run_dir: str, iteration: int, reward_models: dict[str, str],
              tokenizer: str) -> tuple[dict[str, str], dict[str, float]]:
    """`retrain_reward_models`' work, in whichever process runs it."""
    layout = RunLayout(Path(run_dir))
    data_iteration = iteration + 1
    tok = WORKSPACE.tokenizer_at(tokenizer, cfg)
    rollouts = open_rollouts(layout.iteration_rollouts(iteration)).to_table()
    new_rows, _ = reward_training.prepare_rm_data(rollouts, layout.root, data_iteration, tokenizer=tok,
                                                  seed=cfg.model.seed + data_iteration)
    paths, metrics = {}, {}
    for name, current in reward_models.items():
        path, m = reward_training.retrain_reward_model(current, new_rows, layout.root, data_iteration, cfg.reward_model,
                                                       cfg.model.seed, device=cfg.model.device, tokenizer=tok)
        paths[name] = str(path)
        metrics.update({f"{name}/{k}": v for k, v in m.items()})
    return paths, metrics
