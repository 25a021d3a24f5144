"""The converted SmolLM2-135M-Instruct folder (`make smollm2-model`) is the GGUF model, with a working chat
template and generation that stops at the end of the assistant's turn."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from scripts.convert_smollm2 import DEFAULT_OUT, END_OF_TURN, ConversionError, gguf_path, is_complete, load_gguf_model

MODEL_DIR = Path(__file__).resolve().parents[1] / DEFAULT_OUT
pytestmark = pytest.mark.usefixtures("one_thread")

if not is_complete(MODEL_DIR):
    pytest.skip(f"{DEFAULT_OUT} is missing: `make smollm2-model` converts it", allow_module_level=True)


@pytest.fixture(scope="module")
def converted():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval(), AutoTokenizer.from_pretrained(MODEL_DIR)


def _chat(tokenizer, question: str) -> torch.Tensor:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, return_tensors="pt").input_ids


def test_logits_equal_the_gguf_models(converted):
    if importlib.util.find_spec("gguf") is None:
        pytest.skip('gguf is not installed: pip install -e ".[convert]"')
    try:
        path = gguf_path()
    except ConversionError as err:
        pytest.skip(str(err))
    model, tokenizer = converted
    ids = _chat(tokenizer, "Tom has 3 apples and buys 5 more. How many apples does he have now?")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, load_gguf_model(path)(ids).logits)


def test_chat_template_renders_a_user_turn_and_the_generation_prompt(converted):
    _, tokenizer = converted
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_greedy_generation_stops_at_the_end_of_turn(converted):
    model, tokenizer = converted
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert model.generation_config.eos_token_id == end == tokenizer.eos_token_id
    ids = _chat(tokenizer, "What is 12 + 7?")
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=64)
    new = out[0, ids.shape[1]:].tolist()
    assert new[-1] == end and end not in new[:-1], tokenizer.decode(new)
