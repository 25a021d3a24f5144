"""How a question becomes the tokens the policy continues: one rule for sampling, evaluation, SFT and
reward models, so that what the policy learns on is what it is judged on.

- plain: `Question: <q>\\nAnswer:\\n`, for the built-in model and base models;
- chat: the tokenizer's chat template with the generation prompt: an optional system message, then the
  question as the user's turn with an optional instruction after it (how to write the final answer);
- auto: chat when the tokenizer has a chat template, else plain.

A chat prompt is rendered to text and tokenized without the tokenizer's own special tokens: the
template already writes them (a Llama-3 template's `<|begin_of_text|>`), and adding a BOS again would
give the model a prompt it never saw in training. vLLM's chat path does the same.
"""
from __future__ import annotations

from typing import Any

PLAIN = "plain"
CHAT = "chat"


def prompt_format(tokenizer, prompt_cfg) -> str:
    """"plain" or "chat" for `prompt_cfg` (a `configs.schema.PromptConfig`) with this tokenizer. A chat
    format asked of a tokenizer without a template is an error naming the field."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_cfg.format == "auto":
        return CHAT if has_template else PLAIN
    if prompt_cfg.format == CHAT and not has_template:
        from configs.schema import ConfigError

        raise ConfigError("prompt.format: chat, but the model's tokenizer has no chat template "
                          "(use plain, or a chat model)")
    return prompt_cfg.format


def plain_prompt(question: str) -> str:
    """The plain format: the worked solution follows, one step per line."""
    return f"Question: {question}\nAnswer:\n"


def stop_marker(tokenizer, prompt_cfg) -> str | None:
    """Where sampling may stop before EOS: plain prompts at the end of the `####` answer line (the built-in
    task's and GSM8K's solutions end there, and a base model would go on writing); a chat model ends its
    turn with EOS, and may write `####` as a markdown heading in the middle of its answer."""
    return "####" if prompt_format(tokenizer, prompt_cfg) == PLAIN else None


def _messages(question: str, prompt_cfg) -> list[dict[str, Any]]:
    user = question if not prompt_cfg.instruction else f"{question}\n\n{prompt_cfg.instruction}"
    system = [{"role": "system", "content": prompt_cfg.system}] if prompt_cfg.system else []
    return system + [{"role": "user", "content": user}]


def prompt_texts(tokenizer, questions: list[str], prompt_cfg) -> list[str]:
    """The prompt text of each question (what the rollout table records)."""
    if prompt_format(tokenizer, prompt_cfg) == PLAIN:
        return [plain_prompt(q) for q in questions]
    return [tokenizer.apply_chat_template(_messages(q, prompt_cfg), tokenize=False, add_generation_prompt=True)
            for q in questions]


def encode_prompts(tokenizer, questions: list[str], prompt_cfg) -> tuple[list[str], list[list[int]]]:
    """(texts, token ids) of the prompts of `questions`."""
    texts = prompt_texts(tokenizer, questions, prompt_cfg)
    if not texts:
        return [], []
    chat = prompt_format(tokenizer, prompt_cfg) == CHAT
    return texts, tokenizer(texts, add_special_tokens=not chat)["input_ids"]


def encode_sft_examples(tokenizer, problems: list[dict], prompt_cfg) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, worked-solution ids + EOS) per problem: what SFT imitates, prompted as RL samples."""
    _, prompt_ids = encode_prompts(tokenizer, [p["question"] for p in problems], prompt_cfg)
    if not problems:
        return []
    targets = tokenizer([p["solution"] for p in problems], add_special_tokens=False)["input_ids"]
    return [(p, t + [tokenizer.eos_token_id]) for p, t in zip(prompt_ids, targets)]
