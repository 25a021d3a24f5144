"""The rollout store: one Parquet file per (run, iteration, step), one row per sampled output.

Layout (plain hive partitioning, so pandas, polars, DuckDB and pyarrow.dataset see both keys with no
project code; `stages.run_layout.RunLayout.rollouts` builds the path):

    <run>/rollouts/iteration=<k>/step=<s>/part-0.parquet

Sampling makes the columns of `ROLLOUT_SCHEMA`, scoring adds `SCORE_FIELDS` and advantage estimation
`ADVANTAGE_FIELDS`, all in memory; the step's file is written once, complete, and atomically
(temporary name, then rename): a file that exists is a finished step, and a crash never leaves a
partial file that a reader or a resumed run would take for one.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

ROLLOUT_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("question_id", pa.string()),
    ("group_index", pa.int32()),        # the question's position in the step's batch
    ("sample_index", pa.int32()),       # 0..G-1 within the group
    ("prompt", pa.string()),
    ("completion", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("completion_ids", pa.list_(pa.int32())),
    ("old_logprobs", pa.list_(pa.float32())),  # per completion token, under the sampler
    ("ref_logprobs", pa.list_(pa.float32())),  # per token, under the reference when scored while sampling, else []
    ("completion_length", pa.int32()),
    ("truncated", pa.bool_()),          # hit max_new_tokens without EOS
    ("finish_reason", pa.string()),     # "eos" | "stop" (answer line ended) | "length"
    ("answer", pa.string()),            # ground truth
    ("solution", pa.string()),          # reference worked solution (step labels)
    ("extracted_answer", pa.string()),  # null when the completion has no answer line
    ("correct", pa.bool_()),
    ("policy_version", pa.int32()),     # GRPO steps the sampling policy had taken (0: the run's start)
    ("sampler_backend", pa.string()),
    ("seed", pa.int64()),
    ("sampled_at", pa.timestamp("ms", tz="UTC")),
])

# Added by scoring: the combined outcome reward, one column per source, and the process view.
SCORE_FIELDS = [
    pa.field("reward", pa.float32()),
    pa.field("step_ends", pa.list_(pa.int32())),       # completion-token index where each step ends
    pa.field("step_rewards", pa.list_(pa.float32())),  # combined per-step reward (process supervision)
    pa.field("step_labels", pa.list_(pa.bool_())),     # verifier's per-step correctness
]
# Added by advantage estimation: per completion token (constant along the row for outcome).
ADVANTAGE_FIELDS = [pa.field("advantages", pa.list_(pa.float32()))]


def write_atomic(table: pa.Table, path: str | Path) -> Path:
    """Write `table` to `path` via a temporary sibling and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"  # dot-prefixed: datasets ignore it
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_rollouts(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=columns)


def with_columns(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    """`table` with `columns` added (or replaced)."""
    for name, values in columns.items():
        if len(values) != table.num_rows:
            raise ValueError(f"column {name!r} has {len(values)} values for {table.num_rows} rows")
        idx = table.schema.get_field_index(name)
        table = table.set_column(idx, name, values) if idx >= 0 else table.append_column(name, values)
    return table


def open_rollouts(rollouts_dir: str | Path) -> ds.Dataset:
    """All of a run's rollouts (`RunLayout.rollouts_dir`) as one dataset with `iteration` and `step`
    columns from the hive keys: `open_rollouts(d).to_table(filter=ds.field("iteration") == 1)`.
    Dot-prefixed temporaries of unfinished writes are never matched."""
    return ds.dataset(str(rollouts_dir), format="parquet", partitioning="hive")


def padded(table: pa.Table, column: str, dtype=torch.float32, width: int | None = None) -> torch.Tensor:
    """A list column (one list per row) as a zero-padded [B, T] tensor, no re-tokenising."""
    rows = table.column(column).to_pylist()
    T = width if width is not None else max((len(r) for r in rows), default=0)
    out = torch.zeros((len(rows), T), dtype=dtype)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out
