"""The rollout store: one Parquet file per (run, iteration, step), one row per sampled output.

Layout (hive-style, so pyarrow.dataset / pandas / polars / DuckDB read a run or filter by
iteration without custom code):

    <artifacts>/runs/<run_id>/rollouts/iteration=<k>/step=<s>.parquet

Sampling writes the columns of `ROLLOUT_SCHEMA`; scoring and advantage estimation add theirs
(`SCORE_FIELDS`, `ADVANTAGE_FIELDS`) to the same file, so one file tells the whole story of one
step. Every write is atomic (temporary name, then rename): a crash never leaves a partial file
that a reader or a resumed run would take for a complete one.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
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
    ("completion_length", pa.int32()),
    ("truncated", pa.bool_()),          # hit max_new_tokens without EOS
    ("finish_reason", pa.string()),     # "eos" | "stop" (answer line ended) | "length"
    ("answer", pa.string()),            # ground truth
    ("solution", pa.string()),          # reference worked solution (step labels)
    ("extracted_answer", pa.string()),  # null when the completion has no answer line
    ("correct", pa.bool_()),
    ("policy_checkpoint", pa.string()),
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


def rollout_path(artifacts: str | Path, run_id: str, iteration: int, step: int) -> Path:
    # The partition keys live in the path (hive style), not as columns: pyarrow.dataset adds them back.
    return Path(artifacts) / "runs" / run_id / "rollouts" / f"iteration={iteration}" / f"step={step}.parquet"


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


def add_columns(path: str | Path, columns: dict[str, pa.Array]) -> Path:
    """Add (or replace) columns of a step's file, atomically."""
    table = read_rollouts(path)
    for name, values in columns.items():
        if len(values) != table.num_rows:
            raise ValueError(f"column {name!r} has {len(values)} values for {table.num_rows} rows of {path}")
        idx = table.schema.get_field_index(name)
        table = table.set_column(idx, name, values) if idx >= 0 else table.append_column(name, values)
    return write_atomic(table, path)


def open_run(artifacts: str | Path, run_id: str) -> ds.Dataset:
    """All of a run's rollouts as one dataset with `iteration` and `step` partition columns.

    `iteration=<k>` is a directory but `step=<s>` is a file name, which pyarrow's hive
    partitioning does not parse; so the dataset is built from the step files with one partition
    expression each, and both keys filter (and prune files) like hive keys:
    `open_run(a, r).to_table(filter=(ds.field("iteration") == 1) & (ds.field("step") == 2))`.
    Dot-prefixed temporaries of unfinished writes are never matched. Files that later stages
    extended have extra columns; the dataset's schema is the union (missing values are null).
    """
    import re

    import pyarrow.fs as pafs

    root = Path(artifacts) / "runs" / run_id / "rollouts"
    pattern = re.compile(r"iteration=(\d+)/step=(\d+)\.parquet$")
    files, parts = [], []
    for f in sorted(root.glob("iteration=*/step=*.parquet")):
        m = pattern.search(f.as_posix())
        if m:
            files.append(str(f))
            parts.append((ds.field("iteration") == pa.scalar(int(m.group(1)), pa.int32()))
                         & (ds.field("step") == pa.scalar(int(m.group(2)), pa.int32())))
    schema = pa.unify_schemas([pq.read_schema(f) for f in files] or [ROLLOUT_SCHEMA])
    schema = schema.append(pa.field("iteration", pa.int32())).append(pa.field("step", pa.int32()))
    return ds.FileSystemDataset.from_paths(files, schema=schema, format=ds.ParquetFileFormat(),
                                           filesystem=pafs.LocalFileSystem(), partitions=parts)


def padded(table: pa.Table, column: str, dtype=torch.float32, width: int | None = None) -> torch.Tensor:
    """A list column (one list per row) as a zero-padded [B, T] tensor, no re-tokenising."""
    rows = table.column(column).to_pylist()
    T = width if width is not None else max((len(r) for r in rows), default=0)
    out = torch.zeros((len(rows), T), dtype=dtype)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out


def completion_mask(table: pa.Table, width: int | None = None) -> torch.Tensor:
    """[B, T] bool mask of completion tokens, matching `padded`."""
    lens = torch.tensor(table.column("completion_length").to_pylist(), dtype=torch.long)
    T = width if width is not None else int(lens.max()) if len(lens) else 0
    return torch.arange(T).expand(len(lens), T) < lens.unsqueeze(1)


@dataclass
class RolloutBatch:
    """What an update needs from a step's file, without re-tokenising: ragged ids for the forward
    pass (`models.policy.completion_logprobs` packs them itself) and `[B, T]` left-aligned tensors."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    old_logprobs: torch.Tensor  # [B, T] float32, the sampler's log-probs, 0 past each completion
    mask: torch.Tensor          # [B, T] bool, True on completion tokens
    completion_lens: torch.Tensor  # [B] long

    def __len__(self) -> int:
        return len(self.completion_ids)


def rollout_tensors(table: pa.Table, width: int | None = None) -> RolloutBatch:
    """A rollout table (or a filtered/sliced one) as a `RolloutBatch`; T = `width` or the longest."""
    lens = torch.tensor(table.column("completion_length").to_pylist(), dtype=torch.long)
    T = width if width is not None else int(lens.max()) if len(lens) else 0
    return RolloutBatch(
        prompt_ids=table.column("prompt_ids").to_pylist(),
        completion_ids=table.column("completion_ids").to_pylist(),
        old_logprobs=padded(table, "old_logprobs", width=T),
        mask=completion_mask(table, width=T),
        completion_lens=lens,
    )

