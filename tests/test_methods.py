import math

import pytest
import torch

from models.grpo import grpo_loss
from models.methods import (
    METHODS,
    dpo_loss,
    dpo_method_loss,
    dpo_pairs,
    gae_advantages,
    get_method,
    masked_whiten,
    online_rft_loss,
    ppo_token_rewards,
    ppo_value_loss,
    rft_loss,
    sft_method_loss,
)

F64 = torch.float64


def _mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def _batch(lengths, T, *, seed=0):
    """logp, ref_logp [B, T], mask [B, T]; padding holds garbage (-inf / NaN) to check it is ignored."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    logp = -torch.rand(B, T, generator=g, dtype=F64) * 3
    ref_logp = logp + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    mask = _mask(lengths, T)
    return logp.masked_fill(~mask, -math.inf), ref_logp.masked_fill(~mask, math.nan), mask


def _grad(loss_fn, logp):
    logp = logp.clone().requires_grad_(True)
    loss, metrics = loss_fn(logp)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(grad).all()
    return loss.detach(), grad, metrics


def _denominator(aggregation, lengths, max_len):
    if aggregation == "sequence":
        return torch.tensor(lengths, dtype=F64)[:, None] * len(lengths)
    if aggregation == "token":
        return torch.tensor(float(sum(lengths)), dtype=F64)
    return torch.tensor(float(len(lengths) * max_len), dtype=F64)  # dr_grpo


LENGTHS, T = [5, 2, 4, 1], 5


# ---- SFT: GC = 1 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("aggregation", ["sequence", "token", "dr_grpo"])
def test_sft_gradient_is_one(aggregation):
    logp, _, mask = _batch(LENGTHS, T)
    loss, grad, metrics = _grad(lambda lp: get_method("sft")(lp, mask, aggregation=aggregation, max_len=8), logp)
    expected = torch.where(mask, -1.0 / _denominator(aggregation, LENGTHS, 8), 0.0)
    torch.testing.assert_close(grad, expected)  # sequence: -1 / (|o_i| * B)
    if aggregation == "sequence":
        clean = logp.masked_fill(~mask, 0)
        nll = -(clean.sum(-1) / torch.tensor(LENGTHS)).mean()
        assert loss.item() == pytest.approx(nll.item()) and metrics["nll"] == pytest.approx(nll.item())
    assert metrics["tokens"] == 12.0


def test_sft_method_loss_by_hand():
    logp = torch.tensor([[math.log(0.5), math.log(0.25)], [math.log(0.5), -math.inf]], dtype=F64)
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, _ = sft_method_loss(logp, mask)
    # rows: (ln 2 + ln 4) / 2 = 1.5 ln 2, ln 2; mean = 1.25 ln 2 = 0.866434
    assert loss.item() == pytest.approx(1.25 * math.log(2)) and loss.item() == pytest.approx(0.866434, abs=1e-6)
    loss, _ = sft_method_loss(logp, mask, aggregation="token")
    assert loss.item() == pytest.approx(4 * math.log(2) / 3)  # (ln 2 + 2 ln 2 + ln 2) / 3


# ---- RFT / online RFT: GC = 1 if correct else 0 ---------------------------------------------------
@pytest.mark.parametrize("name", ["rft", "online_rft"])
@pytest.mark.parametrize("aggregation", ["sequence", "token"])
def test_rft_gradient_is_correct_flag(name, aggregation):
    logp, _, mask = _batch(LENGTHS, T, seed=1)
    correct = torch.tensor([True, False, True, False])
    loss, grad, metrics = _grad(lambda lp: get_method(name)(lp, mask, {"correct": correct},
                                                            aggregation=aggregation), logp)
    gc = correct.to(F64)[:, None].expand(-1, T)
    torch.testing.assert_close(grad, torch.where(mask, -gc / _denominator(aggregation, LENGTHS, None), 0.0))
    assert (grad[1] == 0).all() and (grad[3] == 0).all() and (grad[0] != 0).all()
    assert metrics["frac_correct"] == 0.5
    clean = logp.masked_fill(~mask, 0)
    nll_correct = -(clean[0].sum() / 5 + clean[2].sum() / 4) / 2
    assert metrics["nll_correct"] == pytest.approx(nll_correct.item())
    if aggregation == "sequence":  # wrong outputs stay in the mean over outputs: half of SFT-on-correct
        assert loss.item() == pytest.approx(nll_correct.item() / 2)


def test_rft_and_online_rft_are_one_function():
    assert online_rft_loss is rft_loss
    assert METHODS["rft"].loss is METHODS["online_rft"].loss
    assert METHODS["rft"].data_source != METHODS["online_rft"].data_source


def test_rft_rejects_graded_rewards_and_missing_keys():
    logp, _, mask = _batch([2, 2], 2)
    with pytest.raises(ValueError, match="0/1"):
        rft_loss(logp, mask, {"correct": torch.tensor([0.5, 1.0])})
    with pytest.raises(KeyError, match="correct"):
        get_method("rft")(logp, mask, {})
    loss, _ = rft_loss(logp, mask, {"correct": torch.tensor([1, 0])})  # 0/1 ints are fine
    assert torch.isfinite(loss)


# ---- DPO -------------------------------------------------------------------------------------------
def test_dpo_loss_by_hand():
    # beta = 0.1. Pair 1: (pc - rc) - (pr - rr) = (-3 + 4) - (-5 + 4.5) = 1.5  -> x = 0.15
    #             Pair 2: (-6 + 5) - (-2 + 2.5) = -1.5                     -> x = -0.15
    # -log sigmoid(0.15) = log(1 + e^-0.15) = 0.620957; -log sigmoid(-0.15) = 0.770957; mean 0.695957
    t = lambda *v: torch.tensor(v, dtype=F64)  # noqa: E731
    loss, m = dpo_loss(t(-3.0, -6.0), t(-5.0, -2.0), t(-4.0, -5.0), t(-4.5, -2.5), beta=0.1)
    assert loss.item() == pytest.approx(0.695957047789532, rel=1e-12)
    assert m["rewards_chosen"] == pytest.approx((0.1 - 0.1) / 2)  # beta*(1) and beta*(-1)
    assert m["rewards_rejected"] == pytest.approx((-0.05 + 0.05) / 2)
    assert m["reward_margin"] == pytest.approx(0.0)
    assert m["accuracy"] == 0.5
    loss, m = dpo_loss(t(-3.0), t(-5.0), t(-4.0), t(-4.5), beta=0.1)
    assert loss.item() == pytest.approx(0.620957047789532) and m["accuracy"] == 1.0
    assert m["reward_margin"] == pytest.approx(0.15)
    # No pairs: zero loss, zero metrics, no NaN.
    loss, m = dpo_loss(t(), t(), t(), t())
    assert loss.item() == 0 and all(v == 0 for v in m.values())


@pytest.mark.parametrize("length_normalize", [False, True])
def test_dpo_gradient_is_the_gradient_coefficient(length_normalize):
    # Exact gradient of -J_DPO: d/d logp(o+_t) = -beta * GC / (P * n(o+)), d/d logp(o-_t) = +beta * GC / (P * n(o-)),
    # GC = sigma(beta * Delta(o-) - beta * Delta(o+)), Delta = log-ratio summed (n = 1) or averaged (n = |o|).
    lengths, T, beta = [5, 2, 4, 3, 5], 5, 0.5
    logp, ref_logp, mask = _batch(lengths, T, seed=2)
    pairs = [(0, 1), (3, 2)]  # row 4 is in no pair
    _, grad, metrics = _grad(lambda lp: get_method("dpo")(lp, mask, {"ref_logp": ref_logp, "pairs": pairs},
                                                          beta=beta, length_normalize=length_normalize), logp)
    n = torch.tensor(lengths, dtype=F64) if length_normalize else torch.ones(len(lengths), dtype=F64)
    delta = ((logp - ref_logp).masked_fill(~mask, 0).sum(-1) / n)
    expected = torch.zeros_like(logp)
    for c, r in pairs:
        gc = torch.sigmoid(beta * delta[r] - beta * delta[c])
        expected[c] = -beta * gc / (len(pairs) * n[c])
        expected[r] = beta * gc / (len(pairs) * n[r])
    torch.testing.assert_close(grad, torch.where(mask, expected, 0.0))
    assert (grad[4] == 0).all() and metrics["pairs"] == 2.0


def test_dpo_method_matches_dpo_loss():
    logp, ref_logp, mask = _batch([3, 2], 3, seed=3)
    loss, _ = dpo_method_loss(logp, mask, {"ref_logp": ref_logp, "pairs": torch.tensor([[1, 0]])}, beta=0.2)
    s = lambda x: x.masked_fill(~mask, 0).sum(-1)  # noqa: E731
    ref, _ = dpo_loss(s(logp)[1:], s(logp)[:1], s(ref_logp)[1:], s(ref_logp)[:1], beta=0.2)
    assert loss.item() == pytest.approx(ref.item())


def test_dpo_pairs():
    G = 3
    correct = [True, False, True,  # mixed -> (0 or 2, 1)
               True, True, True,  # all right -> no pair
               False, False, False,  # all wrong -> no pair
               False, True, False]  # mixed -> (10, 9 or 11)
    pairs = dpo_pairs(correct, G, seed=0)
    assert len(pairs) == 2
    (c0, r0), (c1, r1) = pairs
    assert c0 in (0, 2) and r0 == 1 and c1 == 10 and r1 in (9, 11)
    assert dpo_pairs(correct, G, seed=0) == pairs  # deterministic
    assert len({tuple(dpo_pairs(correct, G, seed=s)) for s in range(20)}) > 1  # the seed matters
    assert dpo_pairs([True] * 4 + [False] * 4, 4, seed=1) == []
    assert dpo_pairs([], 4) == []
    with pytest.raises(ValueError, match="groups of 4"):
        dpo_pairs([True] * 5, 4)


# ---- PPO -------------------------------------------------------------------------------------------
def test_ppo_token_rewards_by_hand():
    # beta = 0.1. row 0: -0.1 * (logp - ref) = -0.1 * [0.5, 0, 0.5] = [-0.05, 0, -0.05], + 2.0 at t = 2
    #             row 1: -0.1 * [-0.5, 0] = [0.05, 0], + (-1.0) at t = 1 (its last token); t = 2 is padding
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -math.inf]], dtype=F64)
    ref_logp = torch.tensor([[-1.5, -2.0, -1.0], [-0.5, -1.0, math.nan]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    r = ppo_token_rewards(torch.tensor([2.0, -1.0]), logp, ref_logp, mask, beta=0.1)
    torch.testing.assert_close(r, torch.tensor([[-0.05, 0.0, 1.95], [0.05, -1.0, 0.0]], dtype=F64))
    empty = ppo_token_rewards(torch.tensor([3.0]), logp[:1], ref_logp[:1], torch.zeros(1, 3), beta=0.1)
    assert (empty == 0).all()


# Hand-computed GAE, 5 tokens, gamma = 0.9, lambda = 0.8 (gamma * lambda = 0.72):
#   r = [0.1, -0.2, 0.0, 0.3, 1.0], V = [0.5, 0.4, 0.6, 0.7, 0.8], V after the last token = 0
#   delta_4 = 1.0 + 0.9 * 0   - 0.8 =  0.2
#   delta_3 = 0.3 + 0.9 * 0.8 - 0.7 =  0.32
#   delta_2 = 0.0 + 0.9 * 0.7 - 0.6 =  0.03
#   delta_1 = -0.2 + 0.9 * 0.6 - 0.4 = -0.06
#   delta_0 = 0.1 + 0.9 * 0.4 - 0.5 = -0.04
#   A_4 = 0.2
#   A_3 = 0.32 + 0.72 * 0.2      = 0.464
#   A_2 = 0.03 + 0.72 * 0.464    = 0.36408
#   A_1 = -0.06 + 0.72 * 0.36408 = 0.2021376
#   A_0 = -0.04 + 0.72 * 0.2021376 = 0.105539072
#   returns = A + V = [0.605539072, 0.6021376, 0.96408, 1.164, 1.0]
GAE_R = [0.1, -0.2, 0.0, 0.3, 1.0]
GAE_V = [0.5, 0.4, 0.6, 0.7, 0.8]
GAE_A = [0.105539072, 0.2021376, 0.36408, 0.464, 0.2]
GAE_RET = [0.605539072, 0.6021376, 0.96408, 1.164, 1.0]


def test_gae_by_hand():
    # Row 0: the example. Row 1: the same 5 tokens with 2 padding positions of garbage after them.
    # Row 2: only the first 3 tokens (so V after t = 2 is 0, not 0.7).
    rewards = torch.tensor([GAE_R + [0, 0], GAE_R + [math.nan, 5.0], GAE_R[:3] + [9, 9, 9, 9]], dtype=F64)
    values = torch.tensor([GAE_V + [0, 0], GAE_V + [7.0, math.inf], GAE_V + [3, 3]], dtype=F64)
    mask = _mask([5, 5, 3], 7)
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    expected = torch.tensor(GAE_A + [0, 0], dtype=F64)
    torch.testing.assert_close(adv[0], expected)
    torch.testing.assert_close(adv[1], expected)
    torch.testing.assert_close(ret[0], torch.tensor(GAE_RET + [0, 0], dtype=F64))
    # Row 2: delta_2 = 0 - 0.6 = -0.6; delta_1 = -0.06; delta_0 = -0.04
    #   A_2 = -0.6, A_1 = -0.06 + 0.72 * -0.6 = -0.492, A_0 = -0.04 + 0.72 * -0.492 = -0.39424
    torch.testing.assert_close(adv[2], torch.tensor([-0.39424, -0.492, -0.6, 0, 0, 0, 0], dtype=F64))


def test_gae_skips_holes_and_monte_carlo_limit():
    # A hole in the mask (e.g. a tool-output token) neither carries nor breaks the recursion.
    rewards = torch.tensor([GAE_R[:2] + [123.0] + GAE_R[2:]], dtype=F64)
    values = torch.tensor([GAE_V[:2] + [-7.0] + GAE_V[2:]], dtype=F64)
    mask = torch.tensor([[1, 1, 0, 1, 1, 1]]).bool()
    adv, _ = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv[0, mask[0]], torch.tensor(GAE_A, dtype=F64))
    assert adv[0, 2] == 0
    # gamma = lambda = 1: A_t = (sum of rewards from t on) - V_t, returns = reward-to-go.
    adv, ret = gae_advantages(torch.tensor([GAE_R], dtype=F64), torch.tensor([GAE_V], dtype=F64),
                              torch.ones(1, 5, dtype=torch.bool), gamma=1.0, lam=1.0)
    to_go = torch.tensor([[1.2, 1.1, 1.3, 1.3, 1.0]], dtype=F64)
    torch.testing.assert_close(ret, to_go)
    torch.testing.assert_close(adv, to_go - torch.tensor([GAE_V], dtype=F64))


def test_gae_whiten():
    rewards = torch.tensor([GAE_R, GAE_R[:3] + [0, 0]], dtype=F64)
    values = torch.tensor([GAE_V, GAE_V], dtype=F64)
    mask = _mask([5, 3], 5)
    raw, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    white, ret_w = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8, whiten=True)
    torch.testing.assert_close(ret_w, ret)  # returns come from the raw advantages
    torch.testing.assert_close(white, masked_whiten(raw, mask))
    assert white[mask].mean().abs() < 1e-12 and white[mask].std().item() == pytest.approx(1.0, abs=1e-6)
    assert (white[~mask] == 0).all()


def test_ppo_value_loss_by_hand():
    # clip = 0.2; V = [1.0, 0.0, 2.0], V_old = [0.5, 0.5, 0.5], R = [1.2, -1.0, 0.4]; 4th position padding.
    # V_clip = V_old + clamp(V - V_old, -0.2, 0.2) = [0.7, 0.3, 0.7]
    # (V - R)^2 = [0.04, 1.0, 2.56]; (V_clip - R)^2 = [0.25, 1.69, 0.09]; max = [0.25, 1.69, 2.56]
    # loss = 0.5 * (0.25 + 1.69 + 2.56) / 3 = 0.75; the clip is active (clipped error larger) on 2 of 3.
    values = torch.tensor([[1.0, 0.0, 2.0, math.nan]], dtype=F64, requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5, math.inf]], dtype=F64)
    returns = torch.tensor([[1.2, -1.0, 0.4, math.nan]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, m = ppo_value_loss(values, old, returns, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.75) and m["vf_loss"] == pytest.approx(0.75)
    assert m["vf_clip_frac"] == pytest.approx(2 / 3) and m["vf_mean"] == pytest.approx(1.0)
    (grad,) = torch.autograd.grad(loss, values)
    # Token 0: clipped branch wins and is clamped -> 0. Token 1: clipped branch, clamped -> 0.
    # Token 2: unclipped wins -> 0.5 * 2 * (2.0 - 0.4) / 3 = 0.533333.
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, 1.6 / 3, 0.0]], dtype=F64))


@pytest.mark.parametrize("aggregation", ["sequence", "token"])
def test_ppo_gradient_is_the_advantage(aggregation):
    logp, ref_logp, mask = _batch(LENGTHS, T, seed=4)
    values = torch.randn(len(LENGTHS), T, generator=torch.Generator().manual_seed(5), dtype=F64)
    rewards = ppo_token_rewards(torch.tensor([1.0, 0.0, 1.0, 0.0]), logp, ref_logp, mask, beta=0.05)
    adv, _ = gae_advantages(rewards, values, mask, gamma=0.99, lam=0.95)
    _, grad, metrics = _grad(lambda lp: get_method("ppo")(lp, mask, {"advantages": adv}, aggregation=aggregation),
                             logp)
    torch.testing.assert_close(grad, torch.where(mask, -adv / _denominator(aggregation, LENGTHS, None), 0.0))
    assert metrics["kl"] == 0 and metrics["ratio_mean"] == pytest.approx(1.0)


def test_ppo_with_old_logp_matches_grpo_loss_beta_zero():
    logp, _, mask = _batch(LENGTHS, T, seed=6)
    old = logp + 0.3 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    adv = torch.randn(logp.shape, generator=torch.Generator().manual_seed(8), dtype=F64)
    loss, m = METHODS["ppo"](logp, mask, {"advantages": adv, "old_logp": old}, eps_low=0.1)
    ref, ref_m = grpo_loss(logp, old, None, adv, mask, eps_low=0.1, beta=0.0)
    assert loss.item() == ref.item() and m == ref_m


# ---- registry ------------------------------------------------------------------------------------
def test_registry():
    assert set(METHODS) == {"ppo", "online_rft", "rft", "dpo", "sft"}  # grpo: models.trainer.grpo_update
    for name, method in METHODS.items():
        assert method.name == name and get_method(name) is method
        assert method.data_source and method.reward in {"none", "rule", "model"} and method.gradient_coefficient
    with pytest.raises(ValueError, match=r"'dpo', 'online_rft', 'ppo', 'rft', 'sft'"):
        get_method("reinforce")
