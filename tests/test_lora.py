"""LoRA policies: the reference is the base with the adapters off, adapter checkpoints find their base
relative to themselves, and the merged export computes what the adapted policy computes."""
import shutil

import pytest
import torch

from configs.schema import LoraConfig
from models.lora import (AdaptersOff, add_adapters, base_of, is_adapter_checkpoint, load_adapters, merged,
                         trainable_parameters)
from models.loading import load_policy
from models.policy import completion_logprobs
from models.trainer import UpdateBatch, grpo_update
from stages.checkpoints import folder_bytes, save_checkpoint

PROMPTS = [[5, 6, 7, 8], [9, 10]]
COMPLETIONS = [[11, 12, 13], [14, 15, 16, 17]]


def _logp(model):
    return completion_logprobs(model, PROMPTS, COMPLETIONS, pad_id=0)[0]


def _trained_lora(tiny_dir, steps=3):
    base, tok = load_policy(str(tiny_dir))
    policy = add_adapters(base, LoraConfig(enabled=True, r=4, alpha=8), seed=0)
    opt = torch.optim.AdamW(trainable_parameters(policy), lr=1e-2)
    batch = UpdateBatch(PROMPTS, COMPLETIONS, group_size=2, advantages=torch.tensor([1.0, -1.0]))
    for _ in range(steps):
        grpo_update(policy, opt, batch, pad_id=tok.pad_token_id, ref_model=AdaptersOff(policy), beta=0.04)
    return policy, tok, opt


def test_fresh_adapters_leave_the_function_unchanged_and_only_they_train(tiny_dir):
    base, _ = load_policy(str(tiny_dir))
    want = _logp(base)
    policy = add_adapters(base, LoraConfig(enabled=True, r=4, alpha=8), seed=0)
    assert torch.equal(_logp(policy), want)
    trainable = trainable_parameters(policy)
    assert trainable and all("lora_" in n for n, p in policy.named_parameters() if p.requires_grad)
    assert sum(p.numel() for p in trainable) < 0.2 * sum(p.numel() for p in policy.parameters())


def test_reference_is_the_base_with_adapters_off_after_training(tiny_dir):
    base_copy, _ = load_policy(str(tiny_dir))
    policy, _, _ = _trained_lora(tiny_dir)
    assert not torch.allclose(_logp(policy), _logp(base_copy))  # the adapters learned something
    assert torch.equal(_logp(AdaptersOff(policy)), _logp(base_copy))  # and the reference is the base, exactly
    assert sum(1 for _ in AdaptersOff(policy).named_parameters()) == 0  # no weights of its own


def test_adapter_checkpoint_is_small_finds_its_base_relatively_and_round_trips(tiny_dir, tmp_path):
    run = tmp_path / "run"
    base_dir = shutil.copytree(tiny_dir, run / "checkpoints" / "reference" / "iteration=0")
    policy, tok, opt = _trained_lora(base_dir)
    ckpt = save_checkpoint(policy, tok, run / "checkpoints" / "policy" / "step=2", opt, adapter_base=str(base_dir))
    assert is_adapter_checkpoint(ckpt) and not (ckpt / "model.safetensors").exists()
    assert folder_bytes(ckpt) < 0.5 * folder_bytes(base_dir)
    moved = shutil.move(str(run), str(tmp_path / "moved"))  # a run folder moved elsewhere still loads
    ckpt = tmp_path / "moved" / "checkpoints" / "policy" / "step=2"
    assert base_of(ckpt).startswith(str(moved))
    base, _ = load_policy(base_of(ckpt))
    loaded = load_adapters(base, ckpt)
    assert torch.equal(_logp(loaded), _logp(policy))
    assert trainable_parameters(loaded)  # it goes on training


def test_merged_export_computes_what_the_adapted_policy_computes(tiny_dir):
    policy, _, _ = _trained_lora(tiny_dir)
    want = _logp(policy)
    plain = merged(policy)
    assert not hasattr(plain, "peft_config")
    torch.testing.assert_close(_logp(plain), want, atol=1e-5, rtol=0)


def test_merged_state_dict_is_the_merged_models_and_leaves_the_policy_untouched(tiny_dir):
    from models.lora import merged_state_dict

    policy, _, _ = _trained_lora(tiny_dir)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    state = merged_state_dict(policy)
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    plain = merged(policy)
    want = plain.state_dict()
    assert state.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(state[k], want[k], atol=1e-6, rtol=0)


def test_a_reward_model_from_a_lora_policy_starts_from_its_merged_backbone(tiny_dir):
    from models.reward_model import ValueHeadRewardModel

    policy, _, _ = _trained_lora(tiny_dir)
    rm = ValueHeadRewardModel.from_policy(policy, "outcome")
    assert not any("lora_" in n for n, _ in rm.named_parameters())
    assert hasattr(policy, "peft_config") and any("lora_" in n for n, _ in policy.named_parameters())  # untouched
