"""Prefect tasks for the other methods of the unified paradigm (flows/compare_methods.py).

The policy, its optimizer and the frozen reference come from the workspace (tasks/workspace.py),
as for GRPO; PPO's value model and its optimizer are kept here, per method run, in the process.
"""
from __future__ import annotations

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
def method_update(cfg: PipelineConfig, run_id: str, policy_ckpt: str, reference_ckpt: str, rollout_path: str,
                  out_ckpt: str, save: bool = False, seed: int = 0) -> tuple[str, dict]:
    """One update of `cfg.algorithm` on a step file; the live policy answers for `out_ckpt` afterwards."""
    method = cfg.algorithm
    model, tokenizer, optimizer = WORKSPACE.policy_at(policy_ckpt, cfg)
    needs_ref = method == "dpo" or (method == "ppo" and cfg.grpo.beta > 0)
    ref = WORKSPACE.reference_at(reference_ckpt, cfg) if needs_ref else None
    vm = vopt = None
    if method == "ppo":
        vm, vopt = value_model_for(cfg, run_id, model)
    g = cfg.grpo
    batch = method_data.read_method_batch(rollout_path, 1 if method == "sft" else cfg.sampling.group_size)
    with cfg.model.compute():
        metrics = run_method_update(
            model, optimizer, batch, method, pad_id=tokenizer.pad_token_id, ref_model=ref, value_model=vm,
            value_optimizer=vopt, beta=g.beta, dpo_beta=cfg.dpo.beta, gamma=cfg.ppo.gamma, lam=cfg.ppo.lam,
            value_clip=cfg.ppo.value_clip, whiten_advantages=cfg.ppo.whiten_advantages, eps_low=g.eps_low,
            eps_high=g.eps_high, aggregation=g.aggregation, grad_clip=g.grad_clip,
            micro_batch_size=g.micro_batch_size, seed=seed)
    if vm is not None:
        metrics.update(value_model_size(vm))
    if save:
        save_checkpoint(model, tokenizer, out_ckpt, optimizer)
    WORKSPACE.policy_moved_to(out_ckpt)
    return out_ckpt, metrics
