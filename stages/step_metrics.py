"""Per-step metrics of a step's rollouts (rewards, accuracy, lengths, advantages), and the reward-hacking
monitor: how well each learned reward model's scores still agree with the verifier."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa
from sklearn.metrics import roc_auc_score

from stages.rewards import RM_SOURCES, reward_column


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


def rm_thresholds(reward_cfg) -> dict[str, float]:
    """The reward models among `reward_cfg.sources` (a `RewardConfig`), learned or pretrained, and the score
    above which each calls an output right: 0.5 for a probability, 0 for a logit (`reward.rm_score`; a
    pretrained model's score is its logit)."""
    threshold = 0.5 if reward_cfg.rm_score == "probability" else 0.0
    learned = {s.name: threshold for s in reward_cfg.sources if s.name in RM_SOURCES}
    return {**learned, **{s.name: 0.0 for s in reward_cfg.sources if s.model is not None}}  # pretrained: a logit


def reward_model_agreement(t: pa.Table, thresholds: Mapping[str, float]) -> dict[str, float]:
    """The reward-hacking monitor, per learned reward model (`thresholds`: source name -> the score above
    which it calls an output right) from the source's column (`stages.rewards.reward_column`):

    - `rm_auc/<source>`: ROC AUC of its score against the verifier's `correct` (1: it ranks every right
      output above every wrong one; 0.5: chance). Left out when the step's outputs are all right or all
      wrong, where ranking is undefined.
    - `rm_accuracy/<source>`: how often `score > threshold` (0.5 for probabilities, 0 for logits) says
      what the verifier says.
    - `rm_gap/<source>`: mean score minus verifier accuracy: an RM being gamed pays more and more for
      outputs the verifier rejects, so the gap grows while the AUC falls.
    """
    correct = t.column("correct").to_numpy(zero_copy_only=False).astype(bool)
    out: dict[str, float] = {}
    for source, threshold in thresholds.items():
        column = reward_column(source)
        if column not in t.column_names:
            continue
        score = t.column(column).to_numpy().astype(np.float64)
        if correct.any() and not correct.all():
            out[f"rm_auc/{source}"] = float(roc_auc_score(correct, score))
        out[f"rm_accuracy/{source}"] = float(((score > threshold) == correct).mean())
        out[f"rm_gap/{source}"] = float(score.mean() - correct.mean())
    return out


def agreement_note(metrics: dict[str, float]) -> str:
    """The step line's view of the monitor: ' | outcome_rm vs verifier: AUC 0.81, gap +0.12' ("" without one)."""
    notes = []
    for key in sorted(k for k in metrics if k.startswith("rm_gap/")):
        source = key.split("/", 1)[1]
        auc = metrics.get(f"rm_auc/{source}")
        notes.append(f"{source} vs verifier: " + (f"AUC {auc:.2f}, " if auc is not None else "") +
                     f"gap {metrics[key]:+.2f}")
    return "".join(f" | {n}" for n in notes)
