"""Prefect tasks for the other methods of the unified paradigm (flows/compare_methods.py).

The policy, its optimizer and the frozen reference come from the workspace (tasks/workspace.py),
as for GRPO (tasks/step.py): tasks take checkpoints by reference and the step's table in memory.
PPO's value model and its optimizer are kept here, per method run (cfg.run_id), in the process.
"""
from __future__ import annotations

import pyarrow as pa
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from configs import PipelineConfig
from models.method_update import method_update as run_method_update
from models.method_update import value_model_size
from models.reward_model import ValueHeadRewardModel
from stages import method_data
from stages.checkpoints import save_checkpoint
from tasks.workspace import WORKSPACE

_VALUE_MODELS: dict[str, tuple[ValueHeadRewardModel, torch.optim.Optimizer]] = {}


def value_model_for(cfg: PipelineConfig, run_id: str, policy):
    """PPO's value model of method run `run_id`: a fresh value head (raw logits) on a copy of the
    policy's backbone, made on first use (from the SFT policy), with its own AdamW."""
    if run_id not in _VALUE_MODELS:
        vm = ValueHeadRewardModel.from_policy(policy, "process", score_mode="logit")
        vm.eval()
        opt = torch.optim.AdamW(vm.parameters(), lr=cfg.ppo.value_lr, weight_decay=0.0)
        _VALUE_MODELS[run_id] = (vm, opt)
    return _VALUE_MODELS[run_id]


def drop_value_model(run_id: str) -> None:
    _VALUE_MODELS.pop(run_id, None)


@task(cache_policy=NO_CACHE)
def ground_truth_rows(cfg: PipelineConfig, questions: list[dict], tokenizer: str) -> pa.Table:
    """SFT's step table: the questions' reference solutions; `tokenizer`: a checkpoint whose tokenizer to use."""
    return method_data.sft_rollouts(questions, WORKSPACE.tokenizer_at(tokenizer, cfg), cfg.prompt, run_id=cfg.run_id)


@task(cache_policy=NO_CACHE)
def method_update(cfg: PipelineConfig, policy: str, reference: str, rollouts: pa.Table, out_ckpt: str,
                  save: bool, seed: int = 0) -> tuple[str, dict]:
    """One update of `cfg.algorithm` on the step's table; the live policy answers for `out_ckpt`
    afterwards, and is saved there (+ optimizer state) when `save`."""
    method = cfg.algorithm
    model, tokenizer, optimizer = WORKSPACE.policy_at(policy, cfg)
    needs_ref = method == "dpo" or (method == "ppo" and cfg.grpo.beta > 0)
    ref = WORKSPACE.reference_at(reference, cfg) if needs_ref else None
    vm = vopt = None
    if method == "ppo":
        vm, vopt = value_model_for(cfg, cfg.run_id, model)
    g = cfg.grpo
    batch = method_data.method_batch(rollouts, 1 if method == "sft" else cfg.sampling.group_size)
    try:
        with cfg.model.compute():
            metrics = run_method_update(
                model, optimizer, batch, method, pad_id=tokenizer.pad_token_id, ref_model=ref, value_model=vm,
                value_optimizer=vopt, beta=g.beta, dpo_beta=cfg.dpo.beta, gamma=cfg.ppo.gamma, lam=cfg.ppo.lam,
                value_clip=cfg.ppo.value_clip, whiten_advantages=cfg.ppo.whiten_advantages, eps_low=g.eps_low,
                eps_high=g.eps_high, aggregation=g.aggregation, grad_clip=g.grad_clip,
                micro_batch_size=g.micro_batch_size, seed=seed)
    except BaseException:
        WORKSPACE.forget_policy()  # the live weights may be part-updated: nothing may take them for `policy`
        raise
    WORKSPACE.policy_moved_to(out_ckpt)
    if vm is not None:
        metrics.update(value_model_size(vm))
    if save:
        save_checkpoint(model, tokenizer, out_ckpt, optimizer)
    return out_ckpt, metrics
