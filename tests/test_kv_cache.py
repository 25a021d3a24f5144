"""models/kv_cache.py: a KV cache allocated once gives the tokens and log-probs of transformers' own."""
import pytest
import torch

import models.generation as generation
from models.kv_cache import PreallocatedLayer, preallocated_cache
from tests.test_sampling import QUESTIONS


def _sample(model, tok, prompts, monkeypatch, prealloc: bool, **kw):
    if not prealloc:
        monkeypatch.setattr(generation, "preallocated_cache", lambda *a, **k: None)  # transformers' DynamicCache
    out = generation.sample_completions(model, tok, prompts, return_logprobs=True, **kw)
    monkeypatch.undo()
    return out


@pytest.mark.parametrize("kw", [dict(n=4, seed=3, max_new_tokens=24),   # shared prompt prefill, repeated per sample
                                dict(n=1, greedy=True, max_new_tokens=24)])  # one row per prompt, no sharing
def test_sampling_is_identical_with_the_preallocated_cache(tiny, monkeypatch, kw):
    model, tok = tiny
    prompts = tok([f"Question: {q['question']}\nAnswer:\n" for q in QUESTIONS])["input_ids"]
    ours = _sample(model, tok, prompts, monkeypatch, True, **kw)
    theirs = _sample(model, tok, prompts, monkeypatch, False, **kw)
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    assert [c.logprobs for c in ours] == [c.logprobs for c in theirs]
    assert max(len(c.token_ids) for c in ours) > 1


def test_a_layer_writes_in_place_and_grows_past_its_capacity():
    layer = PreallocatedLayer(capacity=4)
    k, v = torch.randn(2, 1, 3, 5), torch.randn(2, 1, 3, 5)
    keys, _ = layer.update(k, v)
    buffer = layer.key_buffer
    assert keys.shape == (2, 1, 3, 5) and layer.get_seq_length() == 3
    k2 = torch.randn(2, 1, 1, 5)
    keys, values = layer.update(k2, k2)
    assert layer.key_buffer is buffer  # written in place: no copy of the cache
    torch.testing.assert_close(keys, torch.cat([k, k2], dim=-2), rtol=0, atol=0)
    keys, _ = layer.update(k2, k2)  # one past the capacity: the buffer grows, the contents stay
    assert layer.get_seq_length() == 5 and layer.key_buffer is not buffer
    torch.testing.assert_close(keys[:, :, :4], torch.cat([k, k2], dim=-2), rtol=0, atol=0)
    layer.batch_repeat_interleave(2)
    assert layer.keys.shape == (4, 1, 5, 5)
    torch.testing.assert_close(layer.keys[1], layer.keys[0], rtol=0, atol=0)


def test_models_with_sliding_windows_keep_transformers_cache(tiny):
    model, _ = tiny
    config = model.config.__class__(**{**model.config.to_dict(), "layer_types": ["sliding_attention"] * 4})
    assert preallocated_cache(config, 8) is None
    assert preallocated_cache(model.config, 8) is not None
