"""The unified paradigm (DeepSeekMath section 5.2.1; see shared/spec/grpo.md).

Every method's gradient is

    grad J_A = E_{(q,o) ~ D} [ (1/|o|) sum_t GC_A(q, o, t, pi_rf) * grad log pi_theta(o_t | q, o_<t) ]

| method     | data source D                                      | reward | gradient coefficient GC                |
|------------|----------------------------------------------------|--------|----------------------------------------|
| sft        | q, o from SFT data                                 | none   | 1                                      |
| rft        | q from SFT data, o sampled once from the SFT model | rule   | 1 if o correct else 0                  |
| online_rft | q from SFT data, o sampled from the live policy    | rule   | 1 if o correct else 0                  |
| dpo        | q from SFT data, a pair o+, o- from the SFT model  | rule   | sigma(beta log(pi(o-)/pi_ref(o-))      |
|            |                                                    |        |       - beta log(pi(o+)/pi_ref(o+))),  |
|            |                                                    |        | + for o+, - for o-                     |
| ppo        | q from SFT data, o from the live policy            | model  | A_t (GAE, with a value model)          |
| grpo       | q from SFT data, {o_i} from the live policy        | model  | A_{i,t} + beta * (pi_ref/pi_theta - 1) |

Here each method is a pure function over tensors with one signature,

    loss(logp, mask, batch, **hyper) -> (loss [] with grad, metrics: dict[str, float])

logp, mask: [B, T] the policy's per-token log-probs of the completions (mask true on
completion tokens); `batch` is a mapping of tensors holding what the method needs
(`Method.required` lists the keys). The loss is -J, so d loss / d logp_t = -GC_t / denominator,
the denominator being the aggregation's (models.grpo.LOSS_AGGREGATIONS; "sequence", the
paper's 1/|o| then mean over outputs, is the default everywhere). GRPO is the exception: its
loss is models.grpo.grpo_loss, which models.trainer.grpo_update calls with the reference and
old-policy log-probs it computes itself, so `METHODS` (the losses of this module) has no grpo entry.

Exactness notes (what the tests check):
- rft and online_rft are ONE function: they differ only in where the outputs come from
  (offline samples of the SFT model, drawn once, vs fresh samples of the live policy each
  step), which is the orchestration's business. Wrong outputs stay in the batch with GC 0,
  so under "sequence" they count in the mean over outputs, as the expectation over D says;
  filtering them out instead only rescales the gradient by 1 / (fraction correct).
- dpo: the standard sigmoid loss -log sigmoid(beta * (Delta+ - Delta-)), Delta = sum_t
  log(pi/pi_ref). Its exact gradient is beta * GC on every token of o+ and -beta * GC on o-
  (the table drops the chain rule's beta, as the paper does), with no 1/|o|, then 1/P over
  the P pairs. With `length_normalize=True`, Delta is the mean over the output's tokens, so
  the gradient is beta * GC / |o| (the unified formula's 1/|o|) with GC taken on those means.
- ppo: the clipped surrogate of models.grpo.grpo_loss with beta = 0 and per-token
  advantages [B, T]; the KL to the reference is in the reward (`ppo_token_rewards`), not in
  the loss. The value model is trained separately with `ppo_value_loss`. A batch without
  "old_logp" means mu = 1, i.e. old_logp = logp.detach() (ratio 1 in value, not in gradient).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from models.grpo import aggregate_token, get_loss_aggregation, grpo_loss, zero_outside

MethodLoss = Callable[..., tuple[Tensor, dict[str, float]]]


# ---- helpers ---------------------------------------------------------------------------------
def _require(batch: Mapping, keys: Sequence[str], method: str) -> None:
    missing = [k for k in keys if k not in batch or batch[k] is None]
    if missing:
        raise KeyError(f"{method} needs batch keys {missing}; got {sorted(batch)}")


def _check_shapes(logp: Tensor, mask: Tensor, **others: Tensor) -> None:
    for name, x in {"mask": mask, **others}.items():
        if tuple(x.shape) != tuple(logp.shape):
            raise ValueError(f"{name} has shape {tuple(x.shape)}, logp has {tuple(logp.shape)}")


def masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    """Sum over each row's masked tokens, [B, T] -> [B]; padding may hold inf/NaN."""
    return zero_outside(x, mask.bool()).sum(-1)


def weighted_nll(
    logp: Tensor,
    mask: Tensor,
    coefficients: Tensor,
    *,
    aggregation: str = "sequence",
    max_len: int | None = None,
) -> Tensor:
    """-aggregate(GC * logp): the loss whose gradient is -GC / denominator. []

    logp, mask: [B, T]; coefficients: [B] (one per output) or [B, T], constants (detached).
    """
    mask = mask.bool()
    coefficients = coefficients.detach().to(logp.dtype)
    if coefficients.dim() == 1:
        coefficients = coefficients.unsqueeze(-1)
    weighted = zero_outside(coefficients * zero_outside(logp, mask), mask)
    return -get_loss_aggregation(aggregation)(weighted, mask, max_len)


# ---- SFT, RFT, online RFT ----------------------------------------------------------------------
def sft_method_loss(
    logp: Tensor,
    mask: Tensor,
    batch: Mapping[str, Tensor] | None = None,
    *,
    aggregation: str = "sequence",
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """SFT: GC = 1 on every target token; the aggregated negative log-likelihood.

    logp, mask: [B, T]; batch unused. Metrics: "nll" (the loss), "tokens".
    """
    _check_shapes(logp, mask)
    loss = weighted_nll(logp, mask, logp.new_ones(logp.shape[0]), aggregation=aggregation, max_len=max_len)
    return loss, {"nll": loss.item(), "tokens": float(mask.bool().sum())}


def rft_loss(
    logp: Tensor,
    mask: Tensor,
    batch: Mapping[str, Tensor],
    *,
    aggregation: str = "sequence",
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """RFT and online RFT: GC = 1 if the output is correct else 0.

    logp, mask: [B, T]; batch["correct"]: [B] bool (or 0/1). Same function for both
    methods: RFT's outputs are sampled once from the SFT model, online RFT's from the live
    policy at every step. Wrong outputs stay in the batch with GC 0 (see the module doc).
    Metrics: "nll_correct" (sequence-mean NLL over the correct outputs; 0 if none),
    "frac_correct".
    """
    _require(batch, ["correct"], "rft")
    _check_shapes(logp, mask)
    correct = torch.as_tensor(batch["correct"], device=logp.device)
    if correct.shape != logp.shape[:1]:
        raise ValueError(f"correct has shape {tuple(correct.shape)}, expected [{logp.shape[0]}]")
    if not correct.dtype == torch.bool:
        if not ((correct == 0) | (correct == 1)).all():
            raise ValueError("correct must be bool or 0/1; use grpo or ppo for graded rewards")
        correct = correct.bool()
    loss = weighted_nll(logp, mask, correct.to(logp.dtype), aggregation=aggregation, max_len=max_len)
    with torch.no_grad():
        m = mask.bool() & correct[:, None]
        tokens = m.sum(-1)
        rows = tokens > 0
        row_nll = -masked_sum(logp, m) / tokens.clamp(min=1)
        nll_correct = (row_nll[rows].sum() / rows.sum().clamp(min=1)).item()
    return loss, {"nll_correct": nll_correct, "frac_correct": correct.float().mean().item() if len(correct) else 0.0}


online_rft_loss = rft_loss


# ---- DPO -------------------------------------------------------------------------------------------
def dpo_loss(
    policy_chosen_logp_sum: Tensor,
    policy_rejected_logp_sum: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, dict[str, float]]:
    """Sigmoid DPO over P pairs: mean_p -log sigmoid(beta * ((pc - rc) - (pr - rr))). []

    All inputs [P]: sequence log-probs (sums over tokens, or per-token means for the
    length-normalised form) of the chosen / rejected outputs under the policy and the
    reference. Zero pairs -> loss 0 (still attached to the graph).
    d loss / d pc = -beta * sigmoid(beta * ((pr - rr) - (pc - rc))) / P, the opposite for pr.
    Metrics: "rewards_chosen" / "rewards_rejected" (mean beta * (policy - ref)),
    "reward_margin" (mean difference), "accuracy" (fraction of pairs whose margin is > 0).
    """
    shapes = {tuple(x.shape) for x in (policy_chosen_logp_sum, policy_rejected_logp_sum, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"dpo_loss needs four [P] tensors, got shapes {sorted(shapes)}")
    chosen_reward = beta * (policy_chosen_logp_sum - ref_chosen.detach())
    rejected_reward = beta * (policy_rejected_logp_sum - ref_rejected.detach())
    margin = chosen_reward - rejected_reward
    n = margin.shape[0]
    loss = -F.logsigmoid(margin).sum() / max(n, 1)
    with torch.no_grad():

        def mean(x: Tensor) -> float:
            return (x.sum() / max(n, 1)).item()

        metrics = {
            "rewards_chosen": mean(chosen_reward),
            "rewards_rejected": mean(rejected_reward),
            "reward_margin": mean(margin),
            "accuracy": mean((margin > 0).to(margin.dtype)),
        }
    return loss, metrics


def dpo_pairs(correct: Sequence[bool], group_size: int, seed: int = 0) -> list[tuple[int, int]]:
    """One (chosen, rejected) pair per question: a random correct and a random wrong output.

    correct: [N] flags laid out group after group (outputs g*G .. g*G+G-1 answer question g).
    Returns indices into `correct`, in question order. A question whose outputs are all
    right or all wrong gets no pair. Deterministic for a given seed (random.Random(seed)).
    """
    correct = [bool(c) for c in correct]
    if group_size < 1 or len(correct) % group_size:
        raise ValueError(f"{len(correct)} flags do not split into groups of {group_size}")
    rng = random.Random(seed)
    pairs = []
    for start in range(0, len(correct), group_size):
        idx = range(start, start + group_size)
        right = [i for i in idx if correct[i]]
        wrong = [i for i in idx if not correct[i]]
        if right and wrong:
            pairs.append((rng.choice(right), rng.choice(wrong)))
    return pairs


def dpo_method_loss(
    logp: Tensor,
    mask: Tensor,
    batch: Mapping[str, Tensor],
    *,
    beta: float = 0.1,
    length_normalize: bool = False,
) -> tuple[Tensor, dict[str, float]]:
    """DPO in the uniform API.

    logp, mask: [B, T]; batch["ref_logp"]: [B, T] the reference's log-probs of the same rows;
    batch["pairs"]: [P, 2] (chosen row, rejected row), e.g. torch.tensor(dpo_pairs(...)).
    length_normalize: per-token mean log-ratios instead of sums (module doc).
    """
    _require(batch, ["ref_logp", "pairs"], "dpo")
    ref_logp = batch["ref_logp"]
    _check_shapes(logp, mask, ref_logp=ref_logp)
    mask = mask.bool()
    pairs = torch.as_tensor(batch["pairs"], dtype=torch.long, device=logp.device).reshape(-1, 2)
    seq = masked_sum(logp, mask)
    ref = masked_sum(ref_logp.detach(), mask)
    if length_normalize:
        tokens = mask.sum(-1).clamp(min=1).to(logp.dtype)
        seq, ref = seq / tokens, ref / tokens
    chosen, rejected = pairs[:, 0], pairs[:, 1]
    loss, metrics = dpo_loss(seq[chosen], seq[rejected], ref[chosen], ref[rejected], beta)
    metrics["pairs"] = float(len(pairs))
    return loss, metrics


# ---- PPO -------------------------------------------------------------------------------------------
def ppo_token_rewards(rm_score: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, beta: float) -> Tensor:
    """PPO's per-token reward with the KL penalty in the reward. [B, T] (detached).

    r_t = r_phi * [t = last completion token] - beta * (logp_t - ref_logp_t)
    rm_score: [B] the reward model's score of each whole output; logp, ref_logp, mask: [B, T].
    0 outside the mask; a row without tokens gets no score.
    """
    _check_shapes(logp, mask, ref_logp=ref_logp)
    mask = mask.bool()
    with torch.no_grad():
        rewards = zero_outside(-beta * (zero_outside(logp, mask) - zero_outside(ref_logp, mask)), mask)
        T = mask.shape[-1]
        last = (T - 1 - mask.flip(-1).int().argmax(-1)).unsqueeze(-1)  # last true index per row
        has = mask.any(-1, keepdim=True)
        score = torch.as_tensor(rm_score, dtype=rewards.dtype, device=rewards.device).reshape(-1, 1)
        rewards = rewards.scatter_add(-1, last, torch.where(has, score, torch.zeros_like(score)))
    return rewards


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / (std + eps) over the masked tokens (sample std), 0 outside. [B, T]."""
    mask = mask.bool()
    n = mask.sum().clamp(min=2)
    mean = aggregate_token(x, mask)
    var = zero_outside((x - mean) ** 2, mask).sum() / (n - 1)
    return zero_outside((x - mean) / (var.sqrt() + eps), mask)


def gae_advantages(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    *,
    whiten: bool = False,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over each row's masked tokens. (advantages, returns), [B, T].

    delta_t = r_t + gamma * V_{t'} - V_t       t' the next masked token; V = 0 after the last
    A_t     = delta_t + gamma * lam * A_{t'}
    returns = A + V (the value model's target; computed before any whitening).
    Positions outside the mask are skipped (they neither carry nor break the recursion)
    and get 0. whiten: normalise the advantages over all masked tokens of the batch.
    Detached.
    """
    _check_shapes(rewards, mask, values=values)
    mask = mask.bool()
    with torch.no_grad():
        rewards, values = zero_outside(rewards, mask), zero_outside(values, mask)
        advantages = torch.zeros_like(rewards)
        next_value = rewards.new_zeros(rewards.shape[0])
        next_adv = rewards.new_zeros(rewards.shape[0])
        for t in reversed(range(rewards.shape[-1])):
            m = mask[:, t]
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            adv = delta + gamma * lam * next_adv
            next_value = torch.where(m, values[:, t], next_value)
            next_adv = torch.where(m, adv, next_adv)
            advantages[:, t] = torch.where(m, adv, torch.zeros_like(adv))
        returns = zero_outside(advantages + values, mask)
        if whiten:
            advantages = masked_whiten(advantages, mask)
    return advantages, returns


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: float = 0.2,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss: 0.5 * masked mean of max((V - R)^2, (V_clip - R)^2). []

    values: [B, T] the value model's current predictions (with grad); old_values: [B, T]
    its predictions when the batch was sampled; returns: [B, T] from gae_advantages.
    V_clip = old_values + clamp(values - old_values, -clip, clip).
    Metrics: "vf_loss", "vf_clip_frac" (fraction of tokens where the clipped error is the
    larger one, i.e. where the clip is active), "vf_mean".
    """
    _check_shapes(values, mask, old_values=old_values, returns=returns)
    mask = mask.bool()
    values = zero_outside(values, mask)
    old_values, returns = zero_outside(old_values.detach(), mask), zero_outside(returns.detach(), mask)
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * aggregate_token(torch.maximum(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        metrics = {
            "vf_loss": loss.item(),
            "vf_clip_frac": aggregate_token((clipped_err > unclipped_err).to(values.dtype), mask).item(),
            "vf_mean": aggregate_token(values, mask).item(),
        }
    return loss, metrics


def ppo_loss(
    logp: Tensor,
    mask: Tensor,
    batch: Mapping[str, Tensor],
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    aggregation: str = "sequence",
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO policy loss: the clipped surrogate with per-token GAE advantages, no KL term.

    batch["advantages"]: [B, T] (gae_advantages); batch["old_logp"]: [B, T], optional (mu = 1).
    The KL to the reference is already in the rewards (ppo_token_rewards). Metrics as grpo_loss.
    """
    _require(batch, ["advantages"], "ppo")
    advantages = batch["advantages"]
    _check_shapes(logp, mask, advantages=advantages)
    old_logp = batch.get("old_logp")
    old_logp = logp.detach() if old_logp is None else old_logp
    return grpo_loss(logp, old_logp, None, advantages.detach(), mask, eps_low=eps_low,
                     eps_high=eps_high, beta=0.0, aggregation=aggregation, max_len=max_len)


# ---- registry ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One row of the unified-paradigm table, and its loss (call the Method to compute it)."""

    name: str
    loss: MethodLoss
    data_source: str
    reward: str
    gradient_coefficient: str
    required: tuple[str, ...]  # batch keys the loss needs

    def __call__(self, logp: Tensor, mask: Tensor, batch: Mapping[str, Tensor] | None = None, **hyper):
        return self.loss(logp, mask, {} if batch is None else batch, **hyper)


METHODS: Mapping[str, Method] = {
    m.name: m
    for m in (
        Method("sft", sft_method_loss, "q, o from SFT data", "none", "1", ()),
        Method("rft", rft_loss, "q from SFT data, o sampled once from the SFT model (offline)", "rule",
               "1 if o correct else 0", ("correct",)),
        Method("online_rft", online_rft_loss, "q from SFT data, o sampled from the live policy", "rule",
               "1 if o correct else 0", ("correct",)),
        Method("dpo", dpo_method_loss, "q from SFT data, a pair o+, o- from the SFT model", "rule",
               "sigma(beta log(pi(o-)/pi_ref(o-)) - beta log(pi(o+)/pi_ref(o+))), + for o+, - for o-",
               ("ref_logp", "pairs")),
        Method("ppo", ppo_loss, "q from SFT data, o from the live policy", "model", "A_t (GAE, with a value model)",
               ("advantages",)),
    )
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; expected one of {sorted(METHODS)}") from None
