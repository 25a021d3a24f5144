"""Per-token log-probs (and entropies) of completions under a causal LM.

Layout used everywhere in the pipeline: a batch of B completions is `[B, T]`, completion token t
of row i at column t (left-aligned), with `mask[i, t] = t < len(completion_i)`. Prompts are never
part of the `[B, T]` tensors.

For the forward pass, prompt+completion are left-padded so every row ends at the same column;
then only the last T+1 positions need logits (`logits_to_keep`), and positions are derived from
the attention mask exactly as `generate` derives them, so the numbers match the sampler's.

GRPO's rows come in groups that share a prompt. Then the prompt (all but its last token) runs once
per group and its KV cache is shared by the group's rows, as in sampling, with or without a graph:
the backward pass also flows through the prompt once. For 4 x G=4 rows with 80-token prompts and
128 new tokens that is 28% fewer tokens through the model.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5.2x renamed a model's `past_key_values` (argument and output) to `cache`, the old name warning;
# the vLLM venv pins an older transformers that knows only the old name.
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class PackedBatch:
    """Left-padded prompt+completion rows.

    input_ids, attention_mask, position_ids: [B, L]; completion_lens: [B] (long).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    completion_lens: torch.Tensor


def pack(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
         device: str | torch.device = "cpu") -> PackedBatch:
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, width - len(r):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    lens = torch.tensor([len(c) for c in completion_ids], dtype=torch.long)
    return PackedBatch(input_ids.to(device), attention_mask.to(device), position_ids.to(device), lens.to(device))


def completion_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[B, T=width] bool, true on row i's first lengths[i] columns: the completion tokens of the
    left-aligned layout. lengths: [B] (long), on the device the mask is wanted on."""
    return torch.arange(width, device=lengths.device) < lengths.unsqueeze(1)


def right_to_left(x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """[B, T] right-aligned rows (valid entries are each row's last lens[i]) -> left-aligned, zeros after."""
    B, T = x.shape
    cols = torch.arange(T, device=x.device).expand(B, T)
    src = (cols + (T - lens).unsqueeze(1)).clamp(max=T - 1)
    out = x.gather(1, src)
    return torch.where(completion_mask(lens, T), out, torch.zeros((), dtype=x.dtype, device=x.device))


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor, want_entropy: bool):
    """logits [B, T, V] (any dtype), targets [B, T] -> (logp [B, T] fp32, entropy [B, T] fp32 | None).

    logp = logit of the target - logsumexp of the row: no [T, V] log-softmax is written or kept for
    backward (a 150k vocabulary at T=1024 is 600 MB per row in float32). Row by row, so at most one
    row's float32 copy of bf16 logits exists at a time.
    """
    logps, ents = [], []
    for row_logits, row_targets in zip(logits, targets):
        row = row_logits.float()
        lse = torch.logsumexp(row, dim=-1)
        logps.append(row.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1) - lse)
        if want_entropy:
            with torch.no_grad():  # H = lse - sum p * logit
                ents.append(lse - (torch.softmax(row, dim=-1) * row).sum(-1))
    return torch.stack(logps), (torch.stack(ents) if want_entropy else None)


def prompt_groups(prompt_ids: list[list[int]]) -> list[int]:
    """Each row's group: runs of consecutive rows with the same prompt (GRPO's layout)."""
    groups: list[int] = []
    for i, p in enumerate(prompt_ids):
        groups.append(groups[-1] + (p != prompt_ids[i - 1]) if i else 0)
    return groups


def _may_share_prompts(model, with_grad: bool) -> bool:
    """Whether the shared-prompt path may run. Not under FSDP2: every rank must run the same number of forwards
    (each is a collective), and the shared path's count depends on the rank's rows (a prefix pass, then runs of
    similar length); with a graph its backward would also need the layers' weights as the prefix pass gathered
    them, since freed. Not with a graph through activation checkpointing: a checkpointed layer drops the KV cache
    when it runs with a graph (its backward would replay it)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        return False
    return not with_grad or not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def _packed_logprobs(model, pb: PackedBatch, T: int, return_entropy: bool):
    """[b, T] log-probs (and entropies) of left-padded prompt+completion rows."""
    device = pb.input_ids.device
    t_mb = int(pb.completion_lens.max()) if len(pb.completion_lens) else 0
    logp = torch.zeros((len(pb.completion_lens), T), device=device)
    ent = torch.zeros_like(logp) if return_entropy else None
    if t_mb > 0:
        out = model(input_ids=pb.input_ids, attention_mask=pb.attention_mask,
                    position_ids=pb.position_ids, logits_to_keep=t_mb + 1)
        lp, en = _token_logprobs(out.logits[:, :-1], pb.input_ids[:, -t_mb:], return_entropy)
        logp = torch.cat([right_to_left(lp, pb.completion_lens), logp[:, t_mb:]], dim=1)
        if return_entropy:
            ent = torch.cat([right_to_left(en, pb.completion_lens), ent[:, t_mb:]], dim=1)
    return logp, ent


def length_runs(lens: list[int], run_cost: int = 32, max_runs: int = 4, max_cuts: int = 64) -> list[list[int]]:
    """Row indices in up to `max_runs` runs of similar completion length: sorted by length and cut where the
    positions each run pads to its own longest, plus `run_cost` positions per run, add up least. A group's rows
    stop at different lengths: 16 rows whose longest reaches 128 average ~100, so one run pads ~20% of its
    positions. `run_cost`: what one more forward and backward costs beyond its positions (all the weights read
    again and another weight-gradient product), in positions; ~32 for a CPU that streams 6 GB/s and computes
    90 GFLOP/s (12 bytes against 6 FLOPs per parameter). Cuts are tried where the length changes, at most
    `max_cuts` of them (evenly spaced), so the search stays small for large micro-batches."""
    n = len(lens)
    if n < 2:
        return [list(range(n))]
    order = sorted(range(n), key=lambda i: lens[i])
    s = [lens[i] for i in order]
    cuts = [j for j in range(1, n) if s[j] != s[j - 1]]
    if len(cuts) > max_cuts:
        cuts = [cuts[round(k * (len(cuts) - 1) / (max_cuts - 1))] for k in range(max_cuts)]
    bounds = [0, *cuts, n]  # runs start and end at these sorted positions
    # best[k][e]: least cost of the first bounds[e] sorted rows in k runs; prev[k][e]: the bound its last run starts at
    best = [[0.0] + [float("inf")] * (len(bounds) - 1) if k == 0 else [float("inf")] * len(bounds)
            for k in range(max_runs + 1)]
    prev = [[0] * len(bounds) for _ in range(max_runs + 1)]
    for k in range(1, max_runs + 1):
        for e in range(1, len(bounds)):
            for b in range(e):
                cost = best[k - 1][b] + (bounds[e] - bounds[b]) * s[bounds[e] - 1] + run_cost
                if cost < best[k][e]:
                    best[k][e], prev[k][e] = cost, b
    n_runs = min(range(1, max_runs + 1), key=lambda k: best[k][-1])  # the fewest runs of the least cost
    if n_runs == 1:
        return [list(range(n))]  # in the rows' own order
    runs, e = [], len(bounds) - 1
    for k in range(n_runs, 0, -1):
        b = prev[k][e]
        runs.append(order[bounds[b]:bounds[e]])
        e = b
    return runs[::-1]


def _shared_prompt_logprobs(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], groups: list[int],
                            pad_id: int, T: int, device, return_entropy: bool):
    """`_packed_logprobs` with each group's prompt run once: the prompts but their last token, left-padded,
    fill a KV cache that is indexed out to the group's rows; then each row's last prompt token and its
    completion, right-padded, continue from it (positions as in the packed layout), in runs of similar
    length (`length_runs`) so that a short row does not pay for the longest one's positions."""
    firsts = [i for i, g in enumerate(groups) if i == 0 or g != groups[i - 1]]
    prefix = pack([prompt_ids[i][:-1] for i in firsts], [[] for _ in firsts], pad_id, device)
    # logits_to_keep=1: only the cache is wanted; scoring every prompt position through the LM head cost ~0.3 s
    # a step for SmolLM2's 4 x 80-token prompts (its 49152-wide head is a fifth of the model's weights)
    cache = getattr(model(input_ids=prefix.input_ids, attention_mask=prefix.attention_mask,
                          position_ids=prefix.position_ids, use_cache=True, logits_to_keep=1), CACHE)
    runs = length_runs([len(c) for c in completion_ids])
    logps, ents = [], []
    for rows_of_run in runs:
        rows = torch.tensor([groups[i] for i in rows_of_run], device=device)
        run_cache = cache if len(runs) == 1 else DynamicCache(
            ddp_cache_data=[(layer.keys[rows], layer.values[rows]) for layer in cache.layers])
        if len(runs) == 1:
            run_cache.batch_select_indices(rows)
        lp, en = _continue_from_prompts(model, [prompt_ids[i] for i in rows_of_run],
                                        [completion_ids[i] for i in rows_of_run], prefix.attention_mask[rows],
                                        run_cache, pad_id, T, device, return_entropy)
        logps.append(lp)
        ents.append(en)
    if len(runs) == 1:
        return logps[0], ents[0]
    back = torch.tensor([i for run in runs for i in run], device=device).argsort()  # each row to its place
    return torch.cat(logps)[back], (torch.cat(ents)[back] if return_entropy else None)


def _continue_from_prompts(model, prompt_ids, completion_ids, prefix_mask, cache, pad_id: int, T: int, device,
                           return_entropy: bool):
    """[b, T] log-probs (and entropies) of rows whose prompts but the last token are in `cache`."""
    lens = torch.tensor([len(c) for c in completion_ids], device=device)
    t_mb = int(lens.max())
    suffix = torch.full((len(completion_ids), t_mb + 1), pad_id, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        suffix[i, : len(c) + 1] = torch.tensor([p[-1], *c], dtype=torch.long)
    suffix = suffix.to(device)
    suffix_mask = completion_mask(lens + 1, t_mb + 1).long()
    start = torch.tensor([len(p) - 1 for p in prompt_ids], device=device)
    out = model(input_ids=suffix, attention_mask=torch.cat([prefix_mask, suffix_mask], dim=1),
                position_ids=start.unsqueeze(1) + torch.arange(t_mb + 1, device=device), **{CACHE: cache})
    lp, en = _token_logprobs(out.logits[:, :-1], suffix[:, 1:], return_entropy)
    keep = completion_mask(lens, t_mb)
    pad = torch.zeros((len(completion_ids), T - t_mb), device=device)
    logp = torch.cat([torch.where(keep, lp, 0.0), pad], dim=1)
    ent = torch.cat([torch.where(keep, en, 0.0), pad], dim=1) if return_entropy else None
    return logp, ent


def completion_logprobs(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], *, pad_id: int,
                        width: int | None = None, micro_batch_size: int | None = None, with_grad: bool = False,
                        return_entropy: bool = False):
    """Per-token log-probs of each completion given its prompt.

    Returns (logp [B, T] float32, mask [B, T] bool, entropy [B, T] float32 or None), T = `width`
    or the longest completion. With `with_grad=False` no graph is kept. Micro-batches bound the
    activations held at once; with grad the graphs of all micro-batches stay alive, so a trainer
    that wants to bound memory calls this once per micro-batch and backpropagates in between.
    Consecutive rows with the same prompt of at least 2 tokens share its forward pass (module docstring).
    """
    B = len(completion_ids)
    T = width if width is not None else max((len(c) for c in completion_ids), default=0)
    device = next(model.parameters()).device
    step = micro_batch_size or B or 1
    logps, ents = [], []
    can_share = _may_share_prompts(model, with_grad)
    with nullcontext() if with_grad else torch.no_grad():
        for start in range(0, B, step):
            prompts, completions = prompt_ids[start:start + step], completion_ids[start:start + step]
            groups = prompt_groups(prompts)
            if (can_share and groups[-1] + 1 < len(prompts) and min(len(p) for p in prompts) >= 2
                    and max(len(c) for c in completions) > 0):
                logp, ent = _shared_prompt_logprobs(model, prompts, completions, groups, pad_id, T, device,
                                                    return_entropy)
            else:
                logp, ent = _packed_logprobs(model, pack(prompts, completions, pad_id, device), T, return_entropy)
            logps.append(logp)
            ents.append(ent)
    mask = completion_mask(torch.tensor([len(c) for c in completion_ids], device=device), T)
    return torch.cat(logps), mask, (torch.cat(ents) if return_entropy else None)
