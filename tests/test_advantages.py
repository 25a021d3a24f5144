import gc
import math
import weakref

import pytest
import torch

from models.advantages import (
    delimiter_token_ids,
    outcome_advantages,
    process_advantages,
    step_ends_from_tokens,
)

# Two groups of 3: [1, 0, 0] and [2, 4, 6].
REWARDS = [1.0, 0.0, 0.0, 2.0, 4.0, 6.0]


def test_outcome_two_groups_by_hand():
    # Group 1: mean 1/3, sample std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3) = 0.57735.
    # Group 2: mean 4,   sample std sqrt((4 + 0 + 4) / 2) = 2.
    s1 = math.sqrt(1 / 3) + 1e-4
    expected = [(2 / 3) / s1, (-1 / 3) / s1, (-1 / 3) / s1, -2 / 2.0001, 0.0, 2 / 2.0001]
    # = [1.15450, -0.57725, -0.57725, -0.99995, 0, 0.99995]
    adv = outcome_advantages(torch.tensor(REWARDS, dtype=torch.float64), 3)
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64))
    assert adv[0].item() == pytest.approx(1.154500, abs=1e-6)


def test_outcome_batch_and_none_scales():
    # Batch: mean 13/6, sum r^2 = 57, SS = 57 - 6 (13/6)^2 = 173/6, sample var = 173/30.
    centred = [2 / 3, -1 / 3, -1 / 3, -2.0, 0.0, 2.0]
    std = math.sqrt(173 / 30)  # 2.40139
    batch = outcome_advantages(REWARDS, 3, scale="batch")
    torch.testing.assert_close(batch, torch.tensor([c / (std + 1e-4) for c in centred]))
    torch.testing.assert_close(outcome_advantages(REWARDS, 3, scale="none"), torch.tensor(centred))


def test_outcome_constant_groups_are_exactly_zero():
    # 0.1 * 3 is not exactly representable: x - mean(x, x, x) could be float noise.
    adv = outcome_advantages([0.1, 0.1, 0.1, 1.0, 0.0, 1.0], 3)
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    assert adv[3:].abs().min() > 0.5
    for scale in ("group", "batch", "none"):
        assert outcome_advantages([7.0, 7.0], 1, scale=scale).tolist() == [0.0, 0.0]
        assert outcome_advantages([0.3] * 4, 2, scale=scale).tolist() == [0.0] * 4


def test_outcome_validation():
    with pytest.raises(ValueError, match=r"rewards\[2\]"):
        outcome_advantages([1.0, 0.0, float("nan"), 1.0], 2)
    with pytest.raises(ValueError, match=r"rewards\[1\] is inf"):
        outcome_advantages([1.0, float("inf")], 2)
    with pytest.raises(ValueError, match="groups of 4"):
        outcome_advantages([1.0, 0.0, 1.0], 4)
    with pytest.raises(ValueError, match="scale"):
        outcome_advantages([1.0, 0.0], 2, scale="bogus")


def test_outcome_permuting_groups_permutes_advantages():
    rewards = torch.rand(5 * 4, generator=torch.Generator().manual_seed(0))
    perm = torch.tensor([3, 0, 4, 2, 1])
    permuted = rewards.view(5, 4)[perm].reshape(-1)
    for scale in ("group", "batch", "none"):
        adv = outcome_advantages(rewards, 4, scale=scale)
        torch.testing.assert_close(outcome_advantages(permuted, 4, scale=scale), adv.view(5, 4)[perm].reshape(-1))


def test_outcome_float32_matches_float64():
    rewards = torch.randn(32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    adv64 = outcome_advantages(rewards, 8)
    adv32 = outcome_advantages(rewards.float(), 8)
    assert adv32.dtype == torch.float32 and adv64.dtype == torch.float64
    torch.testing.assert_close(adv32.double(), adv64, rtol=1e-5, atol=1e-6)
    # Integer rewards (verifier 0/1) are promoted to the default float dtype.
    assert outcome_advantages(torch.tensor([1, 0]), 2).dtype == torch.get_default_dtype()


def test_process_ragged_by_hand():
    # Group 1 (outputs 0, 1): R = {1, 0, 1}, mean 2/3, sample std sqrt(1/3); with eps = 0:
    #   r~(1) = (1/3) / sqrt(1/3) = 1/sqrt3 = 0.57735,  r~(0) = -(2/3) / sqrt(1/3) = -2/sqrt3 = -1.15470
    #   output 0, steps end at 1 and 4: tokens 0-1 get r~(1) + r~(0) = -1/sqrt3, tokens 2-4 get -2/sqrt3
    #   output 1, one step ending at 2: tokens 0-2 get 1/sqrt3, tokens 3-4 (after the last step) 0
    # Group 2 (outputs 2, 3): R = {2, 1, 0}, mean 1, std 1 -> r~ = 1, 0, -1
    #   output 2 has no steps -> 0
    #   output 3, steps end at 0, 1, 3: token 0: 1 + 0 - 1 = 0, token 1: 0 - 1, tokens 2-3: -1, token 4: 0
    a = 1 / math.sqrt(3)
    expected = torch.tensor(
        [
            [-a, -a, -2 * a, -2 * a, -2 * a],
            [a, a, a, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, -1.0, -1.0, -1.0, 0.0],
        ],
        dtype=torch.float64,
    )
    rewards = [[1.0, 0.0], [1.0], [], torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)]
    ends = [[1, 4], torch.tensor([2]), [], [0, 1, 3]]
    adv = process_advantages(rewards, ends, group_size=2, length=5, eps=0.0)
    assert adv.shape == (4, 5)
    torch.testing.assert_close(adv, expected)
    # Default eps = 1e-4 adds to each std: e.g. token 1 of output 3 gets -1 / (1 + 1e-4).
    adv = process_advantages(rewards, ends, group_size=2, length=5)
    assert adv[0, 0].item() == pytest.approx(-(1 / 3) / (math.sqrt(1 / 3) + 1e-4), rel=1e-6)
    assert adv[3, 1].item() == pytest.approx(-1 / 1.0001, rel=1e-6)


def test_process_degenerate_groups_are_zero():
    # A single step reward in the group; all equal; no steps at all.
    for rewards, ends in [
        ([[0.7], []], [[3], []]),
        ([[0.5, 0.5], [0.5]], [[0, 2], [1]]),
        ([[], []], [[], []]),
    ]:
        adv = process_advantages(rewards, ends, group_size=2, length=4)
        assert adv.tolist() == [[0.0] * 4] * 2


def test_process_matches_outcome_for_one_final_step():
    # One step ending at the last token: every token gets the (pooled = per-output) normalised reward.
    rewards = [1.0, 0.0, 0.0, 2.0, 4.0, 6.0]
    adv = process_advantages([[r] for r in rewards], [[3]] * 6, group_size=3, length=4)
    torch.testing.assert_close(adv, outcome_advantages(rewards, 3)[:, None].expand(6, 4))


def test_process_validation():
    with pytest.raises(ValueError, match="step_ends"):
        process_advantages([[1.0]], [[0], [1]], 1, 4)
    with pytest.raises(ValueError, match="output 0"):
        process_advantages([[1.0, 0.0]], [[0]], 1, 4)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        process_advantages([[1.0], [0.0]], [[4], [0]], 2, 4)
    with pytest.raises(ValueError, match="outside"):
        process_advantages([[1.0], [0.0]], [[-1], [0]], 2, 4)
    with pytest.raises(ValueError, match=r"step_rewards\[1\]\[0\]"):
        process_advantages([[1.0], [float("nan")]], [[0], [0]], 2, 4)
    with pytest.raises(ValueError, match="groups of 2"):
        process_advantages([[1.0]], [[0]], 2, 4)


def test_step_ends_from_tokens():
    nl = {10, 11}
    assert step_ends_from_tokens([5, 6, 10, 7, 11, 8], nl) == [2, 4, 5]
    assert step_ends_from_tokens(torch.tensor([5, 10, 7, 10]), nl) == [1, 3]  # ends on a delimiter
    assert step_ends_from_tokens([5, 6, 7], nl) == [2]  # no delimiter: one step
    assert step_ends_from_tokens([], nl) == []


class FakeTokenizer:
    def __init__(self, vocab=None):
        self.vocab = vocab or {"a": 0, "\n": 1, "b\n": 2, "\n\n": 3, "c": 4}
        self.decodes = 0

    def get_vocab(self):
        return dict(self.vocab)

    def decode(self, ids):
        self.decodes += 1
        inverse = {i: s for s, i in self.vocab.items()}
        return "".join(inverse[i] for i in ids)


def test_delimiter_token_ids_and_steps():
    ids = delimiter_token_ids(FakeTokenizer())
    assert ids == {1, 2, 3}
    assert step_ends_from_tokens([0, 2, 4, 4, 3, 0], ids) == [1, 4, 5]



def test_delimiter_token_ids_are_cached_per_tokenizer_object_and_do_not_keep_it_alive():
    tok = FakeTokenizer()
    assert delimiter_token_ids(tok) == {1, 2, 3} and tok.decodes == 5  # one decode per vocabulary entry
    assert delimiter_token_ids(tok) == {1, 2, 3} and tok.decodes == 5  # cached
    other = FakeTokenizer({"\n": 0, "x": 1})
    assert delimiter_token_ids(other) == {0}  # another object, its own set
    alive = weakref.ref(tok)
    del tok
    gc.collect()
    assert alive() is None  # the cache holds no strong reference, so no stale entry can outlive its tokenizer


def test_delimiter_token_ids_of_the_tiny_tokenizer_are_the_newline_alone(tiny):
    _, tok = tiny
    assert delimiter_token_ids(tok) == {tok.convert_tokens_to_ids("\n")}


def test_min_credit_gives_each_token_the_worst_step_from_its_own_on():
    """Pooled step rewards [1, 0 | 0.5]: mean 0.5, sample std 0.5, normalised [1, -1 | 0]. Output 0's steps
    end at tokens 1 and 3: the sum form gives 0 to tokens 0-1 (1 - 1), the min form -1."""
    rewards, ends = [[1.0, 0.0], [0.5]], [[1, 3], [2]]
    total = process_advantages(rewards, ends, group_size=2, length=5, eps=0.0)
    worst = process_advantages(rewards, ends, group_size=2, length=5, eps=0.0, credit="min")
    assert total.tolist() == [[0.0, 0.0, -1.0, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]]
    assert worst.tolist() == [[-1.0, -1.0, -1.0, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="credit: unknown 'max'"):
        process_advantages(rewards, ends, group_size=2, length=5, credit="max")
