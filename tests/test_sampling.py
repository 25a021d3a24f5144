"""Sampling groups (hf backend, tiny model) into rollout tables."""
import pytest
import torch

from configs.schema import PromptConfig, SamplingConfig
from models.generation import (FINISH_EOS, FINISH_LENGTH, FINISH_STOP, AnswerLineStop, Completion,
                               cut_after_answer_line, generate, sample_completions, sampling_processors)
from models.policy import completion_logprobs
from models.policy import completion_mask
from models.samplers import HFSampler, Sampler, make_sampler
from stages.rollout_store import padded
from stages.sampling import sample_groups

QUESTIONS = [
    {"id": "q0", "question": "Mia has 7 apples. She buys 5 more. How many apples does Mia have now?",
     "solution": "7+5=12\n#### 12", "answer": "12"},
    {"id": "q1", "question": "Sam has 3 coins. He finds 4 more. How many coins does Sam have now?",
     "solution": "3+4=7\n#### 7", "answer": "7"},
    {"id": "q2", "question": "Ann has 9 pens. She loses 2. How many pens does Ann have now?",
     "solution": "9-2=7\n#### 7", "answer": "7"},
]
CFG = SamplingConfig(group_size=4, max_new_tokens=12, temperature=1.0, batch_size=8)


@pytest.fixture(scope="module")
def sampler(tiny):
    model, tok = tiny
    return make_sampler(CFG, "tiny", model=model, tokenizer=tok)


def sample(sampler, seed):
    return sample_groups(sampler, QUESTIONS, PromptConfig(), group_size=CFG.group_size, seed=seed, run_id="run1", policy_version=3)


@pytest.fixture(scope="module")
def step_table(sampler):
    return sample(sampler, 11)


def test_hf_sampler_is_a_sampler(sampler):
    assert isinstance(sampler, Sampler) and sampler.backend == "hf"


def test_g_rows_per_question_with_group_and_sample_indices(step_table):
    t = step_table.to_pylist()
    assert len(t) == len(QUESTIONS) * CFG.group_size
    for r, row in enumerate(t):
        g, s = divmod(r, CFG.group_size)
        assert (row["group_index"], row["sample_index"], row["question_id"]) == (g, s, QUESTIONS[g]["id"])
        assert row["answer"] == QUESTIONS[g]["answer"] and row["run_id"] == "run1" and row["seed"] == 11
        assert row["completion_length"] == len(row["completion_ids"]) == len(row["old_logprobs"])
        assert row["sampler_backend"] == "hf" and row["policy_version"] == 3
        assert row["correct"] is False or row["extracted_answer"] == row["answer"]
    assert len({tuple(r["completion_ids"]) for r in t}) > 1  # sampled, not greedy


def test_same_seed_same_completions(sampler, step_table):
    ids = step_table.column("completion_ids").to_pylist()
    assert sample(sampler, 11).column("completion_ids").to_pylist() == ids
    assert sample(sampler, 12).column("completion_ids").to_pylist() != ids


def test_sampling_leaves_the_global_rng_alone(tiny, sampler):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    sampler.sample([[3, 4, 5]], n=2, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_sampler_logprobs_match_teacher_forced_pass(tiny, step_table):
    model, tok = tiny
    prompt_ids = step_table.column("prompt_ids").to_pylist()
    completion_ids = step_table.column("completion_ids").to_pylist()
    stored = padded(step_table, "old_logprobs")
    fresh, mask, _ = completion_logprobs(model, prompt_ids, completion_ids, pad_id=tok.pad_token_id)
    assert torch.equal(mask, completion_mask(torch.tensor([len(c) for c in completion_ids]), stored.shape[1]))
    assert torch.allclose(stored, fresh, atol=1e-4), (stored - fresh).abs().max()


def test_truncation_flags_on_short_max_new_tokens(tiny):
    model, tok = tiny
    prompts = tok(["Question: Mia has 7 apples.\nAnswer:\n", "Question: Sam\nAnswer:\n"])["input_ids"]
    outs = sample_completions(model, tok, prompts, n=8, max_new_tokens=3, seed=0, return_logprobs=True)
    assert len(outs) == 16
    for c in outs:
        ends_with_eos = bool(c.token_ids) and c.token_ids[-1] == tok.eos_token_id
        assert c.truncated == (c.finish_reason == FINISH_LENGTH) == (not ends_with_eos)
        assert c.truncated == (len(c.token_ids) == 3 and not ends_with_eos)
        assert tok.eos_token_id not in c.token_ids[:-1] and len(c.logprobs) == len(c.token_ids)


def test_eos_ends_a_row_and_is_kept(tiny):
    model, tok = tiny
    eos = tok.eos_token_id
    with torch.no_grad():  # make EOS likely: a large output-embedding row for it (restored below)
        head = model.get_output_embeddings()
        saved = head.weight[eos].clone()
        head.weight[eos] = 50.0 * torch.sign(torch.randn(head.weight.shape[1], generator=torch.Generator().manual_seed(0)))
    try:
        outs = sample_completions(model, tok, tok(["Question: x\nAnswer:\n"])["input_ids"], n=4, max_new_tokens=5,
                                  seed=0, return_logprobs=True)
    finally:
        with torch.no_grad():
            head.weight[eos] = saved
    eos_rows = [c for c in outs if c.finish_reason == FINISH_EOS]
    assert eos_rows, [c.token_ids for c in outs]
    for c in eos_rows:
        assert c.token_ids[-1] == eos and eos not in c.token_ids[:-1] and not c.truncated
        assert len(c.logprobs) == len(c.token_ids)


def test_answer_line_stop(tiny):
    _, tok = tiny
    text = "7+5=12\n#### 12\nQuestion: more"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    cut = cut_after_answer_line(Completion(ids, False, [0.0] * len(ids), FINISH_LENGTH), tok, "####")
    assert tok.decode(cut.token_ids) == "7+5=12\n#### 12\n" and cut.finish_reason == FINISH_STOP
    assert len(cut.logprobs) == len(cut.token_ids) and not cut.truncated
    # the stopping criterion stops the row at the same place during generate
    prompt = [1, 2, 3]
    stop = AnswerLineStop(tok, "####", len(prompt), rows=1)
    done = [bool(stop(torch.tensor([prompt + ids[:k]]), None)[0]) for k in range(1, len(ids) + 1)]
    assert done.index(True) + 1 == len(cut.token_ids) and stop.stop_len[0] == len(cut.token_ids)


def test_greedy_generate_still_works(tiny):
    model, tok = tiny
    prompts = tok(["Question: a\nAnswer:\n", "Question: bb bb\nAnswer:\n"])["input_ids"]
    a = generate(model, tok, prompts, greedy=True, max_new_tokens=4)
    b = generate(model, tok, prompts[::-1], greedy=True, max_new_tokens=4)
    assert [c.token_ids for c in a] == [c.token_ids for c in b[::-1]]
    with pytest.raises(ValueError):
        generate(model, tok, prompts, greedy=True, n=2)


def test_hf_sampler_update_weights(tiny_dir, tiny):
    from models.loading import load_policy

    model, tok = load_policy(str(tiny_dir))
    s = HFSampler(model, tok, max_new_tokens=4)
    other = {k: v + 0.01 for k, v in model.state_dict().items()}
    s.update_weights(other)
    assert torch.allclose(model.model.embed_tokens.weight, other["model.embed_tokens.weight"])
    s.update_weights(str(tiny_dir))
    assert torch.allclose(model.model.embed_tokens.weight, tiny[0].model.embed_tokens.weight)


def test_hf_sampler_decodes_on_sampling_threads_and_gives_the_process_its_threads_back(tiny, monkeypatch):
    import models.samplers

    model, tok = tiny
    seen = []

    def record(*a, **k):
        seen.append(torch.get_num_threads())
        if len(seen) == 2:
            raise RuntimeError("killed mid-decoding")
        return []

    monkeypatch.setattr(models.samplers, "sample_completions", record)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        s = make_sampler(SamplingConfig(threads=1), "tiny", model=model, tokenizer=tok)
        s.sample([[1, 2]], n=2, seed=0)
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="mid-decoding"):
            s.sample([[1, 2]], n=2, seed=0)
        assert seen == [1, 1] and torch.get_num_threads() == 2
        make_sampler(SamplingConfig(), "tiny", model=model, tokenizer=tok).sample([[1, 2]], n=2, seed=0)
        assert seen == [1, 1, 2]  # unset: the process's own count
    finally:
        torch.set_num_threads(before)


def test_vllm_backend_without_vllm_says_how_to_install():
    from models.vllm_sampler import vllm_available

    if vllm_available():
        pytest.skip("vLLM is installed here; tests/test_vllm_backend.py covers the backend")
    with pytest.raises(ImportError, match="make vllm-venv"):
        make_sampler(SamplingConfig(backend="vllm"), "tiny")


def test_shared_prompt_cache_gives_the_logits_of_prefilling_every_copy(tiny):
    """Prefilling each prompt once and repeating its KV cache n times must be exactly what
    generate(num_return_sequences=n) would compute: the same next-token logits for every copy."""
    from models.generation import shared_prompt_cache
    from models.policy import pack

    model, tok = tiny
    prompts = tok([f"Question: {q['question']}\nAnswer:\n" for q in QUESTIONS])["input_ids"]
    n = 3
    pb = pack(prompts, [[] for _ in prompts], tok.pad_token_id)
    with torch.no_grad():
        cache = shared_prompt_cache(model, pb, n)
        ids, attn = pb.input_ids.repeat_interleave(n, 0), pb.attention_mask.repeat_interleave(n, 0)
        pos = pb.position_ids.repeat_interleave(n, 0)
        shared = model(input_ids=ids[:, -1:], attention_mask=attn, position_ids=pos[:, -1:], cache=cache,
                       use_cache=True).logits[:, -1]
        full = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -1]
    assert cache.get_seq_length() == ids.shape[1]  # the prefix plus the last prompt token just fed
    assert shared.shape == (len(prompts) * n, len(tok))
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_sampling_records_float32_logprobs_close_to_the_trainer(tiny_dir):
    """model.autocast=bfloat16 with eager attention: matmuls in bf16, weights and recorded log-probs
    stay float32, and the sampler's log-probs stay within bf16 noise of the float32 teacher-forced pass."""
    from configs.schema import ModelConfig
    from models.loading import load_policy

    mcfg = ModelConfig(autocast="bfloat16", attn_implementation="eager")
    model, tok = load_policy(str(tiny_dir), **mcfg.load_kwargs())
    assert model.config._attn_implementation == "eager"
    prompts = tok([f"Question: {q['question']}\nAnswer:\n" for q in QUESTIONS])["input_ids"]
    with mcfg.compute():
        outs = sample_completions(model, tok, prompts, n=4, max_new_tokens=8, seed=0, return_logprobs=True)
        assert model(input_ids=torch.tensor([prompts[0]])).logits.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    comps = [o.token_ids for o in outs]
    rows = [p for p in prompts for _ in range(4)]
    teacher, mask, _ = completion_logprobs(model, rows, comps, pad_id=tok.pad_token_id)
    sampled = torch.zeros_like(teacher)
    for i, o in enumerate(outs):
        sampled[i, :len(o.logprobs)] = torch.tensor(o.logprobs)
    assert sampled.dtype == torch.float32
    gap = ((sampled - teacher).abs() * mask).sum() / mask.sum()
    assert 0 < gap < 0.05  # bf16 matmuls: a small, nonzero mismatch the update never sees with mu=1


def test_the_draw_follows_the_warped_distribution_and_never_picks_a_zero_probability_token():
    """Temperature 0.5 squares the probabilities (0.1, 0, 0.6, 0.3) -> (1, 0, 36, 9) / 46; top-p 0.9 then
    keeps the two largest (their mass before the cut, 0.978, reaches 0.9): 36/45 and 9/45."""
    torch.manual_seed(0)
    scores = torch.log(torch.tensor([[0.1, 0.0, 0.6, 0.3]])).repeat(50_000, 1)
    for temperature, top_p, expected in [(1.0, 1.0, [0.1, 0.0, 0.6, 0.3]), (0.5, 1.0, [1 / 46, 0, 36 / 46, 9 / 46]),
                                         (0.5, 0.9, [0.0, 0.0, 0.8, 0.2])]:
        out = scores.clone()
        for processor in sampling_processors(temperature, top_p):
            out = processor(None, out)
        assert (out.isfinite().sum(-1) == 1).all()  # one finite score per row: generate's greedy step takes it
        freq = torch.bincount(out.argmax(-1), minlength=4) / len(out)
        assert freq[1] == 0 and freq.tolist() == pytest.approx(expected, abs=0.01)
