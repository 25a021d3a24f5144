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
    }
