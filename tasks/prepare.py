"""Prefect tasks around RL: data splits, the SFT warm start, held-out evaluation, the SFT control."""
from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from configs import PipelineConfig
from problems.datasets import read_problems
from stages import evaluation, prepare
from stages.evaluation import Evaluation
from tasks.retries import RETRY
from tasks.workspace import WORKSPACE


@task(cache_policy=NO_CACHE, **RETRY)
def prepare_data(cfg: PipelineConfig) -> tuple[str, str]:
    train, test = prepare.prepare_data(cfg)
    return str(train), str(test)


@task(cache_policy=NO_CACHE)
def build_initial_policy(cfg: PipelineConfig) -> str:
    """The SFT warm start (reused when one exists for this config)."""
    logger = get_run_logger()
    every = max(1, cfg.sft.steps // 10)

    def progress(step: int, loss: float) -> None:
        if (step + 1) % every == 0:
            logger.info("SFT step %d/%d loss %.4f", step + 1, cfg.sft.steps, loss)

    return str(prepare.initial_policy(cfg, progress=progress))


@task(cache_policy=NO_CACHE)
def evaluate_policy(cfg: PipelineConfig, policy_ckpt: str, test_path: str, k: int | None = None,
                    sample_questions: int | None = None, temperature: float | None = None) -> Evaluation:
    """Greedy accuracy of the policy at `policy_ckpt` on the held-out split; Pass@K and Maj@K on its
    first `sample_questions` (defaults: `loop.eval_samples`, `loop.eval_sample_questions`,
    `sampling.temperature`). Up to `loop.eval_max_new_tokens` tokens (default: sampling's)."""
    model, tokenizer, _ = WORKSPACE.policy_at(policy_ckpt, cfg)
    problems = read_problems(Path(test_path))[: cfg.data.test_size]
    with cfg.model.compute():
        return evaluation.evaluate(
            model, tokenizer, problems, cfg.prompt,
            max_new_tokens=cfg.loop.eval_max_new_tokens or cfg.sampling.max_new_tokens,
            batch_size=cfg.loop.eval_batch_size, last_number=cfg.reward.verifier.last_number,
            k=cfg.loop.eval_samples if k is None else k,
            sample_questions=cfg.loop.eval_sample_questions if sample_questions is None else sample_questions,
            temperature=cfg.sampling.temperature if temperature is None else temperature, seed=cfg.model.seed)


@task(cache_policy=NO_CACHE)
def sft_control(cfg: PipelineConfig, initial_policy: str, seconds: float, out: str) -> str:
    """Continue SFT from the RL run's starting point for RL's CPU time (the control), saved at `out`."""
    return str(prepare.continue_sft(cfg, initial_policy, seconds, Path(out)))
