"""Sampler/trainer mismatch correction (models/grpo.py): truncated importance sampling, by hand."""
import math

import pytest
import torch

from models.grpo import grpo_loss, importance_ratio_metrics, importance_weights, sampler_log_ratio
from models.trainer import UpdateBatch, grpo_update

# Two outputs: row 0 has 2 tokens, row 1 has 3; position (0, 2) is padding and holds garbage.
OLD = torch.tensor([[-1.0, -2.0, 7.0], [-0.5, -0.5, -0.5]])
SAMPLER = torch.tensor([[-1.5, -1.0, float("nan")], [-1.5, -1.5, -1.5]])
MASK = torch.tensor([[True, True, False], [True, True, True]])


def test_log_ratio_by_hand():
    # token: old - sampler on the mask, 0 elsewhere; sequence: the row sums, -0.5 and 3.0
    assert sampler_log_ratio(OLD, SAMPLER, MASK, "token").tolist() == [[0.5, -1.0, 0.0], [1.0, 1.0, 1.0]]
    assert sampler_log_ratio(OLD, SAMPLER, MASK, "sequence").tolist() == [[-0.5], [3.0]]
    with pytest.raises(ValueError, match="level"):
        sampler_log_ratio(OLD, SAMPLER, MASK, "batch")


@pytest.mark.parametrize("correction, expected", [
    # token ratios e^0.5 = 1.6487, e^-1 = 0.3679, e^1 = 2.7183; cap 2
    ("token_truncate", [[math.exp(0.5), math.exp(-1), 1.0], [2.0, 2.0, 2.0]]),
    ("token_mask", [[math.exp(0.5), math.exp(-1), 1.0], [0.0, 0.0, 0.0]]),
    # sequence ratios e^-0.5 = 0.6065 and e^3 = 20.09
    ("sequence_truncate", [[math.exp(-0.5)], [2.0]]),
    ("sequence_mask", [[math.exp(-0.5)], [0.0]]),
])
def test_weights_by_hand(correction, expected):
    level = correction.split("_")[0]
    w = importance_weights(sampler_log_ratio(OLD, SAMPLER, MASK, level), correction, cap=2.0)
    torch.testing.assert_close(w, torch.tensor(expected), rtol=1e-6, atol=0)


def test_a_huge_sequence_ratio_is_capped_not_inf():
    w = importance_weights(torch.tensor([[500.0], [-500.0]]), "sequence_truncate", cap=3.0)
    assert w.tolist() == [[3.0], [0.0]]
    assert importance_weights(torch.tensor([[500.0]]), "sequence_mask", cap=3.0).tolist() == [[0.0]]


def test_ratio_metrics_by_hand():
    m = importance_ratio_metrics(torch.tensor([0.5, -1.0, 1.0, 1.0]), cap=2.0)
    ratios = [math.exp(0.5), math.exp(-1), math.e, math.e]
    assert m == pytest.approx({"is_ratio_mean": sum(ratios) / 4, "is_ratio_min": math.exp(-1),
                               "is_ratio_max": math.e, "is_capped_frac": 0.5})


def test_weights_scale_the_surrogate_and_its_gradient():
    """One output, 2 tokens, A = 2, weights (1.5, 0.5), mu = 1 (ratio 1), no KL, sequence mean:
    loss = -(2 * 1.5 + 2 * 0.5) / 2 = -2; d loss / d logp = -A * w / 2 = (-1.5, -0.5)."""
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = grpo_loss(logp, logp.detach(), None, torch.tensor([2.0]), torch.ones(1, 2, dtype=torch.bool),
                        beta=0.0, is_weights=torch.tensor([[1.5, 0.5]]))
    loss.backward()
    assert loss.item() == pytest.approx(-2.0)
    assert logp.grad.tolist() == [[-1.5, -0.5]]


def _batch(tok, sampler_shift: float | None):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, len(tok), (4,), generator=g).tolist() for _ in range(4)]
    comps = [torch.randint(3, len(tok), (3,), generator=g).tolist() for _ in range(4)]
    sampler = None if sampler_shift is None else torch.full((4, 3), sampler_shift)
    return UpdateBatch(prompts, comps, group_size=2, advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]),
                       sampler_logp=sampler)


def test_masked_outputs_get_no_gradient(tiny):
    """The sampler gave every token log-prob -100: the trainer's is far higher, every ratio is beyond the
    cap, and under *_mask every surrogate is weighted 0: with beta = 0 the update moves nothing."""
    model, tok = tiny
    before = [p.detach().clone() for p in model.parameters()]
    metrics = grpo_update(model, torch.optim.SGD(model.parameters(), lr=1.0), _batch(tok, -100.0),
                          pad_id=tok.pad_token_id, beta=0.0, importance_correction="token_mask")
    assert metrics["is_capped_frac"] == 1.0 and metrics["grad_norm"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_correction_without_sampler_logprobs_is_refused(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="sampler's log-probs"):
        grpo_update(model, torch.optim.SGD(model.parameters(), lr=0.0), _batch(tok, None), pad_id=tok.pad_token_id,
                    beta=0.0, importance_correction="sequence_mask")
