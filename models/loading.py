"""Load a causal LM and its tokenizer by hub id or local path: the one path for every model.

The built-in tiny model is saved with `save_pretrained`, so it loads through here exactly like
a hub model (`Qwen/Qwen2.5-0.5B`) or a user's local checkpoint. `check_model_source` tells, before
anything loads, whether a local folder holds what loading it needs.
"""
from __future__ import annotations

import os
import re
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import huggingface_hub
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from configs.schema import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BUILT_IN = "tiny"
# `org/name` or `name`: loaded by id from the hub or the user's hub cache, so not checked on disk.
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")


class ModelSourceError(UserError):
    """`model.policy` names a local folder that is missing or lacks a file loading needs."""


def _is_local_path(name_or_path: str) -> bool:
    """A path the user means on disk: absolute, `.`/`~`-relative, or with a separator in a shape a hub
    id cannot have (`runs/a/policy`). A bare `org/name` is a hub id even when no such folder exists."""
    return (os.path.isabs(name_or_path) or name_or_path.startswith((".", "~"))
            or (any(sep in name_or_path for sep in (os.sep, os.altsep) if sep)
                and not _HUB_ID.fullmatch(name_or_path)))


def check_model_source(name_or_path: str, field: str = "model.policy") -> None:
    """Raise `ModelSourceError` when `name_or_path` is a local folder that loading would fail on:
    missing, not a folder, or without config.json, a tokenizer or weights; or a hub id that is not in
    the local Hugging Face cache while HF_HUB_OFFLINE forbids downloading it. The built-in `tiny` and
    other hub ids pass (whether a hub id exists online is only known by loading it)."""
    if name_or_path == BUILT_IN:
        return
    folder = Path(name_or_path).expanduser()
    if not folder.exists():
        if _is_local_path(name_or_path):
            raise ModelSourceError(f"{field}: {name_or_path}: no such folder")
        if huggingface_hub.constants.HF_HUB_OFFLINE and \
                not isinstance(huggingface_hub.try_to_load_from_cache(name_or_path, "config.json"), str):
            raise ModelSourceError(f"{field}: hub id {name_or_path!r} is not in the local Hugging Face cache and "
                                   "HF_HUB_OFFLINE=1 forbids downloading it (give a local folder, or unset it)")
        return
    if not folder.is_dir():
        raise ModelSourceError(f"{field}: {name_or_path} is not a folder (a model is a folder with config.json, "
                               "a tokenizer and weights)")
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"{field}: {name_or_path} has no config.json")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelSourceError(f"{field}: {name_or_path} has no tokenizer ({' or '.join(_TOKENIZER_FILES)} missing)")
    if not any(next(folder.glob(pattern), None) for pattern in _WEIGHT_GLOBS):
        raise ModelSourceError(f"{field}: {name_or_path} has no weights ({' or '.join(_WEIGHT_GLOBS)} missing)")


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


def native_bf16(device: str) -> bool:
    """Whether `device` multiplies bfloat16 in hardware: a CUDA GPU, or a CPU with avx512_bf16 or AMX.
    Elsewhere (an AVX2-only CPU) bf16 autocast is emulated and ~10x slower than float32 (measured:
    SFT steps of the tiny model 4.3 s vs 0.43 s on an AVX2 AMD EPYC)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.device(device).type == "cpu" and (torch.cpu._is_avx512_bf16_supported()
                                                    or torch.cpu._is_amx_tile_supported())


def matmul_autocast(device: str, dtype: str) -> AbstractContextManager:
    """torch.autocast for `dtype` ("none": no autocast; "auto": bfloat16 where `native_bf16`) on `device`'s type.

    On a CPU with bfloat16 matmul units (avx512_bf16, AMX) this halves the time of the linear layers;
    PyTorch's CPU flash-attention kernel is slower in bfloat16 than in float32, so pair it with
    `attn_implementation: eager` there (BENCHMARKS.md, the GRPO step race).
    """
    if dtype == "auto":
        dtype = "bfloat16" if native_bf16(device) else "none"
    if dtype == "none":
        return nullcontext()
    # No weight cache: autocast keeps the low-precision copy of each weight for as long as the context
    # is open, so a context around a training loop (SFT) or mu > 1 inner updates would keep computing
    # with the weights of its first forward pass and never see the optimizer's steps.
    return torch.autocast(torch.device(device).type, dtype=DTYPES[dtype], cache_enabled=False)
