"""A real pretrained chat model (SmolLM2-135M-Instruct, `make smollm2-model`) through the same code paths
as the built-in one: chat prompts, the update's KL at an iteration's first step in each precision, LoRA's
reference, and two GRPO steps of the flow with full fine-tuning and with LoRA.

Tiny shapes (2 questions x G=2, 32 new tokens) keep it to about a minute on two cores.
"""
import copy
from pathlib import Path

import pytest
import torch

from configs import load_config
from configs.schema import LoraConfig, PromptConfig
from models.loading import load_policy, matmul_autocast
from models.lora import AdaptersOff, add_adapters, trainable_parameters
from models.policy import completion_logprobs
from models.trainer import UpdateBatch, grpo_update
from problems.prompts import encode_prompts

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT / "artifacts/models/smollm2-135m-instruct"
pytestmark = pytest.mark.skipif(not (SMOLLM2 / "config.json").exists(),
                                reason="SmolLM2 not converted: run `make smollm2-model` (make test does)")
QUESTIONS = ["Mia has 7 apples. She buys 5 more. How many apples does Mia have now?",
             "Tom has 12 coins. He loses 4. How many coins does Tom have now?"]


@pytest.fixture(scope="module")
def smollm2():
    model, tok = load_policy(str(SMOLLM2))
    return model.eval(), tok


@pytest.fixture(scope="module")
def batch(smollm2):
    """A group of a greedy and a sampled answer to one question, with advantages that are not all 0."""
    model, tok = smollm2
    _, prompts = encode_prompts(tok, QUESTIONS[:1], PromptConfig(format="chat"))
    torch.manual_seed(0)
    comps = []
    for p in prompts:
        for do_sample in (False, True):
            out = model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=do_sample, top_k=0,
                                 pad_token_id=tok.pad_token_id)
            comps.append(out[0, len(p):].tolist())
    return UpdateBatch([p for p in prompts for _ in range(2)], comps, group_size=2,
                       advantages=torch.tensor([1.0, -1.0]))


@pytest.mark.parametrize("precision", ["none", "bfloat16"])
def test_kl_is_zero_at_an_iterations_first_step_in_every_precision(smollm2, batch, precision):
    """policy == reference at an iteration's first step: both log-probs come from one compute path,
    so the k3 KL is 0, under bf16 autocast too (a different path, e.g. other micro-batches, would not be)."""
    model, tok = smollm2
    policy = copy.deepcopy(model)
    reference = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    with matmul_autocast("cpu", precision):
        metrics = grpo_update(policy, opt, batch, pad_id=tok.pad_token_id, ref_model=reference, beta=0.04,
                              micro_batch_size=2)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-4)
    assert metrics["flat_batch_skipped"] == 0.0 and metrics["grad_norm"] > 0


def test_lora_reference_is_the_base_model_and_only_adapters_move(smollm2, batch):
    model, tok = smollm2
    policy = add_adapters(copy.deepcopy(model), LoraConfig(enabled=True, r=8, alpha=16), seed=0)
    opt = torch.optim.AdamW(trainable_parameters(policy), lr=1e-3)
    for _ in range(2):
        metrics = grpo_update(policy, opt, batch, pad_id=tok.pad_token_id, ref_model=AdaptersOff(policy), beta=0.04,
                              micro_batch_size=2)
    args = dict(pad_id=tok.pad_token_id, width=batch.width)
    with torch.no_grad():
        base_logp = completion_logprobs(model, batch.prompt_ids, batch.completion_ids, **args)[0]
        ref_logp = completion_logprobs(AdaptersOff(policy), batch.prompt_ids, batch.completion_ids, **args)[0]
        policy_logp = completion_logprobs(policy, batch.prompt_ids, batch.completion_ids, **args)[0]
    assert torch.equal(ref_logp, base_logp)
    assert not torch.allclose(policy_logp, base_logp) and metrics["kl"] > 0


# ---- the flow ------------------------------------------------------------------------------------

def _run(root, run_id, *extra):
    from flows.iterative_grpo import iterative_grpo

    cfg = load_config(ROOT / "configs/smollm2-cpu.yaml", [
        f"storage.artifacts_root={root}", f"model.policy={SMOLLM2}", f"run_id={run_id}", "threads=1",
        "data.train_size=50", "data.test_size=2", "loop.iterations=1", "loop.steps_per_iteration=2",
        "loop.questions_per_step=2", "loop.eval_every=10", "loop.eval_samples=0", "sampling.group_size=2",
        "sampling.max_new_tokens=32", "loop.eval_max_new_tokens=32", "control.sft_same_time=false",
        "loop.checkpoint_every=2", *extra])
    return cfg, iterative_grpo(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_grpo_steps_of_the_flow_on_smollm2(prefect_api, tmp_path, lora):
    """Full fine-tuning with the reference scored while sampling (grpo.reference_while_sampling), LoRA with
    the update's own reference forward (the adapters off)."""
    from stages.rollout_store import open_rollouts
    from stages.run_layout import RunLayout
    from stages.run_state import read_state, step_metrics

    cfg, summary = _run(tmp_path, "smol", f"model.lora.enabled={str(lora).lower()}",
                        *([] if lora else ["grpo.reference_while_sampling=true", "model.autocast=none"]))
    layout = RunLayout.of(tmp_path, "smol")
    table = open_rollouts(layout.rollouts_dir).to_table()
    assert table.num_rows == 2 * 2 * 2
    scored = [len(r) for r in table.column("ref_logprobs").to_pylist()]
    assert scored == (table.column("completion_length").to_pylist() if not lora else [0] * 8)
    prompt = table.column("prompt")[0].as_py()
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    assert cfg.prompt.instruction in prompt
    metrics = step_metrics(layout, read_state(layout))
    assert sorted(metrics) == [0, 1]
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the iteration's first step: policy == reference
    assert "start policy" in summary["report"]
    sizes = [m["checkpoint_mb"] for m in metrics.values() if "checkpoint_mb" in m]
    assert len(sizes) == 1  # loop.checkpoint_every=2: the iteration's end only
    full_mb = sum(f.stat().st_size for f in SMOLLM2.glob("*.safetensors")) / 2**20
    export = layout.policy_iteration(0)
    assert (export / "model.safetensors").exists() and not (export / "adapter_config.json").exists()
    if lora:  # adapters + their optimizer state only; the iteration's export is the merged model
        assert all(s < 0.15 * full_mb for s in sizes), sizes  # r=16 on every linear layer: 3.6% of the weights
    else:  # weights + AdamW's two moments
        assert all(2.5 * full_mb < s < 3.5 * full_mb for s in sizes), sizes
