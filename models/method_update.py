"""One policy update of any method of the unified paradigm (models/methods.py), micro-batched.

    method_update(policy, optimizer, batch, method, ...)

`batch` is a `models.trainer.UpdateBatch`: the step's outputs (prompt and completion token ids), their
rule correctness and reward, and, for GRPO, the group-relative advantages. Per method:

| method     | what this function does with the batch                                             |
|------------|------------------------------------------------------------------------------------|
| sft        | NLL on every row (rows are ground-truth solutions), GC = 1                         |
| rft        | NLL weighted by correctness, GC = 1 if correct else 0 (rows: the SFT model's pool)  |
| online_rft | the same loss; the rows come from the live policy (the caller's business)          |
| dpo        | one (correct, wrong) pair per question from the group (`dpo_pairs`), sigmoid DPO   |
|            | against `ref_model` (the SFT model); rows outside a pair are not used              |
| ppo        | per-token rewards with the KL in the reward (needs `ref_model`), per-token values  |
|            | of `value_model` before the update, GAE, clipped surrogate on the policy, clipped  |
|            | value loss on the value model (its own optimizer)                                  |
| grpo       | models.trainer.grpo_update, unchanged                                              |

Every policy loss is accumulated over micro-batches with the micro-batch's share of the full-batch
denominator (models.trainer.micro_batch_share), so the accumulated gradient is the full-batch gradient; then
grad-norm clip and one AdamW step, as in models/trainer.py (`clip_and_step`: no step on an inf/NaN loss
or norm). One update per batch (mu = 1).
"""
from __future__ import annotations

import time
import torch

from models.methods import (dpo_pairs, gae_advantages, get_method, masked_sum, ppo_token_rewards,
                            ppo_value_loss)
from models.policy import completion_logprobs
from models.trainer import UpdateBatch, accumulate_policy_gradients, clip_and_step, grpo_update, micro_batch_share


# ---- the value model ---------------------------------------------------------------------------
def token_values(value_model, prompt_ids: list[list[int]], completion_ids: list[list[int]], *, width: int,
                 micro_batch_size: int = 64, with_grad: bool = False) -> torch.Tensor:
    """V(s_t) for every completion token t: [B, T] float32, 0 past each completion.

    s_t is the state before token t is chosen (prompt + o_<t), so V is read at completion position
    t - 1 (position -1 is the prompt's last token), the head's raw logit (not a probability).
    """
    B = len(completion_ids)
    device = value_model.device
    out = torch.zeros((B, width), device=device)
    parts = []
    with torch.set_grad_enabled(with_grad):
        for start in range(0, B, micro_batch_size):
            p, c = prompt_ids[start:start + micro_batch_size], completion_ids[start:start + micro_batch_size]
            positions = [list(range(-1, len(ci) - 1)) for ci in c]
            logits, row = value_model.logits_at(p, c, positions)
            cols = torch.tensor([t for ci in c for t in range(len(ci))], dtype=torch.long, device=device)
            parts.append((row + start, cols, logits))
        if parts:
            rows = torch.cat([r for r, _, _ in parts])
            cols = torch.cat([c for _, c, _ in parts])
            vals = torch.cat([v for _, _, v in parts]).float()  # bf16 under model.autocast
            out = out.index_put((rows, cols), vals)
    return out


def value_model_size(value_model) -> dict[str, float]:
    """Parameters of the value model and the bytes its training state holds (params + grads + AdamW's
    two moments = 4 x the parameter bytes): PPO's extra memory over GRPO, besides activations."""
    n = sum(p.numel() for p in value_model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in value_model.parameters())
    return {"value_params": float(n), "value_state_mb": 4 * nbytes / 2**20}


# ---- the update --------------------------------------------------------------------------------
def _weighted_nll_update(policy, batch: UpdateBatch, loss_fn, mask, *, pad_id, aggregation, micro_batch_size):
    def loss_of(rows, logp, mb_mask, _entropy):
        return loss_fn(logp, mb_mask, {"correct": batch.correct[rows].to(logp.device)}, aggregation=aggregation,
                       max_len=batch.width)

    return accumulate_policy_gradients(policy, batch.prompt_ids, batch.completion_ids, mask, loss_of, pad_id=pad_id,
                                       aggregation=aggregation, micro_batch_size=micro_batch_size)


def _dpo_update(policy, batch: UpdateBatch, ref_model, *, pad_id, beta, micro_batch_size, seed):
    method = get_method("dpo")
    pairs = dpo_pairs(batch.correct.tolist(), batch.group_size, seed=seed)
    if not pairs:
        return {"pairs": 0.0, "loss": 0.0}, False
    totals: dict[str, float] = {}
    per_mb = max(1, micro_batch_size // 2)
    for start in range(0, len(pairs), per_mb):
        chunk = pairs[start:start + per_mb]
        sub = batch.rows([i for pair in chunk for i in pair])  # chosen, rejected, chosen, rejected, ...
        T = sub.width
        with torch.no_grad():
            ref_logp, _, _ = completion_logprobs(ref_model, sub.prompt_ids, sub.completion_ids, pad_id=pad_id,
                                                 width=T)
        logp, mb_mask, _ = completion_logprobs(policy, sub.prompt_ids, sub.completion_ids, pad_id=pad_id,
                                               width=T, with_grad=True)
        local = torch.arange(2 * len(chunk), device=logp.device).reshape(-1, 2)
        loss, metrics = method(logp, mb_mask, {"ref_logp": ref_logp, "pairs": local}, beta=beta)
        share = len(chunk) / len(pairs)
        (loss * share).backward()
        metrics["loss"] = loss.item()
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + (v if k == "pairs" else v * share)
    return totals, True


def _ppo_update(policy, optimizer, batch: UpdateBatch, mask, *, pad_id, ref_model, value_model, value_optimizer,
                beta, gamma, lam, value_clip, whiten, eps_low, eps_high, aggregation, grad_clip, micro_batch_size):
    if value_model is None or value_optimizer is None:
        raise ValueError("ppo needs a value model and its optimizer")
    T, B = batch.width, len(batch)
    device = mask.device
    # Rollout-time quantities, no grad: pi_old (= the policy now, mu = 1), pi_ref, V_old.
    old_logp, _, _ = completion_logprobs(policy, batch.prompt_ids, batch.completion_ids, pad_id=pad_id, width=T,
                                         micro_batch_size=micro_batch_size)
    if beta > 0:
        ref_logp, _, _ = completion_logprobs(ref_model, batch.prompt_ids, batch.completion_ids, pad_id=pad_id,
                                             width=T, micro_batch_size=micro_batch_size)
    else:
        ref_logp = old_logp
    value_model.eval()
    old_values = token_values(value_model, batch.prompt_ids, batch.completion_ids, width=T,
                              micro_batch_size=micro_batch_size)
    rewards = ppo_token_rewards(batch.rewards.to(device), old_logp, ref_logp, mask, beta)
    adv, returns = gae_advantages(rewards, old_values, mask, gamma, lam, whiten=whiten)
    policy_loss = get_method("ppo")

    def loss_of(rows, logp, mb_mask, _entropy):
        return policy_loss(logp, mb_mask, {"advantages": adv[rows]}, eps_low=eps_low, eps_high=eps_high,
                           aggregation=aggregation, max_len=T)

    totals = accumulate_policy_gradients(policy, batch.prompt_ids, batch.completion_ids, mask, loss_of, pad_id=pad_id,
                                         aggregation=aggregation, micro_batch_size=micro_batch_size)
    # The value model: clipped value loss towards the GAE returns (token mean over the batch).
    value_model.train()
    value_optimizer.zero_grad(set_to_none=True)
    for start in range(0, B, micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        values = token_values(value_model, batch.prompt_ids[rows], batch.completion_ids[rows], width=T,
                              micro_batch_size=micro_batch_size, with_grad=True)
        vloss, vmetrics = ppo_value_loss(values, old_values[rows], returns[rows], mask[rows], clip=value_clip)
        share = micro_batch_share(mask, rows, "token")
        (vloss * share).backward()
        for k, v in vmetrics.items():
            totals[k] = totals.get(k, 0.0) + v * share
    vnorm = torch.nn.utils.clip_grad_norm_(value_model.parameters(), grad_clip)
    value_optimizer.step()
    value_model.eval()
    n = mask.sum().clamp(min=1)
    totals.update(
        value_grad_norm=float(vnorm),
        kl=float(masked_sum(old_logp - ref_logp, mask).sum() / n),  # k1 estimate of KL(pi || pi_ref)
        gae_advantage_abs_mean=float(masked_sum(adv.abs(), mask).sum() / n),
        returns_mean=float(masked_sum(returns, mask).sum() / n),
        token_reward_mean=float(masked_sum(rewards, mask).sum() / n),
    )
    return totals


def method_update(policy, optimizer, batch: UpdateBatch, method: str, *, pad_id: int, ref_model=None,
                  value_model=None, value_optimizer=None, beta: float = 0.04, dpo_beta: float = 0.1,
                  gamma: float = 1.0, lam: float = 1.0, value_clip: float = 0.2, whiten_advantages: bool = True,
                  eps_low: float = 0.2, eps_high: float | None = None, aggregation: str = "sequence",
                  grad_clip: float = 1.0, micro_batch_size: int = 64, seed: int = 0) -> dict[str, float]:
    """One optimizer step of `method` on `batch` (see the module doc); returns metrics.

    ref_model: the frozen reference (dpo: the SFT model; ppo: the KL's reference, needed when
    beta > 0; grpo: as models.trainer.grpo_update). value_model / value_optimizer: ppo only
    (a models.reward_model.ValueHeadRewardModel; `ValueHeadRewardModel.from_policy(policy, "process")`).
    """
    t0 = time.perf_counter()
    if method == "grpo":
        return grpo_update(policy, optimizer, batch,
                           pad_id=pad_id, ref_model=ref_model, beta=beta, eps_low=eps_low, eps_high=eps_high,
                           aggregation=aggregation, grad_clip=grad_clip, micro_batch_size=micro_batch_size)
    get_method(method)  # unknown names fail here
    if method in ("dpo", "ppo") and ref_model is None and (method == "dpo" or beta > 0):
        raise ValueError(f"{method} needs a reference model")
    device = next(policy.parameters()).device
    mask = batch.completion_mask(device)
    policy.train()
    optimizer.zero_grad(set_to_none=True)
    stepped = True
    if method in ("sft", "rft", "online_rft"):
        totals = _weighted_nll_update(policy, batch, get_method(method), mask, pad_id=pad_id,
                                      aggregation=aggregation, micro_batch_size=micro_batch_size)
    elif method == "dpo":
        totals, stepped = _dpo_update(policy, batch, ref_model, pad_id=pad_id, beta=dpo_beta,
                                      micro_batch_size=micro_batch_size, seed=seed)
    else:
        totals = _ppo_update(policy, optimizer, batch, mask, pad_id=pad_id, ref_model=ref_model,
                             value_model=value_model, value_optimizer=value_optimizer, beta=beta, gamma=gamma,
                             lam=lam, value_clip=value_clip, whiten=whiten_advantages, eps_low=eps_low,
                             eps_high=eps_high, aggregation=aggregation, grad_clip=grad_clip,
                             micro_batch_size=micro_batch_size)
    if stepped:
        totals["grad_norm"] = clip_and_step(policy, optimizer, totals["loss"], grad_clip)
    policy.eval()
    seconds = time.perf_counter() - t0
    totals["update_seconds"] = seconds
    totals["update_tokens_per_s"] = float(mask.sum()) / max(seconds, 1e-9)
    return totals
