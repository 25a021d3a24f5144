"""Batched sampling and greedy decoding with transformers `generate`.

Rows are prompt-major: for prompts [p0, p1] and n=2 the output is [p0s0, p0s1, p1s0, p1s1].
Completions are token-id lists that include the EOS token when the model emitted one (its
log-prob is part of what the policy learns) and never include padding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.policy import pack


@dataclass
class Completion:
    token_ids: list[int]
    finished: bool  # ended with EOS rather than by running out of max_new_tokens


def _trim(row: list[int], eos_ids: set[int], pad_id: int) -> Completion:
    for j, tok in enumerate(row):
        if tok in eos_ids:
            return Completion(row[: j + 1], True)
    while row and row[-1] == pad_id:
        row = row[:-1]
    return Completion(row, False)


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], *, n: int = 1, max_new_tokens: int = 64,
             greedy: bool = False, temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64,
             seed: int | None = None) -> list[Completion]:
    """n completions per prompt, `batch_size` rows (prompt x sample) per `generate` call.

    Prompts are sorted by length before batching (less padding, same results: each row's
    sampling depends only on its own prompt and the RNG stream) and returned in input order.
    """
    if greedy and n != 1:
        raise ValueError("greedy decoding gives one completion per prompt; use n=1")
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    pad_id = tokenizer.pad_token_id
    per_call = max(1, batch_size // n)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    results: dict[int, list[Completion]] = {}
    generator_seed = seed
    for start in range(0, len(order), per_call):
        idx = order[start:start + per_call]
        pb = pack([prompt_ids[i] for i in idx], [[] for _ in idx], pad_id, device)
        if generator_seed is not None:
            torch.manual_seed(generator_seed + start)
        kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p,
                                                            top_k=0, num_return_sequences=n)
        out = model.generate(input_ids=pb.input_ids, attention_mask=pb.attention_mask,
                             max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=list(eos_ids),
                             use_cache=True, **kwargs)
        new = out[:, pb.input_ids.shape[1]:].tolist()
        for k, i in enumerate(idx):
            results[i] = [_trim(new[k * n + s], eos_ids, pad_id) for s in range(n)]
    return [c for i in range(len(prompt_ids)) for c in results[i]]
