"""The built-in offline demo model: a ~1M-parameter Llama and a word+digit tokenizer.

Nothing is downloaded. The tokenizer is a real `PreTrainedTokenizerFast`: whole known words (and
a space before them) are single tokens, while every digit, operator, newline and any other
character is its own token, so arithmetic stays digit by digit, sequences are about half as long
as with characters, and any ASCII text round-trips exactly.
"""
from __future__ import annotations

import re
import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, LlamaConfig, LlamaForCausalLM

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
_CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # includes " " and "\n"


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Word+digit tokenizer over `words` (the task's vocabulary) plus single-character fallback."""
    words = sorted(set(words), key=lambda w: (-len(w), w))  # longest first: regex alternation is ordered
    vocab_tokens = SPECIAL_TOKENS + _CHARS + [" " + c for c in string.digits] + words + [" " + w for w in words]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_tokens))}
    alternation = "|".join(re.escape(w) for w in words)
    # A known word (optionally after one space) that is not the prefix of a longer word, else a
    # digit (optionally after a space), else any single character.
    pattern = rf" ?(?:{alternation})(?![A-Za-z])| ?[0-9]|\n|."
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(tokenizer, *, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
                     max_position_embeddings=256, seed=0) -> LlamaForCausalLM:
    """A randomly initialised Llama, the same for the same seed and sizes."""
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)


def save_tiny(out_dir: str | Path, words: list[str], seed: int = 0, **sizes) -> Path:
    """Build the tokenizer and model and save both (safetensors) to `out_dir`."""
    out = Path(out_dir)
    tokenizer = build_tokenizer(words)
    model = build_tiny_model(tokenizer, seed=seed, **sizes)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
