"""Replay buffer: exact mix size, provenance, seeded determinism, retraining end to end."""
import json
import shutil

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from configs.schema import RewardModelConfig
from models.reward_model import HEAD_FILE, META_FILE, ValueHeadRewardModel
from stages.reward_training import (RM_DATA_SCHEMA, prepare_rm_data, replay_count, replay_sample, retrain_reward_model,
                                    train_initial_reward_model)
from stages.rollout_store import write_atomic
from stages.run_layout import RunLayout
from tests.test_reward_models import COMPLETIONS, rollout_rows, rollout_table


def rm_data_path(run, iteration):
    return RunLayout(run).rm_data(iteration)


pytestmark = pytest.mark.usefixtures("one_thread")


def fake_rows(n: int, iteration: int) -> pa.Table:
    """n rm rows whose question ids name their iteration."""
    return pa.Table.from_pylist([{
        "question_id": f"it{iteration}-q{i}", "sample_index": 0, "prompt_ids": [10, 11], "completion_ids": [5, 6],
        "outcome_label": float(i % 2), "step_ends": [1], "step_labels": [float(i % 2)], "step_label_method": "rule",
        "source": f"iteration={iteration}", "policy_version": 0,
    } for i in range(n)], schema=RM_DATA_SCHEMA)


@pytest.fixture
def buffer(tmp_path):
    """A run folder whose replay buffer holds iterations 0, 1, 2 with 600, 300, 100 rows."""
    for it, n in [(0, 600), (1, 300), (2, 100)]:
        write_atomic(fake_rows(n, it), rm_data_path(tmp_path, it))
    return tmp_path


@pytest.mark.parametrize("n_new,ratio,expected", [(90, 0.1, 10), (900, 0.1, 100), (100, 0.1, 11), (5, 0.1, 1),
                                                  (4, 0.1, 0), (100, 0.0, 0), (100, 0.5, 100), (30, 0.25, 10)])
def test_replay_count_rule(n_new, ratio, expected):
    assert replay_count(n_new, ratio) == expected == round(ratio * n_new / (1 - ratio))
    with pytest.raises(ValueError):
        replay_count(10, 1.0)


def test_replay_size_and_provenance(buffer):
    # Iteration 3 brings 1800 new rows: the replay is exactly 200 rows, 10% of the 2000-row mix,
    # drawn from iterations 0-2 only, in proportion to their sizes (600:300:100 of 1000).
    replay = replay_sample(buffer, 3, 1800, 0.1, seed=0)
    assert replay.num_rows == 200 and replay.num_rows / (1800 + replay.num_rows) == pytest.approx(0.1)
    origin = replay.column("replay_iteration").to_pylist()
    counts = {j: origin.count(j) for j in (0, 1, 2)}
    assert sum(counts.values()) == 200
    assert all(q.startswith(f"it{j}-") for q, j in zip(replay.column("question_id").to_pylist(), origin))
    assert counts[0] == pytest.approx(120, abs=25) and counts[1] == pytest.approx(60, abs=20)
    assert counts[2] == pytest.approx(20, abs=13)
    assert len(set(replay.column("question_id").to_pylist())) == 200  # without replacement
    # Only earlier iterations: retraining iteration 1 replays iteration 0 alone.
    assert set(replay_sample(buffer, 1, 900, 0.1, seed=0).column("replay_iteration").to_pylist()) == {0}
    # Nothing earlier (initial training) or ratio 0: no replay.
    assert replay_sample(buffer, 0, 100, 0.1, seed=0).num_rows == 0
    assert replay_sample(buffer, 3, 100, 0.0, seed=0).num_rows == 0
    # Buffer smaller than asked: all of it, never duplicates.
    assert replay_sample(buffer, 1, 9000, 0.1, seed=0).num_rows == 600


def test_replay_uniform_over_all_earlier_rows(buffer):
    # Over many seeds every earlier row is equally likely: the mean draw share per iteration matches its size.
    total = {0: 0, 1: 0, 2: 0}
    for seed in range(40):
        for j in replay_sample(buffer, 3, 900, 0.1, seed=seed).column("replay_iteration").to_pylist():
            total[j] += 1
    n = sum(total.values())
    assert n == 40 * 100
    assert [total[j] / n for j in (0, 1, 2)] == pytest.approx([0.6, 0.3, 0.1], abs=0.02)


def test_replay_is_deterministic_with_a_seed(buffer):
    a = replay_sample(buffer, 3, 900, 0.1, seed=7)
    b = replay_sample(buffer, 3, 900, 0.1, seed=7)
    c = replay_sample(buffer, 3, 900, 0.1, seed=8)
    assert a.equals(b)
    assert a.column("question_id").to_pylist() != c.column("question_id").to_pylist()


def test_buffer_is_inspectable_hive_parquet(buffer):
    d = ds.dataset(buffer / "rm_data", format="parquet", partitioning="hive")
    t = d.to_table()
    assert t.num_rows == 1000
    assert sorted(set(t.column("iteration").to_pylist())) == [0, 1, 2]


def test_initial_training_then_retrain_with_replay(tiny, tiny_dir, tmp_path):
    _, tok = tiny
    run = tmp_path / "runs" / "r1"
    # Iteration 0 (SFT samples) and iteration 1 (RL samples): 8 questions x 4 completions each.
    for it in (0, 1):
        rows = [r for q in range(8) for r in rollout_rows(tok, COMPLETIONS, question_id=f"it{it}-q{q}")]
        train_path, eval_path = prepare_rm_data(rollout_table(rows), run, it, tokenizer=tok, eval_fraction=0.25, seed=0)
        assert train_path == RunLayout(run).rm_data(it) and eval_path == RunLayout(run).rm_eval(it)
        n_train, n_eval = pq.read_metadata(train_path).num_rows, pq.read_metadata(eval_path).num_rows
        assert n_train + n_eval == 32 and n_eval % 4 == 0 and n_eval > 0  # held out by whole questions
        held = set(pq.read_table(eval_path).column("question_id").to_pylist())
        assert not held & set(pq.read_table(train_path).column("question_id").to_pylist())
    cfg = RewardModelConfig(epochs=1, batch_size=16, lr=1e-3, replay_ratio=0.1)
    ckpt0, m0 = train_initial_reward_model(str(tiny_dir), "outcome", run, cfg, seed=0, pad_id=tok.pad_token_id)
    assert ckpt0 == RunLayout(run).reward_model("outcome", 0) == run / "checkpoints" / "outcome_rm" / "iteration=0"
    assert "eval_auc" in m0 and "eval_majority_accuracy" in m0
    n_new = pq.read_metadata(rm_data_path(run, 1)).num_rows
    ckpt1, m1 = retrain_reward_model(ckpt0, rm_data_path(run, 1), run, 1, cfg, seed=0)
    assert ckpt1 == run / "checkpoints" / "outcome_rm" / "iteration=1"
    assert m1["n_new"] == n_new and m1["n_replay"] == replay_count(n_new, 0.1) == m1["replay_from_iteration_0"]
    assert m1["train_examples"] == n_new + m1["n_replay"]
    assert {"eval_it0_auc", "eval_it1_auc", "eval_auc"} <= set(m1) and m1["eval_auc"] == m1["eval_it0_auc"]
    assert json.loads((ckpt1 / META_FILE).read_text())["kind"] == "outcome" and (ckpt1 / HEAD_FILE).exists()
    # Same buffer, same seed: the same retrained model (the replay draw and the training order are seeded).
    run2 = tmp_path / "runs" / "r2"
    shutil.copytree(run / "rm_data", run2 / "rm_data")
    ckpt2, m2 = retrain_reward_model(ckpt0, rm_data_path(run2, 1), run2, 1, cfg, seed=0, eval_paths={})
    a, b = ValueHeadRewardModel.from_pretrained(ckpt1), ValueHeadRewardModel.from_pretrained(ckpt2)
    assert m2["train_loss_first"] == m1["train_loss_first"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
