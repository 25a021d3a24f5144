"""GRPO policy loss (DeepSeekMath eq. for J_GRPO; see shared/spec/grpo.md).

Pure functions over tensors, [B, T] = [outputs, completion positions], with a
`mask` that is true on completion tokens. Per token:

    ratio = exp(logp - old_logp)
    surr  = min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    kl    = exp(ref_logp - logp) - (ref_logp - logp) - 1          # k3, >= 0
    loss  = -aggregate(surr - beta * kl)

The KL is a per-token loss term, not a reward penalty. With mu = 1 the ratio is
1 in value but not in gradient, so it is never special-cased.

Sampler/trainer mismatch correction (optional; TRL's `vllm_importance_sampling_correction`, verl's
`rollout_correction`): the outputs were drawn by the sampler (vLLM, bf16 kernels), whose probabilities
differ from the trainer's. The surrogate of each token (or each output) is weighted by

    w = exp(old_logp - sampler_logp)                     token level, [B, T]
    w = exp(sum_t (old_logp - sampler_logp))             sequence level, [B, 1]
    truncate: w = min(w, cap)     mask: w = 0 where w > cap

a truncated importance-sampling estimate of the gradient under the trainer's own distribution. The
KL term is not weighted (TRL's choice): it is computed on the trainer's log-probs exactly.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 estimator of KL(pi || pi_ref) per token, [B, T] -> [B, T].

    Unbiased and always >= 0 (x - 1 - log x >= 0 with x = pi_ref / pi); its
    gradient w.r.t. logp is 1 - pi_ref / pi.
    """
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def zero_outside(x: Tensor, mask: Tensor) -> Tensor:
    """x with every position outside `mask` (bool) set to 0: exactly 0, with exactly zero gradient
    there, even where x holds inf or NaN (0 * inf is NaN, so multiplying by the mask is not enough;
    torch.where sends no gradient to the branch it did not select)."""
    return torch.where(mask, x, x.new_zeros(()))


def aggregate_sequence(values: Tensor, mask: Tensor, max_len: int | None = None) -> Tensor:
    """Paper: mean over each output's own tokens, then mean over outputs. [B, T] -> [].

    Rows without a token (e.g. batch padding) are left out of the mean over
    outputs rather than counted as zero, so they cannot shrink the update; this
    only differs from TRL's "grpo" (which divides by B) when such rows exist.
    """
    tokens = mask.sum(-1)
    row_mean = zero_outside(values, mask).sum(-1) / tokens.clamp(min=1)
    return row_mean.sum() / (tokens > 0).sum().clamp(min=1)


def aggregate_token(values: Tensor, mask: Tensor, max_len: int | None = None) -> Tensor:
    """DAPO: sum over all tokens of the batch / number of tokens. [B, T] -> []."""
    return zero_outside(values, mask).sum() / mask.sum().clamp(min=1)


def aggregate_dr_grpo(values: Tensor, mask: Tensor, max_len: int | None = None) -> Tensor:
    """Dr. GRPO: sum over tokens / (B * max_len), a constant that has no length bias. [B, T] -> []."""
    max_len = values.shape[-1] if max_len is None else max_len
    return zero_outside(values, mask).sum() / (values.shape[0] * max_len)


LOSS_AGGREGATIONS: Mapping[str, Callable[[Tensor, Tensor, int | None], Tensor]] = {
    "sequence": aggregate_sequence,
    "token": aggregate_token,
    "dr_grpo": aggregate_dr_grpo,
}


def get_loss_aggregation(name: str) -> Callable[[Tensor, Tensor, int | None], Tensor]:
    try:
        return LOSS_AGGREGATIONS[name]
    except KeyError:
        raise ValueError(f"unknown loss aggregation {name!r}; expected one of {sorted(LOSS_AGGREGATIONS)}") from None


IMPORTANCE_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampler_log_ratio(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, level: str) -> Tensor:
    """log(pi_trainer / pi_sampler): [B, T] -> [B, T] per token ("token", 0 outside `mask`) or [B, 1]
    per output ("sequence": the sum over its tokens). A token whose sampler log-prob is NaN (a sampler
    that did not give one) counts as no mismatch, 0."""
    diff = torch.nan_to_num(zero_outside(old_logp - sampler_logp, mask.bool()), nan=0.0)
    if level == "token":
        return diff
    if level == "sequence":
        return diff.sum(-1, keepdim=True)
    raise ValueError(f"unknown importance-sampling level {level!r}; expected token or sequence")


def importance_weights(log_ratio: Tensor, correction: str, cap: float) -> Tensor:
    """Truncated importance weights from `sampler_log_ratio`, same shape, no grad: min(ratio, cap)
    ("*_truncate") or the ratio with 0 where it exceeds `cap` ("*_mask"). Compared in log space, so a
    long output's sequence ratio that would overflow exp() is still capped or masked exactly."""
    log_cap = math.log(cap)
    log_ratio = log_ratio.detach()
    if correction.endswith("_truncate"):
        return torch.exp(log_ratio.clamp(max=log_cap))
    if correction.endswith("_mask"):
        return torch.where(log_ratio > log_cap, log_ratio.new_zeros(()), torch.exp(log_ratio.clamp(max=log_cap)))
    raise ValueError(f"unknown importance correction {correction!r}; expected one of {IMPORTANCE_CORRECTIONS}")


def importance_ratio_metrics(log_ratios: Tensor, cap: float) -> dict[str, float]:
    """Statistics of the sampler/trainer ratio over the tokens (or outputs) it was computed on (a 1-D
    tensor of log ratios): is_ratio_mean / _min / _max (of the ratio before the cap; max shown as at most
    e^20), is_capped_frac (the share beyond `cap`, truncated or masked)."""
    if log_ratios.numel() == 0:
        return {}
    ratio = torch.exp(log_ratios.double().clamp(max=20.0))
    return {"is_ratio_mean": float(ratio.mean()), "is_ratio_min": float(ratio.min()),
            "is_ratio_max": float(ratio.max()), "is_capped_frac": float((log_ratios > math.log(cap)).double().mean())}


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    beta: float = 0.04,
    aggregation: str = "sequence",
    max_len: int | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped GRPO loss and its metrics.

    logp, old_logp, ref_logp, mask: [B, T]; ref_logp may be None when beta == 0.
    advantages: [B] (outcome, broadcast over tokens) or [B, T] (process).
    mask: true (or nonzero) on completion tokens.
    eps_high: upper clip (DAPO's clip-higher); None means eps_low.
    aggregation: a LOSS_AGGREGATIONS name; max_len is Dr. GRPO's constant (default T).
    is_weights: [B, T] or [B, 1] sampler-correction weights (`importance_weights`) on the surrogate, or None.

    Returns (loss [] with grad, metrics): "kl" (masked mean k3; 0 without ref),
    "clip_frac_low" / "clip_frac_high" (fraction of tokens where the clip is active:
    A < 0 and ratio < 1 - eps_low / A > 0 and ratio > 1 + eps_high), "ratio_mean",
    "pg_loss" (-aggregate(surr), the loss without the KL term).
    """
    if beta != 0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp; pass beta=0 to train without a reference model")
    if not logp.shape == old_logp.shape == mask.shape:
        shapes = [tuple(x.shape) for x in (logp, old_logp, mask)]
        raise ValueError(f"logp, old_logp and mask must have one shape, got {shapes}")
    eps_high = eps_low if eps_high is None else eps_high
    aggregate = get_loss_aggregation(aggregation)
    mask = mask.bool()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)

    # Padding positions can hold anything (-inf logp, NaN): zeroed before any arithmetic.
    logp = zero_outside(logp, mask)
    old_logp = zero_outside(old_logp, mask)
    advantages = zero_outside(advantages, mask)

    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    surr = torch.minimum(ratio * advantages, clipped * advantages)
    if is_weights is not None:
        surr = surr * is_weights.detach()
    kl = kl_k3(logp, zero_outside(ref_logp, mask)) if ref_logp is not None else torch.zeros_like(logp)
    objective = surr - beta * kl if beta != 0 else surr
    loss = -aggregate(objective, mask, max_len)

    with torch.no_grad():
        metrics = {
            "kl": aggregate_token(kl, mask).item(),
            "clip_frac_low": aggregate_token(((advantages < 0) & (ratio < 1 - eps_low)).to(logp.dtype), mask).item(),
            "clip_frac_high": aggregate_token(((advantages > 0) & (ratio > 1 + eps_high)).to(logp.dtype), mask).item(),
            "ratio_mean": aggregate_token(ratio, mask).item(),
            "pg_loss": -aggregate(surr, mask, max_len).item(),
        }
    return loss, metrics
