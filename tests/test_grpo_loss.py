import math

import pytest
import torch

from models.grpo import LOSS_AGGREGATIONS, get_loss_aggregation, grpo_loss, kl_k3

F64 = torch.float64


def _mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def _random_batch(lengths, T, *, seed=0, spread=0.3, dtype=F64):
    """logp, old_logp, ref_logp [B, T], outcome advantages [B], mask [B, T]; ratios spread around 1."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    old_logp = logp + spread * torch.randn(B, T, generator=g, dtype=dtype)
    ref_logp = logp + spread * torch.randn(B, T, generator=g, dtype=dtype)
    advantages = torch.randn(B, generator=g, dtype=dtype)
    return logp, old_logp, ref_logp, advantages, _mask(lengths, T)


def _grad(loss_fn, logp):
    logp = logp.clone().requires_grad_(True)
    loss = loss_fn(logp)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad


# ---- hand-computed example -------------------------------------------------------------------
# B = 2, T = 3, eps = 0.2, beta = 0.04, A = [1, -2], mask = [[1, 1, 1], [1, 1, 0]].
# ratios [[1.5, 1.0, 0.5], [0.5, 1.1, (2.0 masked)]], ref - logp = [[ln 2, 0, 0], [0, ln 2, 0]].
# surr row 0 (A = 1):  min(1.5, 1.2) = 1.2 (clipped high), min(1, 1) = 1, min(0.5, 0.8) = 0.5 -> sum 2.7, mean 0.9
# surr row 1 (A = -2): min(-1.0, 0.8 * -2) = -1.6 (clipped low), min(-2.2, -2.2) = -2.2   -> sum -3.8, mean -1.9
# k3(ln 2) = 2 - ln 2 - 1 = 0.306853; row means 0.306853 / 3 = 0.102284 and 0.306853 / 2 = 0.153426
# sequence: pg_loss = -(0.9 - 1.9) / 2 = 0.5; loss = 0.5 + 0.04 * (0.102284 + 0.153426) / 2 = 0.505114
# token:    loss = -(-1.1 - 0.04 * 2 * 0.306853) / 5 = (1.1 + 0.024548) / 5 = 0.224910
# dr_grpo:  loss = (1.1 + 0.024548) / (2 * 3) = 0.187425
K3_LN2 = 1 - math.log(2)
HAND = {
    "sequence": 0.5 + 0.04 * (K3_LN2 / 3 + K3_LN2 / 2) / 2,
    "token": (1.1 + 0.04 * 2 * K3_LN2) / 5,
    "dr_grpo": (1.1 + 0.04 * 2 * K3_LN2) / 6,
}


def _hand_batch():
    logp = torch.tensor([[0.3, 0.5, 0.2], [0.4, 0.6, 0.1]], dtype=F64).log()
    ratio = torch.tensor([[1.5, 1.0, 0.5], [0.5, 1.1, 2.0]], dtype=F64)
    ln2 = math.log(2)
    ref_logp = logp + torch.tensor([[ln2, 0, 0], [0, ln2, 0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logp, logp - ratio.log(), ref_logp, torch.tensor([1.0, -2.0], dtype=F64), mask


@pytest.mark.parametrize("aggregation", ["sequence", "token", "dr_grpo"])
def test_loss_by_hand(aggregation):
    loss, metrics = grpo_loss(*_hand_batch(), aggregation=aggregation)
    assert loss.item() == pytest.approx(HAND[aggregation], rel=1e-9)
    assert HAND["sequence"] == pytest.approx(0.505114, abs=1e-6)
    if aggregation == "sequence":
        assert metrics["pg_loss"] == pytest.approx(0.5)
    assert metrics["kl"] == pytest.approx(2 * K3_LN2 / 5)  # 0.122741
    assert metrics["clip_frac_low"] == pytest.approx(1 / 5)
    assert metrics["clip_frac_high"] == pytest.approx(1 / 5)
    assert metrics["ratio_mean"] == pytest.approx((1.5 + 1.0 + 0.5 + 0.5 + 1.1) / 5)  # 0.92
    assert all(isinstance(v, float) for v in metrics.values())


# ---- gradient = the spec's gradient coefficient ----------------------------------------------
# With mu = 1 (old_logp = logp.detach()) d(-J)/d logp_{i,t} = -(A_{i,t} + beta (pi_ref / pi - 1)) / denominator,
# denominator = |o_i| * B (sequence), number of tokens (token), B * max_len (dr_grpo).
@pytest.mark.parametrize("aggregation", ["sequence", "token", "dr_grpo"])
@pytest.mark.parametrize("per_token_advantages", [False, True])
def test_gradient_is_the_gradient_coefficient(aggregation, per_token_advantages):
    lengths, T, beta, max_len = [7, 3, 1, 5, 6, 2], 7, 0.04, 10
    logp, _, ref_logp, advantages, mask = _random_batch(lengths, T)
    if per_token_advantages:
        advantages = torch.randn(len(lengths), T, generator=torch.Generator().manual_seed(1), dtype=F64)

    def loss_fn(lp):
        return grpo_loss(lp, lp.detach(), ref_logp, advantages, mask, beta=beta, aggregation=aggregation,
                         max_len=max_len)[0]

    _, grad = _grad(loss_fn, logp)
    coefficient = advantages.expand(T, -1).T if advantages.dim() == 1 else advantages
    coefficient = coefficient + beta * ((ref_logp - logp).exp() - 1)
    denominator = {
        "sequence": torch.tensor(lengths, dtype=F64)[:, None] * len(lengths),
        "token": torch.tensor(float(sum(lengths)), dtype=F64),
        "dr_grpo": torch.tensor(float(len(lengths) * max_len), dtype=F64),
    }[aggregation]
    torch.testing.assert_close(grad, torch.where(mask, -coefficient / denominator, 0.0))


# ---- equivalence with TRL's GRPOTrainer._compute_loss ------------------------------------------
def trl_compute_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, completion_mask,
                     epsilon_low, epsilon_high, beta, loss_type, max_completion_length):
    """TRL's loss (trl/trainer/grpo_trainer.py, importance_sampling_level="token", delta=None), re-derived."""
    completion_mask = completion_mask.to(per_token_logps.dtype)
    per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss1 = coef_1 * advantages.unsqueeze(1)
    per_token_loss2 = coef_2 * advantages.unsqueeze(1)
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * completion_mask).sum() / completion_mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * completion_mask).sum() / (per_token_loss.size(0) * max_completion_length)
    is_low_clipped = (coef_1 < 1 - epsilon_low) & (advantages.unsqueeze(1) < 0)
    is_high_clipped = (coef_1 > 1 + epsilon_high) & (advantages.unsqueeze(1) > 0)
    n = completion_mask.sum()
    clip = {"low": (is_low_clipped * completion_mask).sum() / n, "high": (is_high_clipped * completion_mask).sum() / n}
    return loss, clip


@pytest.mark.parametrize("ours, trl", [("sequence", "grpo"), ("token", "bnpo"), ("dr_grpo", "dr_grpo")])
@pytest.mark.parametrize("beta", [0.04, 0.0])
def test_matches_trl(ours, trl, beta):
    lengths, T = [16, 9, 1, 12, 16, 4, 7, 11], 16
    logp, old_logp, ref_logp, advantages, mask = _random_batch(lengths, T, seed=3)
    eps_low, eps_high = 0.2, 0.28

    loss, grad = _grad(lambda lp: grpo_loss(lp, old_logp, ref_logp, advantages, mask, eps_low=eps_low,
                                            eps_high=eps_high, beta=beta, aggregation=ours, max_len=20)[0], logp)
    trl_loss, trl_grad = _grad(lambda lp: trl_compute_loss(lp, old_logp, ref_logp, advantages, mask, eps_low,
                                                           eps_high, beta, trl, 20)[0], logp)
    torch.testing.assert_close(loss, trl_loss)
    torch.testing.assert_close(grad, trl_grad)

    _, metrics = grpo_loss(logp, old_logp, ref_logp, advantages, mask, eps_low=eps_low, eps_high=eps_high, beta=beta)
    _, clip = trl_compute_loss(logp, old_logp, ref_logp, advantages, mask, eps_low, eps_high, beta, trl, 20)
    assert metrics["clip_frac_low"] == pytest.approx(clip["low"].item()) and metrics["clip_frac_low"] > 0
    assert metrics["clip_frac_high"] == pytest.approx(clip["high"].item()) and metrics["clip_frac_high"] > 0


# ---- invariants ----------------------------------------------------------------------------------
def test_kl_is_nonnegative_and_zero_at_ref():
    logp, _, ref_logp, _, _ = _random_batch([50] * 20, 50, spread=3.0)
    assert (kl_k3(logp, ref_logp) >= 0).all()
    assert kl_k3(logp, logp).abs().max() == 0
    loss, metrics = grpo_loss(logp, logp, logp, torch.zeros(20, dtype=F64), torch.ones(20, 50))
    assert metrics["kl"] == 0 and loss.item() == 0


@pytest.mark.parametrize("aggregation", ["sequence", "token", "dr_grpo"])
def test_masked_garbage_gets_zero_gradient(aggregation):
    lengths, T = [5, 2, 4], 6
    logp, old_logp, ref_logp, _, mask = _random_batch(lengths, T, seed=4)
    advantages = torch.randn(3, T, dtype=F64)
    clean, clean_grad = _grad(lambda lp: grpo_loss(lp, old_logp, ref_logp, advantages, mask,
                                                   aggregation=aggregation)[0], logp)
    pad = ~mask
    dirty = [x.masked_fill(pad, v) for x, v in
             [(logp, -math.inf), (old_logp, math.nan), (ref_logp, math.inf), (advantages, math.nan)]]
    loss, grad = _grad(lambda lp: grpo_loss(lp, *dirty[1:3], dirty[3], mask, aggregation=aggregation)[0], dirty[0])
    assert torch.isfinite(grad).all() and (grad[pad] == 0).all() and (grad[mask] != 0).all()
    torch.testing.assert_close(loss, clean)
    torch.testing.assert_close(grad, clean_grad)


def test_fully_masked_rows():
    lengths, T = [5, 3, 6], 6
    logp, old_logp, ref_logp, advantages, mask = _random_batch(lengths, T, seed=5)
    ref, _ = grpo_loss(logp, old_logp, ref_logp, advantages, mask)
    # An extra empty row neither produces NaN nor enters the mean over outputs.
    padded = [torch.cat([x, torch.full((1, T), math.nan, dtype=F64)]) for x in (logp, old_logp, ref_logp)]
    padded_mask = torch.cat([mask, torch.zeros(1, T, dtype=torch.bool)])
    loss, grad = _grad(lambda lp: grpo_loss(lp, *padded[1:], torch.cat([advantages, advantages[:1]]),
                                            padded_mask)[0], padded[0])
    torch.testing.assert_close(loss, ref)
    assert (grad[-1] == 0).all() and torch.isfinite(grad).all()
    # A batch with no tokens at all: loss and metrics 0, not NaN.
    for aggregation in LOSS_AGGREGATIONS:
        loss, metrics = grpo_loss(logp, old_logp, ref_logp, advantages, torch.zeros(3, T), aggregation=aggregation)
        assert loss.item() == 0 and all(v == 0 for v in metrics.values())


def test_float32_matches_float64():
    logp, old_logp, ref_logp, advantages, mask = _random_batch([32, 20, 7, 30], 32, seed=6)
    loss64, grad64 = _grad(lambda lp: grpo_loss(lp, old_logp, ref_logp, advantages, mask)[0], logp)
    loss32, grad32 = _grad(lambda lp: grpo_loss(lp, old_logp.float(), ref_logp.float(), advantages.float(),
                                                mask)[0], logp.float())
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32.double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad32.double(), grad64, rtol=1e-4, atol=1e-6)


def test_beta_zero_needs_no_reference():
    logp, old_logp, ref_logp, advantages, mask = _random_batch([4, 2], 4, seed=7)
    loss, metrics = grpo_loss(logp, old_logp, None, advantages, mask, beta=0.0)
    with_ref, metrics_ref = grpo_loss(logp, old_logp, ref_logp, advantages, mask, beta=0.0)
    assert loss.item() == with_ref.item() == metrics["pg_loss"]
    assert metrics["kl"] == 0 and metrics_ref["kl"] > 0  # KL is still reported when a reference is given
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old_logp, None, advantages, mask)


def test_aggregation_registry():
    assert set(LOSS_AGGREGATIONS) == {"sequence", "token", "dr_grpo"}
    assert get_loss_aggregation("token") is LOSS_AGGREGATIONS["token"]
    with pytest.raises(ValueError, match=r"'dr_grpo', 'sequence', 'token'"):
        grpo_loss(*_hand_batch(), aggregation="seq-mean")
