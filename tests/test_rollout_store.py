"""The rollout store: schema round-trip, atomic writes, hive partitions, per-step metrics."""
import datetime as dt

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from stages import rollout_store as rs
from stages.rollout_store import ROLLOUT_SCHEMA, open_rollouts, read_rollouts, with_columns, write_atomic
from stages.run_layout import RunLayout


def rollout_path(root, run_id, iteration, step):
    return RunLayout.of(root, run_id).rollouts(iteration, step)


def open_run(root, run_id):
    return open_rollouts(RunLayout.of(root, run_id).rollouts_dir)


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
            "correct": r != 0, "policy_version": 3, "sampler_backend": "hf", "seed": seed,
            "sampled_at": dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
        })
    return pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA)


def test_layout_is_plain_hive(tmp_path):
    p = rollout_path(tmp_path, "run-a", 2, 7)
    assert p == tmp_path / "runs" / "run-a" / "rollouts" / "iteration=2" / "step=7" / "part-0.parquet"


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
        write_atomic(with_columns(_rows(), {"reward": pa.array([1.0] * 4, pa.float32())}), path)
    assert read_rollouts(path).num_rows == 4 and "reward" not in read_rollouts(path).column_names


def test_temporary_files_are_invisible_to_datasets(tmp_path):
    path = rollout_path(tmp_path, "r1", 0, 0)
    write_atomic(_rows(), path)
    (path.parent / ".part-0.parquet.deadbeef.tmp").write_bytes(b"PAR1 partial")  # a crashed writer's leftover
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


def test_added_columns_keep_the_schema():
    table = with_columns(_rows(), {"reward": pa.array([0.0, 1.0, 1.0, 1.0], pa.float32())})
    assert table.column_names == ROLLOUT_SCHEMA.names + ["reward"]
    assert table.select(ROLLOUT_SCHEMA.names).schema.equals(ROLLOUT_SCHEMA)
    replaced = with_columns(table, {"reward": pa.array([1.0] * 4, pa.float32())})
    assert replaced.column_names == table.column_names and replaced.column("reward").to_pylist() == [1.0] * 4
    with pytest.raises(ValueError, match="3 values for 4 rows"):
        with_columns(table, {"x": pa.array([1, 2, 3])})


def test_rollout_metrics_by_hand():
    """Two groups of G=2; every figure below is worked out by hand."""
    from stages.step_metrics import rollout_metrics

    table = pa.table({
        "reward": [1.0, 0.0, 1.0, 1.0], "correct": [True, False, True, True], "completion_length": [2, 1, 3, 2],
        "truncated": [False, False, True, False],
        "advantages": pa.array([[0.5, 0.5], [-0.5], [0.0, 0.0, 0.0], [0.0, 0.0]], type=pa.list_(pa.float32())),
        "reward_errors": [[], ["outcome_rm", "process_rm"], [], ["outcome_rm"]],
    })
    m = rollout_metrics(table, group_size=2)
    assert m == pytest.approx({
        "reward_mean": 0.75, "reward_std": 0.5, "accuracy": 0.75, "zero_std_group_frac": 0.5,
        "advantage_mean": 0.5 / 8, "advantage_abs_mean": 1.5 / 8, "completion_length_mean": 2.0,
        "completion_tokens": 8.0, "truncation_rate": 0.25, "reward_zeroed_rows": 2.0,
        "reward_zeroed_rows/outcome_rm": 2.0, "reward_zeroed_rows/process_rm": 1.0})



def test_reward_hacking_monitor_by_hand():
    """Five outputs, two right. outcome_rm ranks pairs (right, wrong): of the 6, (0.9 > 0.2), (0.9 > 0.7),
    (0.9 > 0.4), (0.6 > 0.2), (0.6 < 0.7), (0.6 > 0.4): AUC 5/6. At 0.5 it calls 0.9, 0.6, 0.7 right: 4 of 5
    agree with the verifier. Gap: mean 2.8 / 5 = 0.56 minus accuracy 0.4."""
    from configs.schema import RewardConfig
    from stages.step_metrics import agreement_note, reward_model_agreement, rm_thresholds

    table = pa.table({"correct": [True, False, True, False, False],
                      "reward_outcome_rm": [0.9, 0.2, 0.6, 0.7, 0.4],
                      "reward_verifier": [1.0, 0.0, 1.0, 0.0, 0.0]})
    cfg = RewardConfig(sources=[{"name": "verifier"}, {"name": "outcome_rm"}])
    assert rm_thresholds(cfg) == {"outcome_rm": 0.5}
    assert rm_thresholds(RewardConfig(sources=[{"name": "helpful", "model": "some/rm"}])) == {"helpful": 0.0}
    m = reward_model_agreement(table, rm_thresholds(cfg))
    assert m == pytest.approx({"rm_auc/outcome_rm": 5 / 6, "rm_accuracy/outcome_rm": 0.8,
                               "rm_gap/outcome_rm": 0.56 - 0.4})
    assert agreement_note(m) == " | outcome_rm vs verifier: AUC 0.83, gap +0.16"
    # logits: the threshold is 0; all outputs right: no AUC (ranking is undefined), accuracy and gap still
    logit_cfg = RewardConfig(sources=[{"name": "outcome_rm"}], rm_score="logit")
    all_right = table.set_column(0, "correct", pa.array([True] * 5))
    m = reward_model_agreement(all_right, rm_thresholds(logit_cfg))
    assert m == pytest.approx({"rm_accuracy/outcome_rm": 1.0, "rm_gap/outcome_rm": 0.56 - 1.0})
