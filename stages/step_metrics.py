"""Per-step metrics read off a step's rollout file (rewards, accuracy, lengths, advantages)."""
from __future__ import annotations

from pathlib import Path

import torch

from stages.rollout_store import read_rollouts


def rollout_metrics(rollout_path: str | Path, group_size: int) -> dict[str, float]:
    t = read_rollouts(rollout_path, ["reward", "completion_length", "advantages", "correct", "truncated"])
    reward = torch.tensor(t.column("reward").to_pylist(), dtype=torch.float64)
    groups = reward.view(-1, group_size)
    lengths = torch.tensor(t.column("completion_length").to_pylist(), dtype=torch.float64)
    adv = torch.tensor([a for row in t.column("advantages").to_pylist() for a in row], dtype=torch.float64)
    correct = torch.tensor(t.column("correct").to_pylist(), dtype=torch.float64)
    zero_std = (groups.max(dim=1).values == groups.min(dim=1).values).double()
    return {
        "reward_mean": reward.mean().item(),
        "reward_std": reward.std().item() if len(reward) > 1 else 0.0,
        "accuracy": correct.mean().item(),
        "zero_std_group_frac": zero_std.mean().item(),
        "advantage_mean": adv.mean().item() if len(adv) else 0.0,
        "advantage_abs_mean": adv.abs().mean().item() if len(adv) else 0.0,
        "completion_length_mean": lengths.mean().item(),
        "completion_tokens": lengths.sum().item(),
        "truncation_rate": sum(t.column("truncated").to_pylist()) / max(1, t.num_rows),
    }
