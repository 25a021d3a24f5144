"""The rollout store: schema round-trip, atomic writes, hive partitions, tensors for the update."""
import datetime as dt

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from stages import rollout_store as rs
from stages.rollout_store import (ROLLOUT_SCHEMA, add_columns, open_run, read_rollouts, rollout_path,
                                  rollout_tensors, write_atomic)


def _rows(n=4, G=2, run_id="r1", seed=0):
    rows = []
    for r in range(n):
        g, s = divmod(r, G)
        comp = list(range(1, 2 + r))  # lengths 1..n
        rows.append({
            "run_id": run_id, "question_id": f"q{g}", "group_index": g, "sample_index": s,
            "prompt": f"Question: {g}\nAnswer:\n", "completion": "x" * len(comp),
            "prompt_ids": [5, 6, 7 + g], "completion_ids": comp,
            "old_logprobs": [-0.5 * (j + 1) for j in range(len(comp))], "completion_length": len(comp),
            "truncated": r % 2 == 0, "finish_reason": "length" if r % 2 == 0 else "eos",
            "answer": "3", "solution": "1+2=3\n#### 3", "extracted_answer": None if r == 0 else "3",
            "correct": r != 0, "policy_checkpoint": "ckpt", "sampler_backend": "hf", "seed": seed,
            "sampled_at": dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
        })
    return pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA)


def test_layout_is_hive_style(tmp_path):
    p = rollout_path(tmp_path, "run-a", 2, 7)
    assert p == tmp_path / "runs" / "run-a" / "rollouts" / "iteration=2" / "step=7.parquet"


def test_schema_round_trips(tmp_path):
    table = _rows()
    path = write_atomic(table, rollout_path(tmp_path, "r1", 0, 0))
    back = read_rollouts(path)
    assert back.schema.equals(ROLLOUT_SCHEMA)
    assert back.to_pylist() == table.to_pylist()
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"


def test_crash_mid_write_leaves_no_visible_file(tmp_path, monkeypatch):
    path = rollout_path(tmp_path, "r1", 0, 0)

    def crash(table, where, **kwargs):
        with open(where, "wb") as f:
            f.write(b"PAR1 half a file")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(rs.pq, "write_table", crash)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(_rows(), path)
    assert not path.exists()
    assert list(path.parent.iterdir()) == []  # the temporary file is gone too
    monkeypatch.undo()
    # a complete earlier file is not replaced by a failed rewrite
    write_atomic(_rows(), path)
    monkeypatch.setattr(rs.pq, "write_table", crash)
    with pytest.raises(KeyboardInterrupt):
        add_columns(path, {"reward": pa.array([1.0] * 4, pa.float32())})
    assert read_rollouts(path).num_rows == 4 and "reward" not in read_rollouts(path).column_names


def test_temporary_files_are_invisible_to_datasets(tmp_path):
    path = rollout_path(tmp_path, "r1", 0, 0)
    write_atomic(_rows(), path)
    (path.parent / ".step=1.parquet.deadbeef.tmp").write_bytes(b"PAR1 partial")  # a crashed writer's leftover
    assert open_run(tmp_path, "r1").to_table().num_rows == 4


def test_partition_filters_through_pyarrow_dataset(tmp_path):
    for it in range(2):
        for step in range(3):
            write_atomic(_rows(n=2 + step, G=1, seed=10 * it + step), rollout_path(tmp_path, "r1", it, step))
    dset = open_run(tmp_path, "r1")
    assert dset.to_table().num_rows == 2 * (2 + 3 + 4)
    one = dset.to_table(filter=(ds.field("iteration") == 1) & (ds.field("step") == 2))
    assert one.num_rows == 4 and set(one.column("seed").to_pylist()) == {12}
    it0 = dset.to_table(filter=ds.field("iteration") == 0, columns=["seed", "correct"])
    assert it0.num_rows == 9 and set(it0.column("seed").to_pylist()) == {0, 1, 2}


def test_added_columns_keep_the_schema(tmp_path):
    path = write_atomic(_rows(), rollout_path(tmp_path, "r1", 0, 0))
    add_columns(path, {"reward": pa.array([0.0, 1.0, 1.0, 1.0], pa.float32())})
    back = read_rollouts(path)
    assert back.column_names == ROLLOUT_SCHEMA.names + ["reward"]
    assert back.select(ROLLOUT_SCHEMA.names).schema.equals(ROLLOUT_SCHEMA)


def test_rollout_tensors_pad_without_retokenising(tmp_path):
    path = write_atomic(_rows(), rollout_path(tmp_path, "r1", 0, 0))
    b = rollout_tensors(read_rollouts(path))
    assert b.old_logprobs.shape == b.mask.shape == (4, 4)
    assert b.mask.sum(1).tolist() == [1, 2, 3, 4] == b.completion_lens.tolist()
    assert b.completion_ids[2] == [1, 2, 3] and b.prompt_ids[3] == [5, 6, 8]
    assert torch.allclose(b.old_logprobs[2], torch.tensor([-0.5, -1.0, -1.5, 0.0]))
    assert (b.old_logprobs[~b.mask] == 0).all()
    assert rollout_tensors(read_rollouts(path), width=6).mask.shape == (4, 6)


def test_rollout_metrics_by_hand(tmp_path):
    """Two groups of G=2; every figure below is worked out by hand."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.step_metrics import rollout_metrics

    path = tmp_path / "step=0.parquet"
    pq.write_table(pa.table({
        "reward": [1.0, 0.0, 1.0, 1.0], "correct": [True, False, True, True], "completion_length": [2, 1, 3, 2],
        "truncated": [False, False, True, False],
        "advantages": pa.array([[0.5, 0.5], [-0.5], [0.0, 0.0, 0.0], [0.0, 0.0]], type=pa.list_(pa.float32())),
    }), path)
    m = rollout_metrics(path, group_size=2)
    assert m == pytest.approx({
        "reward_mean": 0.75, "reward_std": 0.5, "accuracy": 0.75, "zero_std_group_frac": 0.5,
        "advantage_mean": 0.5 / 8, "advantage_abs_mean": 1.5 / 8, "completion_length_mean": 2.0,
        "completion_tokens": 8.0, "truncation_rate": 0.25})

