"""Group-relative advantages for one step's scored rollouts (in memory), and the update's batch from them."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import torch

from models.advantages import outcome_advantages, process_advantages
from models.trainer import UpdateBatch
from stages.rollout_store import padded, with_columns


def _check_layout(table: pa.Table, group_size: int) -> None:
    groups = table.column("group_index").to_pylist()
    samples = table.column("sample_index").to_pylist()
    expected = [(g, s) for g in sorted(set(groups)) for s in range(group_size)]
    if list(zip(groups, samples)) != expected:
        raise ValueError(f"rollouts are not laid out group after group with {group_size} samples each")


def compute_advantages(table: pa.Table, *, supervision: str, group_size: int, eps: float = 1e-4,
                       scale: str = "group", process_credit: str = "sum") -> pa.Table:
    """`table` (scored) with `advantages` added: one float per completion token.

    outcome: the normalised reward of the output, on every token; process: the suffix sum (or minimum,
    `process_credit`) of normalised step rewards (models/advantages.py).
    """
    _check_layout(table, group_size)
    lengths = table.column("completion_length").to_pylist()
    if supervision == "outcome":
        adv = outcome_advantages(torch.tensor(table.column("reward").to_pylist(), dtype=torch.float32),
                                 group_size, eps=eps, scale=scale)
        rows = [[float(a)] * n for a, n in zip(adv.tolist(), lengths)]
    elif supervision == "process":
        width = max(lengths, default=0)
        adv = process_advantages(table.column("step_rewards").to_pylist(), table.column("step_ends").to_pylist(),
                                 group_size, width, eps=eps, credit=process_credit)
        rows = [adv[i, :n].tolist() for i, n in enumerate(lengths)]
    else:
        raise ValueError(f"reward.supervision: unknown {supervision!r} (outcome | process)")
    return with_columns(table, {"advantages": pa.array(rows, type=pa.list_(pa.float32()))})


def has_token_logprobs(table: pa.Table, column: str = "old_logprobs") -> bool:
    """Whether every row holds a log-prob of each of its completion tokens in `column` (old_logprobs: the
    sampler's; ref_logprobs: the reference's, when scored while sampling; absent in older runs' files)."""
    if column not in table.column_names:
        return False

    def lengths(name: str):
        return pc.list_value_length(table.column(name)).fill_null(0)

    return bool(pc.all(pc.equal(lengths(column), lengths("completion_ids"))).as_py())


def update_batch(table: pa.Table, group_size: int = 1, *, drop_flat_groups: bool = False,
                 mask_truncated: bool = False) -> UpdateBatch:
    """The tensors the update needs, from the stored token ids (no re-tokenising); with `drop_flat_groups`
    only the groups that carry a learning signal (`UpdateBatch.informative_groups`); with `mask_truncated`
    without the completions cut by the token limit (DAPO's overlong filtering: their rewards still count in
    their group's mean and std, but an unfinished answer is not trained on as if it were the answer)."""
    batch = UpdateBatch(
        prompt_ids=table.column("prompt_ids").to_pylist(),
        completion_ids=table.column("completion_ids").to_pylist(),
        group_size=group_size,
        advantages=padded(table, "advantages"),
        sampler_logp=padded(table, "old_logprobs") if has_token_logprobs(table) else None,
        ref_logp=padded(table, "ref_logprobs") if has_token_logprobs(table, "ref_logprobs") else None,
    )
    truncated = table.column("truncated").to_pylist()
    if drop_flat_groups:
        keep = batch.informative_rows()
        batch, truncated = batch.rows(keep), [truncated[i] for i in keep]
    if mask_truncated:
        batch = batch.rows([i for i, cut in enumerate(truncated) if not cut])
    return batch
