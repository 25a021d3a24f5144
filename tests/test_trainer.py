"""The GRPO update (micro-batching, mu, reference) and checkpoints (safetensors, optimizer state)."""
import copy
import math

import pyarrow as pa
import pytest
import torch

from models.trainer import NonFiniteUpdateError, UpdateBatch, grpo_update
from stages.checkpoints import load_optimizer, save_checkpoint


def _batch(tok, B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, len(tok), (int(n),), generator=g).tolist() for n in torch.randint(3, 8, (B,), generator=g)]
    comps = [torch.randint(3, len(tok), (int(n),), generator=g).tolist() for n in torch.randint(1, 6, (B,), generator=g)]
    return UpdateBatch(prompts, comps, advantages=torch.randn(B, generator=g))


def test_update_batch_mask_and_rows_by_hand():
    batch = UpdateBatch([[1], [2, 3], [4]], [[5, 6, 7], [], [8]], correct=torch.tensor([True, False, True]),
                        rewards=torch.tensor([1.0, 0.0, 0.5]), group_size=3, advantages=torch.tensor([0.5, -1.0, 0.5]))
    assert batch.width == 3 and len(batch) == 3
    assert batch.completion_mask().tolist() == [[True, True, True], [False, False, False], [True, False, False]]
    sub = batch.rows([2, 0])
    assert sub.prompt_ids == [[4], [1]] and sub.completion_ids == [[8], [5, 6, 7]] and sub.group_size == 1
    assert sub.correct.tolist() == [True, True] and sub.rewards.tolist() == [0.5, 1.0]
    assert sub.advantages.tolist() == [0.5, 0.5] and sub.sampler_logp is None


def test_grpo_update_needs_advantages(tiny):
    model, tok = tiny
    batch = _batch(tok)
    batch.advantages = None
    with pytest.raises(ValueError, match="advantages"):
        grpo_update(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, pad_id=tok.pad_token_id, beta=0.0)


def _assert_update_stops_with_weights_unchanged(m, batch, tok, match):
    """grpo_update on `m` (a copy, changed in place) raises `match` and leaves every weight as it was."""
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    with pytest.raises(NonFiniteUpdateError, match=match) as err:
        grpo_update(m, opt, batch, pad_id=tok.pad_token_id, beta=0.0)
    assert "\n" not in str(err.value)
    for k, v in m.state_dict().items():  # equal_nan: the planted NaN weight stays where it was
        assert torch.allclose(before[k], v, rtol=0, atol=0, equal_nan=True), k
    assert opt.state_dict()["state"] == {}  # AdamW never stepped: no moments either


def test_a_nan_advantage_stops_the_update_before_any_weight_changes(tiny):
    model, tok = tiny
    batch = _batch(tok)
    batch.advantages[2] = float("nan")
    _assert_update_stops_with_weights_unchanged(copy.deepcopy(model), batch, tok,
                                                r"^non-finite loss nan: update stopped before the optimizer step$")


def test_a_nan_weight_stops_the_update_before_any_weight_changes(tiny):
    model, tok = tiny
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.model.norm.weight[0] = float("nan")  # the final norm: every logit turns NaN
    _assert_update_stops_with_weights_unchanged(m, _batch(tok), tok, r"^non-finite loss nan")


def test_a_nan_gradient_with_a_finite_loss_stops_the_update(tiny):
    model, tok = tiny
    m = copy.deepcopy(model)
    m.model.norm.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    _assert_update_stops_with_weights_unchanged(m, _batch(tok), tok, r"^non-finite gradient norm nan: update stopped")


def _grads_after(model, batch, tok, **kw):
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step leaves weights, we read grads
    grpo_update(model, opt, batch, pad_id=tok.pad_token_id, grad_clip=1e9, **kw)
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("aggregation", ["sequence", "token", "dr_grpo"])
def test_micro_batches_accumulate_to_the_full_batch_gradient(tiny, aggregation):
    model, tok = tiny
    batch = _batch(tok)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    full = _grads_after(model, batch, tok, ref_model=ref, aggregation=aggregation, micro_batch_size=6)
    micro = _grads_after(model, batch, tok, ref_model=ref, aggregation=aggregation, micro_batch_size=4)
    assert torch.allclose(full, micro, atol=1e-6, rtol=1e-4)


def test_beta_zero_needs_no_reference_and_beta_positive_does(tiny):
    model, tok = tiny
    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    metrics = grpo_update(m, opt, _batch(tok), pad_id=tok.pad_token_id, beta=0.0)
    assert metrics["kl"] == 0.0 and metrics["ratio_mean"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="reference model"):
        grpo_update(m, opt, _batch(tok), pad_id=tok.pad_token_id, beta=0.04)


def test_mu_greater_than_one_moves_the_ratio_off_one(tiny):
    model, tok = tiny
    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    metrics = grpo_update(m, opt, _batch(tok), pad_id=tok.pad_token_id, beta=0.0, mu=3)
    # mu=1 has ratio exactly 1; later inner updates see pi_theta != pi_old
    assert metrics["ratio_mean"] != pytest.approx(1.0, abs=1e-7)
    assert metrics["update_tokens_per_s"] > 0


def test_update_changes_weights_and_checkpoint_round_trips_with_optimizer(tiny, tmp_path):
    from models.loading import load_policy

    model, tok = tiny
    m = copy.deepcopy(model)
    before = [p.detach().clone() for p in m.parameters()]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    grpo_update(m, opt, _batch(tok), pad_id=tok.pad_token_id, beta=0.0)
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
    out = save_checkpoint(m, tok, tmp_path / "ckpt", opt)
    assert (out / "model.safetensors").exists() and (out / "optimizer.safetensors").exists()
    m2, _ = load_policy(str(out))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    load_optimizer(opt2, out)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) and float(s1[k]["step"]) == float(s2[k]["step"])


def test_an_update_increases_the_advantage_weighted_likelihood(tiny):
    """A small step ascends J = mean_i A_i * mean_t log pi(o_i,t): the sign of the update is right."""
    from models.policy import completion_logprobs

    model, tok = tiny
    m = copy.deepcopy(model)
    batch = _batch(tok, B=8, seed=3)
    batch.advantages = torch.tensor([1.0, -1.0] * 4)

    def objective():
        logp, mask, _ = completion_logprobs(m, batch.prompt_ids, batch.completion_ids, pad_id=tok.pad_token_id)
        return float((batch.advantages * (logp * mask).sum(1) / mask.sum(1)).mean())

    before = objective()
    grpo_update(m, torch.optim.SGD(m.parameters(), lr=1e-2), batch, pad_id=tok.pad_token_id, beta=0.0, grad_clip=1e9)
    assert objective() > before


def test_autocast_context_sees_every_optimizer_step(tiny_dir):
    """model.autocast wraps whole loops (SFT, mu > 1 updates): each forward inside one open context
    must use the weights as they are now, not a low-precision copy cached at the first forward."""
    from configs.schema import ModelConfig
    from models.loading import load_policy

    mcfg = ModelConfig(autocast="bfloat16", attn_implementation="eager")
    model, tok = load_policy(str(tiny_dir), **mcfg.load_kwargs())
    ids = torch.tensor([tok("Question: 3+4\nAnswer:\n")["input_ids"]])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with mcfg.compute():
        before = model(input_ids=ids).logits.float()
        before.logsumexp(-1).sum().backward()
        opt.step()
        after = model(input_ids=ids).logits.float()
    with torch.no_grad():
        fresh = model(input_ids=ids).logits  # float32, outside autocast, with the stepped weights
    assert before.dtype == torch.float32 and not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh, atol=0.1, rtol=0.05)  # bf16 rounding only


def test_a_batch_with_all_advantages_zero_takes_no_optimizer_step(tiny):
    model, tok = tiny
    m = copy.deepcopy(model)
    batch = _batch(tok)
    batch.advantages = torch.zeros(len(batch))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)  # decay alone would move every weight
    before = {k: v.clone() for k, v in m.state_dict().items()}
    metrics = grpo_update(m, opt, batch, pad_id=tok.pad_token_id, ref_model=model, beta=0.04)
    assert metrics["flat_batch_skipped"] == 1.0 and not opt.state
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    batch.advantages[2] = 0.5
    assert grpo_update(m, opt, batch, pad_id=tok.pad_token_id, ref_model=model, beta=0.04)["flat_batch_skipped"] == 0.0


def test_informative_rows_are_those_of_the_groups_with_a_nonzero_advantage():
    batch = UpdateBatch([[1]] * 2 + [[2]] * 2 + [[3]] * 2, [[4], [5], [6], [7], [8], [9]], group_size=2,
                        advantages=torch.tensor([0.0, 0.0, 0.7, -0.7, 0.0, 0.0]))
    assert batch.informative_rows() == [2, 3]
    process = UpdateBatch([[1]] * 2 + [[2]] * 2, [[4, 4], [5], [6], [7]], group_size=2,
                          advantages=torch.tensor([[0.0, 0.3], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    assert process.informative_rows() == [0, 1]  # one token's advantage keeps the group


def test_update_batch_drops_flat_groups_then_truncated_rows():
    from stages.advantages import update_batch

    table = pa.table({
        "prompt_ids": [[1], [1], [2], [2], [3], [3]], "completion_ids": [[4], [5], [6], [7], [8], [9]],
        "advantages": pa.array([[0.0], [0.0], [0.7], [-0.7], [1.0], [-1.0]], type=pa.list_(pa.float32())),
        "old_logprobs": pa.array([[-1.0]] * 6, type=pa.list_(pa.float32())),
        "truncated": [False, True, True, False, False, False],
    })
    assert update_batch(table, 2).completion_ids == [[4], [5], [6], [7], [8], [9]]
    assert update_batch(table, 2, drop_flat_groups=True).completion_ids == [[6], [7], [8], [9]]
    both = update_batch(table, 2, drop_flat_groups=True, mask_truncated=True)
    assert both.completion_ids == [[7], [8], [9]] and both.advantages.flatten().tolist() == pytest.approx([-0.7, 1, -1])
    assert update_batch(table, 2, mask_truncated=True).completion_ids == [[4], [7], [8], [9]]


def test_dropping_the_longest_rows_narrows_the_batch_to_the_rest(tiny):
    """The flat group holds the longest completion: the kept rows' [B, T] tensors take their own width."""
    from stages.advantages import update_batch

    model, tok = tiny
    table = pa.table({
        "prompt_ids": [[5, 6]] * 2 + [[7, 8]] * 2, "completion_ids": [[9, 10, 11, 12], [9], [10, 11], [12]],
        "advantages": pa.array([[0.0] * 4, [0.0], [0.5] * 2, [-0.5]], type=pa.list_(pa.float32())),
        "old_logprobs": pa.array([[-1.0] * 4, [-1.0], [-1.0] * 2, [-1.0]], type=pa.list_(pa.float32())),
        "truncated": [False] * 4,
    })
    batch = update_batch(table, 2, drop_flat_groups=True)
    assert batch.width == 2 and batch.advantages.shape == (2, 2) and batch.sampler_logp.shape == (2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    metrics = grpo_update(model, opt, batch, pad_id=tok.pad_token_id, beta=0.0)
    assert metrics["flat_batch_skipped"] == 0.0 and math.isfinite(metrics["loss"])


def test_truncated_completions_get_zero_gradient(tiny):
    """Under mask_truncated the cut row's tokens and advantage do not matter: two batches that differ only
    in it (other tokens, an advantage of another sign) move the weights identically."""
    from stages.advantages import update_batch

    model, tok = tiny

    def table(cut_tokens, cut_advantage):
        return pa.table({
            "prompt_ids": [[5, 6]] * 2 + [[7, 8]] * 2,
            "completion_ids": [[9, 10], cut_tokens, [10, 11], [12]],
            "advantages": pa.array([[0.5] * 2, [cut_advantage] * len(cut_tokens), [0.5] * 2, [-0.5]],
                                   type=pa.list_(pa.float32())),
            "old_logprobs": pa.array([[-1.0] * 2, [-1.0] * len(cut_tokens), [-1.0] * 2, [-1.0]],
                                     type=pa.list_(pa.float32())),
            "truncated": [False, True, False, False],
        })

    after = []
    for cut_tokens, cut_advantage in (([11, 12, 13], -0.5), ([3, 4, 5, 6, 7], 4.0)):
        m = copy.deepcopy(model)
        batch = update_batch(table(cut_tokens, cut_advantage), 2, mask_truncated=True)
        assert len(batch) == 3
        grpo_update(m, torch.optim.SGD(m.parameters(), lr=1.0), batch, pad_id=tok.pad_token_id, beta=0.0)
        after.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*after))
    assert not all(torch.equal(a, b) for a, b in zip(after[0], model.parameters()))  # the update did move them
