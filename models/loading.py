"""Load a causal LM and its tokenizer by hub id or local path: the one path for every model.

The built-in tiny model is saved with `save_pretrained`, so it loads through here exactly like
a hub model (`Qwen/Qwen2.5-0.5B`) or a user's local checkpoint.
"""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Left padding (generation appends on the right); a pad token is always set."""
    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name_or_path: str, *, dtype: str = "float32", device: str = "cpu",
                   trust_remote_code: bool = False) -> PreTrainedModel:
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=None
    )
    return model.to(device)


def load_policy(name_or_path: str, *, dtype: str = "float32", device: str = "cpu",
                trust_remote_code: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    model = load_causal_lm(name_or_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return model, tokenizer
