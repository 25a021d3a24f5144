"""Prompt formats: plain for the built-in model, the tokenizer's chat template for chat models."""
import copy

import pytest

from configs.schema import ConfigError, PromptConfig
from problems.prompts import encode_prompts, encode_sft_examples, prompt_format, prompt_texts

# A ChatML template, as SmolLM2-Instruct and Qwen2.5-Instruct ship; BOS written by the template itself.
CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def chat_tok(tiny):
    tok = copy.deepcopy(tiny[1])
    tok.chat_template = CHATML
    return tok


def test_plain_is_the_built_in_format_and_auto_picks_it_without_a_template(tiny):
    _, tok = tiny
    assert prompt_format(tok, PromptConfig()) == "plain"
    texts, ids = encode_prompts(tok, ["Mia has 7 apples."], PromptConfig(format="auto"))
    assert texts == ["Question: Mia has 7 apples.\nAnswer:\n"]
    assert ids == tok(texts)["input_ids"]


def test_chat_renders_system_question_instruction_and_generation_prompt(chat_tok):
    cfg = PromptConfig(format="auto", system="You are good at maths.", instruction="End with: #### <number>")
    assert prompt_format(chat_tok, cfg) == "chat"
    [text] = prompt_texts(chat_tok, ["Mia has 7 apples."], cfg)
    assert text == (f"{chat_tok.bos_token or ''}<|im_start|>system\nYou are good at maths.<|im_end|>\n"
                    "<|im_start|>user\nMia has 7 apples.\n\nEnd with: #### <number><|im_end|>\n<|im_start|>assistant\n")
    [bare] = prompt_texts(chat_tok, ["Q?"], PromptConfig(format="chat"))
    assert bare.endswith("<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n") and "system" not in bare


def test_chat_prompt_ids_carry_the_templates_bos_once(chat_tok):
    [text], [ids] = encode_prompts(chat_tok, ["Q?"], PromptConfig(format="chat"))
    assert ids == chat_tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(chat_tok.bos_token_id) <= 1


def test_chat_without_a_template_names_the_field(tiny):
    with pytest.raises(ConfigError, match="prompt.format: chat"):
        encode_prompts(tiny[1], ["Q?"], PromptConfig(format="chat"))


def test_plain_forced_on_a_chat_tokenizer(chat_tok):
    assert prompt_texts(chat_tok, ["Q?"], PromptConfig(format="plain")) == ["Question: Q?\nAnswer:\n"]


def test_sft_examples_are_prompted_as_rl_samples_and_end_with_eos(chat_tok):
    problems = [{"question": "Q?", "solution": "1+1=2\n#### 2"}]
    cfg = PromptConfig(format="chat")
    [(prompt, target)] = encode_sft_examples(chat_tok, problems, cfg)
    assert prompt == encode_prompts(chat_tok, ["Q?"], cfg)[1][0]
    assert target[-1] == chat_tok.eos_token_id
    assert chat_tok.decode(target[:-1]) == "1+1=2\n#### 2"


def test_only_plain_prompts_stop_at_the_answer_line(tiny, chat_tok):
    from problems.prompts import stop_marker

    assert stop_marker(tiny[1], PromptConfig()) == "####"
    assert stop_marker(chat_tok, PromptConfig()) is None  # auto -> chat: a '####' heading must not end the turn
    assert stop_marker(chat_tok, PromptConfig(format="plain")) == "####"
