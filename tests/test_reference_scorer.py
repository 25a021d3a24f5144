"""The reference's log-probs computed while sampling (models/reference_scorer.py) against the update's
teacher-forced pass over the same completions."""
import copy

import pyarrow as pa
import pytest
import torch

from models.generation import REFERENCE_CHUNK, sample_completions
from models.policy import completion_logprobs

PROMPTS = [[3, 7, 9, 4, 12], [5, 6, 2], [8, 8, 13, 1, 4, 9, 10]]  # different lengths: left padding
N, NEW = 4, 2 * REFERENCE_CHUNK + 5  # two whole chunks and a tail fed after decoding


@pytest.fixture(scope="module")
def reference(tiny):
    """A reference that is not the policy (a fine-tuned copy), so that its log-probs differ."""
    ref = copy.deepcopy(tiny[0])
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return ref.eval()


def test_log_probs_scored_while_sampling_are_the_teacher_forced_ones(tiny, reference):
    model, tok = tiny
    outs = sample_completions(model, tok, PROMPTS, n=N, max_new_tokens=NEW, seed=3, return_logprobs=True,
                              reference=reference)
    prompts = [p for p in PROMPTS for _ in range(N)]
    completions = [c.token_ids for c in outs]
    assert max(map(len, completions)) > 2 * REFERENCE_CHUNK and min(map(len, completions)) < NEW  # chunks, EOS
    want, mask, _ = completion_logprobs(reference, prompts, completions, pad_id=tok.pad_token_id)
    got = torch.zeros_like(want)
    for i, c in enumerate(outs):
        assert len(c.ref_logprobs) == len(c.token_ids)
        got[i, :len(c.ref_logprobs)] = torch.tensor(c.ref_logprobs)
    assert (got - want)[mask].abs().max() < 1e-5
    policy, _, _ = completion_logprobs(model, prompts, completions, pad_id=tok.pad_token_id)
    assert (policy - want)[mask].abs().max() > 0.05  # the reference's own numbers, not the sampler's


def test_scoring_while_sampling_changes_nothing_that_is_sampled(tiny, reference):
    model, tok = tiny
    kwargs = dict(n=N, max_new_tokens=NEW, seed=5, return_logprobs=True)
    threads = torch.get_num_threads()
    plain = sample_completions(model, tok, PROMPTS, **kwargs)
    scored = sample_completions(model, tok, PROMPTS, reference=reference, reference_threads=1, **kwargs)
    assert torch.get_num_threads() == threads  # the scorer's thread count is its own
    assert [c.token_ids for c in plain] == [c.token_ids for c in scored]
    assert [c.logprobs for c in plain] == [c.logprobs for c in scored]
    assert all(c.ref_logprobs is None for c in plain)


def test_a_failing_reference_fails_the_sampling_and_its_thread_ends(tiny):
    import threading

    model, tok = tiny

    class Broken(torch.nn.Module):
        def forward(self, **kwargs):
            raise ValueError("reference out of memory")

    with pytest.raises(RuntimeError, match="reference scorer failed: reference out of memory"):
        sample_completions(model, tok, PROMPTS, n=N, max_new_tokens=NEW, seed=1, reference=Broken())
    assert not any(t.name == "reference-scorer" for t in threading.enumerate())


def test_a_sampler_error_ends_the_scorers_thread_and_is_the_one_raised(tiny, reference, monkeypatch):
    import threading

    model, tok = tiny

    def broken_generate(**kwargs):
        raise ValueError("sampler out of memory")

    monkeypatch.setattr(model, "generate", broken_generate)
    with pytest.raises(ValueError, match="sampler out of memory"):
        sample_completions(model, tok, PROMPTS, n=N, max_new_tokens=NEW, seed=1, reference=reference)
    assert not any(t.name == "reference-scorer" for t in threading.enumerate())


def test_the_update_takes_the_rollouts_reference_log_probs_for_its_own_forward(tiny, reference):
    from configs.schema import PromptConfig, SamplingConfig
    from models.samplers import make_sampler
    from models.trainer import grpo_update
    from stages.advantages import compute_advantages, update_batch
    from stages.rollout_store import with_columns
    from stages.sampling import sample_groups

    model, tok = tiny
    questions = [{"id": f"q{i}", "question": q, "solution": "", "answer": "7"}
                 for i, q in enumerate(["Sam has 3 coins. He finds 4 more.", "Ann has 9 pens. She loses 2."])]
    sampler = make_sampler(SamplingConfig(group_size=N, max_new_tokens=NEW), "tiny", model=model, tokenizer=tok)
    table = sample_groups(sampler, questions, PromptConfig(), group_size=N, seed=2, run_id="r", policy_version=0,
                          reference=reference)
    table = with_columns(table, {"reward": pa.array([float(i % 3) for i in range(table.num_rows)], pa.float32())})
    table = compute_advantages(table, supervision="outcome", group_size=N)
    runs = {}
    for name, ref_model, rows in (("scored while sampling", None, table),
                                  ("reference forward", reference, table.drop_columns(["ref_logprobs"]))):
        batch = update_batch(rows, N)
        assert (batch.ref_logp is not None) == (ref_model is None)
        policy = copy.deepcopy(model)
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
        runs[name] = grpo_update(policy, opt, batch, pad_id=tok.pad_token_id, ref_model=ref_model, beta=0.04,
                                 micro_batch_size=8)
    a, b = runs.values()
    assert a["kl"] > 1e-3 and a["kl"] == pytest.approx(b["kl"], rel=1e-5)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
