"""Load a causal LM and its tokenizer by hub id or local path: the one path for every model.

The built-in tiny model is saved with `save_pretrained`, so it loads through here exactly like
a hub model (`Qwen/Qwen2.5-0.5B`) or a user's local checkpoint.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

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
                   trust_remote_code: bool = False, attn_implementation: str | None = None) -> PreTrainedModel:
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=None, **extra
    )
    return model.to(device)


def load_policy(name_or_path: str, *, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
                attn_implementation: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    model = load_causal_lm(name_or_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                           attn_implementation=attn_implementation)
    return model, tokenizer


def matmul_autocast(device: str, dtype: str) -> AbstractContextManager:
    """torch.autocast for `dtype` ("none": no autocast) on `device`'s type.

    On a CPU with bfloat16 matmul units (avx512_bf16, AMX) this halves the time of the linear layers;
    PyTorch's CPU flash-attention kernel is slower in bfloat16 than in float32, so pair it with
    `attn_implementation: eager` there (BENCHMARKS.md, the GRPO step race).
    """
    if dtype == "none":
        return nullcontext()
    # No weight cache: autocast keeps the low-precision copy of each weight for as long as the context
    # is open, so a context around a training loop (SFT) or mu > 1 inner updates would keep computing
    # with the weights of its first forward pass and never see the optimizer's steps.
    return torch.autocast(torch.device(device).type, dtype=DTYPES[dtype], cache_enabled=False)
