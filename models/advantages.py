"""Group-relative advantage estimators (DeepSeekMath GRPO; see shared/spec/grpo.md).

Pure functions over tensors. Every batch is laid out group after group: outputs
`g * G .. g * G + G - 1` answer the same question, `G` being `group_size`.

- `outcome_advantages`: one reward per output, normalised within its group; the
  loss broadcasts the [N] result over the output's tokens.
- `process_advantages`: one reward per reasoning step, normalised over all step
  rewards of the group; a token's advantage sums the steps ending at or after it.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

OUTCOME_SCALES = ("group", "batch", "none")


def _as_float(values) -> Tensor:
    """Tensor of a floating dtype (ints and bools -> the default float dtype)."""
    t = torch.as_tensor(values)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def _check_finite(values: Tensor, name: str) -> None:
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad):
        index = tuple(bad[0].tolist())
        index = index[0] if len(index) == 1 else index
        raise ValueError(f"{name}[{index}] is {values[tuple(bad[0])].item()}; rewards must be finite")


def outcome_advantages(
    rewards: Sequence[float] | Tensor,
    group_size: int,
    *,
    eps: float = 1e-4,
    scale: str = "group",
) -> Tensor:
    """Outcome-supervision advantages, one per output.

    rewards: [N], N = groups * group_size, group after group.
    Returns [N] (same float dtype as `rewards`; ints -> default dtype):
      "group": (r - mean_g) / (std_g + eps)   -- the paper
      "batch": (r - mean_g) / (std_batch + eps)
      "none":  r - mean_g                      -- Dr. GRPO, no std division
    std is the sample std (Bessel-corrected). A group whose rewards are all equal
    gets exactly 0: it carries no signal about which output is better, and the
    explicit zero avoids both 0/0 and float noise from `x - mean(x, x, x)`.
    """
    rewards = _as_float(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    if scale not in OUTCOME_SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {OUTCOME_SCALES}")
    _check_finite(rewards, "rewards")
    if group_size == 1 or len(rewards) == 0:
        # Every group is a single output, hence constant (and std would be NaN).
        return torch.zeros_like(rewards)

    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (rewards.std() + eps)
    constant = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(centred), centred).view(-1)


def process_advantages(
    step_rewards: Sequence[Sequence[float] | Tensor],
    step_ends: Sequence[Sequence[int] | Tensor],
    group_size: int,
    length: int,
    *,
    eps: float = 1e-4,
    credit: str = "sum",
) -> Tensor:
    """Process-supervision advantages, one per completion token.

    step_rewards[i]: [K_i] the PRM's reward for each step of output i (ragged).
    step_ends[i]:    [K_i] 0-based completion-token index where each step ends.
    Returns [N, length]: A[i, t] = sum of normalised r_i^j over steps j with end >= t (credit "sum",
    the paper's), or their minimum (credit "min": PURE, arXiv 2504.15275, whose point is that a learned
    PRM's sum can be raised by adding steps it scores well, and the policy learns to pad), so tokens
    after the last step end get 0, and an output with no steps gets 0.

    Normalisation pools all step rewards of a group (mean, sample std + eps), as
    in the paper; a group with fewer than two step rewards, or all equal, gets 0.
    """
    n = len(step_rewards)
    if len(step_ends) != n:
        raise ValueError(f"{n} step_rewards but {len(step_ends)} step_ends")
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} outputs do not split into groups of {group_size}")
    if n == 0:
        return torch.zeros(0, length)

    rewards, ends = [], []
    for i, (r, e) in enumerate(zip(step_rewards, step_ends)):
        r, e = _as_float(r), torch.as_tensor(e, dtype=torch.long)
        if r.dim() != 1 or r.shape != e.shape:
            raise ValueError(f"output {i}: {tuple(r.shape)} step rewards vs {tuple(e.shape)} step ends")
        _check_finite(r, f"step_rewards[{i}]")
        if len(e) and (e.min() < 0 or e.max() >= length):
            raise ValueError(f"output {i}: step ends {e.tolist()} outside [0, {length})")
        rewards.append(r)
        ends.append(e)

    r = torch.cat(rewards)
    output = torch.repeat_interleave(torch.tensor([len(x) for x in rewards], dtype=torch.long))
    group = output // group_size
    # Ragged groups: per-group sums by scatter, indexed back per step reward.
    n_groups = n // group_size
    count = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, group, torch.ones_like(r))
    mean = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, group, r) / count.clamp(min=1)
    centred = r - mean[group]
    var = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, group, centred**2) / (count - 1).clamp(min=1)
    lo = torch.full((n_groups,), torch.inf, dtype=r.dtype).scatter_reduce_(0, group, r, "amin")
    hi = torch.full((n_groups,), -torch.inf, dtype=r.dtype).scatter_reduce_(0, group, r, "amax")
    constant = (lo == hi) | (count < 2)
    normed = torch.where(constant[group], torch.zeros_like(r), centred / (var.sqrt()[group] + eps))

    # Put each normalised reward at its step's end token, then a reversed cumulative sum (or minimum)
    # gives every token the sum (or minimum) over steps ending at or after it.
    if credit == "min":
        at_end = torch.full((n, length), torch.inf, dtype=r.dtype)
        at_end.index_put_((output, torch.cat(ends)), normed)
        future_min = at_end.flip(-1).cummin(-1).values.flip(-1)
        return torch.where(future_min.isinf(), torch.zeros_like(future_min), future_min)
    if credit != "sum":
        raise ValueError(f"credit: unknown {credit!r} (sum | min)")
    at_end = torch.zeros(n, length, dtype=r.dtype)
    at_end.index_put_((output, torch.cat(ends)), normed, accumulate=True)
    return at_end.flip(-1).cumsum(-1).flip(-1)


def step_ends_from_tokens(token_ids: Sequence[int] | Tensor, delimiter_ids: Iterable[int]) -> list[int]:
    """0-based step-end indices of one completion (its tokens only, no padding).

    A step ends at every delimiter token (by default the newline tokens); the last
    step ends at the last token unless the completion already ends on a delimiter.
    Empty completion -> [].
    """
    ids = token_ids.tolist() if isinstance(token_ids, Tensor) else list(token_ids)
    delimiters = set(delimiter_ids)
    ends = [t for t, tok in enumerate(ids) if tok in delimiters]
    if ids and (not ends or ends[-1] != len(ids) - 1):
        ends.append(len(ids) - 1)
    return ends


# Computed once per tokenizer object, and only for as long as that object lives: keyed by the object
# through a weak reference, not by id(), which Python reuses for a new object once the old is freed.
_NEWLINE_TOKENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def delimiter_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the vocabulary tokens whose decoded text contains a newline: the step delimiters, and
    the tokens the samplers' answer-line stop watches for (models/generation.py).

    A BPE vocabulary holds many tokens containing a newline ("\\n", "\\n\\n", ".\\n"), so matching one
    id would miss step boundaries. Duck-typed: needs only `get_vocab()` and `decode(list[int])`.
    Decoding the whole vocabulary is slow, so the set is cached per tokenizer object.
    """
    ids = _NEWLINE_TOKENS.get(tokenizer)
    if ids is None:
        ids = frozenset(i for i in tokenizer.get_vocab().values() if "\n" in tokenizer.decode([i]))
        _NEWLINE_TOKENS[tokenizer] = ids
    return ids
