"""DAPO's dynamic sampling: which groups a step keeps (stages/dynamic_sampling.py), and the flow's rounds
(flows/iterative_grpo.py `scored_groups`) with a fake sampler and scorer in place of the tasks."""
from types import SimpleNamespace

import pyarrow as pa
import pytest

import flows.iterative_grpo as fl
from configs import ConfigError, PipelineConfig, build_config
from problems.datasets import draw_questions, write_problems
from stages.advantages import compute_advantages
from stages.dynamic_sampling import drawn_metrics, dynamic_note, informative_groups, keep_informative
from stages.rollout_store import ROLLOUT_SCHEMA, read_rollouts, with_columns, write_atomic

# One outcome advantage of a two-output group scored [1, 0]: (1 - 0.5) / (sample std 0.70711 + eps 1e-4).
A = 0.5 / (0.5 ** 0.5 + 1e-4)  # 0.70700


def _scored(question_ids: list[str], step_rewards: list[list[list[float]]], seed: int = 0) -> pa.Table:
    """A scored table, group after group: `step_rewards[g][s]` the step rewards of output s of group g
    (each completion two tokens long; its outcome reward is its last step's)."""
    rows = [{"run_id": "r", "question_id": q, "group_index": g, "sample_index": s, "prompt_ids": [1],
             "completion_ids": [2, 3], "old_logprobs": [-1.0, -1.0], "completion_length": 2, "truncated": False,
             "seed": seed}
            for g, (q, group) in enumerate(zip(question_ids, step_rewards)) for s in range(len(group))]
    outputs = [steps for group in step_rewards for steps in group]
    return with_columns(pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA), {
        "reward": pa.array([steps[-1] for steps in outputs], pa.float32()),
        "step_ends": pa.array([[1] if len(steps) == 1 else [0, 1] for steps in outputs], pa.list_(pa.int32())),
        "step_rewards": pa.array(outputs, pa.list_(pa.float32())),
    })


def _outcome(question_ids: list[str], rewards: list[list[float]], seed: int = 0) -> pa.Table:
    return _scored(question_ids, [[[r] for r in group] for group in rewards], seed)


def test_outcome_groups_are_informative_when_their_rewards_differ():
    table = _outcome(["a", "b", "c", "d"], [[1, 1, 1], [0, 1, 0], [0, 0, 0], [0.5, 0.5, 0.25]])
    assert informative_groups(table, 3, "outcome") == [1, 3]


def test_process_groups_are_informative_when_their_pooled_step_rewards_differ():
    table = _scored(["a", "b", "c"], [
        [[0.0, 0.5], [1.0, 0.5]],  # outcome rewards equal (0.5, 0.5), steps differ: a process signal
        [[0.3], [0.3, 0.3]],       # one value throughout: flat
        [[1.0, 0.7], [0.7]],       # outcome rewards equal (0.7, 0.7), one step differs
    ])
    assert informative_groups(table, 2, "process") == [0, 2]
    assert informative_groups(table, 2, "outcome") == []  # the outcome view would drop both
    # The criterion is the estimator's: exactly these groups get a nonzero advantage.
    adv = compute_advantages(table, supervision="process", group_size=2).column("advantages").to_pylist()
    assert [g for g in range(3) if any(a != 0 for row in adv[2 * g:2 * g + 2] for a in row)] == [0, 2]

    outcome_only = _scored(["a"], [[[0.5], [0.5, 0.5]]])  # outcome rewards equal and steps all 0.5
    differing_outcome = with_columns(outcome_only, {"reward": pa.array([1.0, 0.0], pa.float32())})
    assert informative_groups(differing_outcome, 2, "process") == []  # rewards differ, step rewards do not


def test_keep_informative_takes_the_first_groups_in_draw_order_and_renumbers_them(tmp_path):
    rounds = [_outcome(["a", "b", "c"], [[0, 0], [1, 0], [1, 1]], seed=10),
              _outcome(["d", "e", "f"], [[0, 1], [1, 1], [0, 1]], seed=11)]
    table = keep_informative(rounds, 2, 2, "outcome")  # informative in draw order: b, d, f; two wanted
    assert table.column("question_id").to_pylist() == ["b", "b", "d", "d"]
    assert table.column("group_index").to_pylist() == [0, 0, 1, 1]
    assert table.column("sample_index").to_pylist() == [0, 1, 0, 1]
    assert table.column("seed").to_pylist() == [10, 10, 11, 11]
    assert table.column("reward").to_pylist() == [1, 0, 0, 1]
    assert table.schema.field("group_index").type == pa.int32()
    assert drawn_metrics(table) == {"dynamic_groups_drawn": 6.0, "dynamic_groups_flat": 3.0, "dynamic_rounds": 1.0}

    # The layout check passes, the advantages are the kept groups' own, and the counts survive both
    # compute_advantages and the step's Parquet file (what a redone step reads back).
    table = compute_advantages(table, supervision="outcome", group_size=2)
    assert [row[0] for row in table.column("advantages").to_pylist()] == pytest.approx([A, -A, -A, A], abs=1e-5)
    stored = read_rollouts(write_atomic(table, tmp_path / "part-0.parquet"))
    assert drawn_metrics(stored) == {"dynamic_groups_drawn": 6.0, "dynamic_groups_flat": 3.0, "dynamic_rounds": 1.0}


def test_keep_informative_short_of_groups_keeps_all_it_found():
    rounds = [_outcome(["a", "b"], [[0, 0], [1, 1]]), _outcome(["c", "d"], [[1, 1], [1, 0]])]
    table = keep_informative(rounds, 2, 2, "outcome")
    assert table.column("question_id").to_pylist() == ["d", "d"] and table.column("group_index").to_pylist() == [0, 0]
    assert drawn_metrics(table) == {"dynamic_groups_drawn": 4.0, "dynamic_groups_flat": 3.0, "dynamic_rounds": 1.0}


def test_keep_informative_with_no_informative_group_keeps_the_first_round_as_it_is():
    rounds = [_outcome(["a", "b"], [[0, 0], [1, 1]]), _outcome(["c", "d"], [[1, 1], [0, 0]])]
    table = keep_informative(rounds, 2, 2, "outcome")
    assert table.column("question_id").to_pylist() == ["a", "a", "b", "b"]
    assert table.column("group_index").to_pylist() == [0, 0, 1, 1]
    assert drawn_metrics(table) == {"dynamic_groups_drawn": 4.0, "dynamic_groups_flat": 4.0, "dynamic_rounds": 1.0}


def test_a_step_without_dynamic_sampling_has_no_dynamic_metrics_or_note():
    assert drawn_metrics(_outcome(["a"], [[0, 1]])) == {} and dynamic_note({"reward_mean": 0.5}, 8) == ""


def test_the_step_line_says_what_was_drawn_and_when_the_step_is_short():
    full = {"dynamic_groups_drawn": 24.0, "dynamic_groups_flat": 14.0, "dynamic_rounds": 2.0}
    assert dynamic_note(full, 8) == " | dynamic sampling: 24 groups drawn in 2 extra round(s), 14 flat"
    short = {"dynamic_groups_drawn": 32.0, "dynamic_groups_flat": 29.0, "dynamic_rounds": 3.0}
    assert dynamic_note(short, 8) == (" | dynamic sampling: 32 groups drawn in 3 extra round(s), 29 flat, "
                                      "only 3 informative of the 8 wanted")


# ---- the flow's rounds, with the tasks replaced ----------------------------------------------------------

def _config(**sampling) -> PipelineConfig:
    return PipelineConfig(loop={"questions_per_step": 4}, sampling={"group_size": 2, **sampling})


@pytest.fixture
def train_path(tmp_path):
    problems = [{"id": f"q{i:02d}", "question": f"{i}?", "solution": f"#### {i}", "answer": str(i)} for i in range(20)]
    return str(write_problems(problems, tmp_path / "train.parquet"))


class FakeTasks:
    """sample_groups / score_rollouts stand-ins: round r's groups at the positions `informative[r]` score [1, 0],
    the rest [0, 0]; every call is recorded."""

    def __init__(self, informative: dict[int, set[int]]):
        self.informative, self.calls = informative, []

    def sample_groups(self, cfg, policy, questions, step, tokenizer, sampling_round=0, reference=None):
        self.calls.append(([q["id"] for q in questions], step, sampling_round))
        return _outcome([q["id"] for q in questions], [[0, 0]] * len(questions), seed=sampling_round)

    def score_rollouts(self, cfg, rollouts, tokenizer, reward_models):
        positions = self.informative.get(len(self.calls) - 1, set())
        rewards = [[1, 0] if g in positions else [0, 0] for g in range(rollouts.num_rows // 2)]
        return _outcome(rollouts.column("question_id").to_pylist()[::2], rewards,
                        seed=rollouts.column("seed")[0].as_py())


def _scored_groups(monkeypatch, cfg, train_path, informative, step=5):
    fake = FakeTasks(informative)
    monkeypatch.setattr(fl, "sample_groups", fake.sample_groups)
    monkeypatch.setattr(fl, "score_rollouts", fake.score_rollouts)
    run = SimpleNamespace(policy="policy", tokenizer="tokenizer", reference="reference", reward_models={})
    return fl.scored_groups(cfg, run, train_path, step), fake.calls


def test_rounds_of_new_questions_until_the_step_has_its_informative_groups(monkeypatch, train_path):
    cfg = _config(dynamic_sampling=True, dynamic_max_rounds=3)
    # Informative: 1 group in round 0, 2 in round 1 (3 < 4: go on), 2 in round 2 (5 >= 4: stop).
    table, calls = _scored_groups(monkeypatch, cfg, train_path, {0: {2}, 1: {0, 3}, 2: {1, 2}})
    assert [(step, r) for _, step, r in calls] == [(5, 0), (5, 1), (5, 2)]
    drawn = [ids for ids, _, _ in calls]
    assert len({q for ids in drawn for q in ids}) == 12  # every round draws questions not drawn before
    # Round 0 asks the questions a step asks without dynamic sampling.
    assert drawn[0] == [p["id"] for p in draw_questions(fl.train_problems(train_path), 4, "1234-0-5")]
    kept = [drawn[0][2], drawn[1][0], drawn[1][3], drawn[2][1]]  # the first four in draw order
    assert table.column("question_id").to_pylist()[::2] == kept
    assert table.column("group_index").to_pylist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert table.column("seed").to_pylist()[::2] == [0, 1, 1, 2]  # each row keeps its round's sampling
    assert drawn_metrics(table) == {"dynamic_groups_drawn": 12.0, "dynamic_groups_flat": 7.0, "dynamic_rounds": 2.0}

    # A step redone after a crash draws the very same questions.
    _, again = _scored_groups(monkeypatch, cfg, train_path, {0: {2}, 1: {0, 3}, 2: {1, 2}})
    assert again == calls


def test_always_flat_rewards_stop_at_the_cap_with_the_first_round(monkeypatch, train_path):
    cfg = _config(dynamic_sampling=True, dynamic_max_rounds=3)
    table, calls = _scored_groups(monkeypatch, cfg, train_path, {})
    assert [r for _, _, r in calls] == [0, 1, 2, 3]  # 1 + dynamic_max_rounds rounds, then no more
    assert table.column("question_id").to_pylist()[::2] == calls[0][0]
    assert drawn_metrics(table) == {"dynamic_groups_drawn": 16.0, "dynamic_groups_flat": 16.0, "dynamic_rounds": 3.0}


def test_the_rounds_stop_when_the_train_split_is_used_up(monkeypatch, tmp_path):
    problems = [{"id": f"q{i}", "question": "?", "solution": "#### 1", "answer": "1"} for i in range(6)]
    path = str(write_problems(problems, tmp_path / "six.parquet"))
    table, calls = _scored_groups(monkeypatch, _config(dynamic_sampling=True), path, {1: {1}})
    assert [len(ids) for ids, _, _ in calls] == [4, 2]  # round 2 finds no question left
    assert table.column("question_id").to_pylist() == [calls[1][0][1]] * 2
    assert drawn_metrics(table) == {"dynamic_groups_drawn": 6.0, "dynamic_groups_flat": 5.0, "dynamic_rounds": 1.0}


def test_without_dynamic_sampling_a_step_is_one_round_kept_whole(monkeypatch, train_path):
    table, calls = _scored_groups(monkeypatch, _config(), train_path, {})
    assert len(calls) == 1 and table.num_rows == 8 and drawn_metrics(table) == {}


def test_dynamic_max_rounds_must_be_positive():
    with pytest.raises(ConfigError, match=r"sampling\.dynamic_max_rounds: Input should be greater than 0"):
        build_config(overrides=["sampling.dynamic_max_rounds=0"])
