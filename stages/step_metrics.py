"""Per-step metrics of a step's rollouts (rewards, accuracy, lengths, advantages)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa


def rollout_metrics(t: pa.Table, group_size: int) -> dict[str, float]:
    # numpy over Arrow buffers rather than Python lists: this runs in the flow on every step.
    reward = t.column("reward").to_numpy().astype(np.float64)
    groups = reward.reshape(-1, group_size)
    lengths = t.column("completion_length").to_numpy().astype(np.float64)
    adv = t.column("advantages").combine_chunks().flatten().to_numpy().astype(np.float64)
    zero_std = groups.max(axis=1) == groups.min(axis=1)
    return {
        "reward_mean": float(reward.mean()),
        "reward_std": float(reward.std(ddof=1)) if len(reward) > 1 else 0.0,
        "accuracy": float(t.column("correct").to_numpy().mean()),
        "zero_std_group_frac": float(zero_std.mean()),
        "advantage_mean": float(adv.mean()) if len(adv) else 0.0,
        "advantage_abs_mean": float(np.abs(adv).mean()) if len(adv) else 0.0,
        "completion_length_mean": float(lengths.mean()),
        "completion_tokens": float(lengths.sum()),
        "truncation_rate": float(t.column("truncated").to_numpy().mean()) if t.num_rows else 0.0,
        **zeroed_rows(t),
    }


def zeroed_rows(t: pa.Table) -> dict[str, float]:
    """`reward_zeroed_rows`: rows a failing source scored 0 under `reward.on_error: zero`, and
    `reward_zeroed_rows/<source>` for each source that did."""
    if "reward_errors" not in t.column_names:
        return {}
    counts: dict[str, float] = {}
    for names in t.column("reward_errors").to_pylist():
        for name in names or []:
            counts[name] = counts.get(name, 0.0) + 1.0
    failed = sum(1 for names in t.column("reward_errors").to_pylist() if names)
    return {"reward_zeroed_rows": float(failed), **{f"reward_zeroed_rows/{k}": v for k, v in sorted(counts.items())}}


def zeroed_note(metrics: dict[str, float]) -> str:
    """The step line's note on rows scored 0 for a failing source ("" when none were)."""
    per_source = {k.split("/", 1)[1]: int(v) for k, v in metrics.items() if k.startswith("reward_zeroed_rows/")}
    if not per_source:
        return ""
    return " | rows scored 0 for a failing reward source: " + ", ".join(f"{k} {v}" for k, v in per_source.items())
