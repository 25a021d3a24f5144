"""A user's reward function by import path: config checks, scores, both views, errors named and counted."""
import pytest

from configs.schema import RewardConfig
from stages.rewards import RewardError, reward_column, score_rollouts
from tests.test_reward_models import COMPLETIONS, rollout_rows, rollout_table

FN = "tests.reward_functions:"


def test_a_source_is_a_built_in_or_an_importable_function():
    assert RewardConfig(sources=[{"name": FN + "format_bonus"}]).sources[0].name == FN + "format_bonus"
    with pytest.raises(ValueError, match=r"(?s)sources\.0\.name.*'judge': not one of verifier, outcome_rm"):
        RewardConfig(sources=[{"name": "judge"}])
    with pytest.raises(ValueError, match=r"(?s)sources\.0\.name.*cannot import 'no_such_pkg\.rewards'"):
        RewardConfig(sources=[{"name": "no_such_pkg.rewards:f"}])
    with pytest.raises(ValueError, match=r"'tests\.reward_functions' has no 'nope'"):
        RewardConfig(sources=[{"name": FN + "nope"}])


def test_function_scores_add_to_the_reward_with_their_weights(tiny):
    """COMPLETIONS: right, slip (35), wrong (39), right + newline; every one has a '#### N' line, 24-25 chars."""
    _, tok = tiny
    table = rollout_table(rollout_rows(tok, COMPLETIONS))
    cfg = RewardConfig(sources=[{"name": "verifier"}, {"name": FN + "format_bonus", "weight": 0.5},
                                {"name": FN + "async_answer_length", "weight": 0.1}])
    t = score_rollouts(table, cfg, tokenizer=tok).to_pylist()
    assert [r[reward_column(FN + "format_bonus")] for r in t] == [1.0] * 4
    assert reward_column(FN + "format_bonus") == "reward_tests_reward_functions_format_bonus"
    assert [r["reward"] for r in t] == pytest.approx([1 + 0.5 + 0.2, 0.5 + 0.2, 0.5 + 0.2, 1 + 0.5 + 0.2])


def test_a_process_function_scores_each_step(tiny):
    _, tok = tiny
    table = rollout_table(rollout_rows(tok, COMPLETIONS[:2]))
    cfg = RewardConfig(supervision="process", sources=[{"name": FN + "equation_steps"}])
    t = score_rollouts(table, cfg, tokenizer=tok).to_pylist()
    assert [r["step_rewards"] for r in t] == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]  # '#### 36' is no equation
    assert [r["reward"] for r in t] == [0.0, 0.0]  # the outcome view of steps: the weakest


def test_errors_name_the_function_and_row_and_follow_on_error(tiny):
    _, tok = tiny
    table = rollout_table(rollout_rows(tok, COMPLETIONS, question_id="q7"))
    source = [{"name": FN + "fails_on_35"}]
    with pytest.raises(RewardError, match=r"'tests\.reward_functions:fails_on_35' failed on question_id='q7' "
                                          r"sample_index=1: ValueError: cannot score 35"):
        score_rollouts(table, RewardConfig(sources=source), tokenizer=tok)
    t = score_rollouts(table, RewardConfig(sources=source, on_error="zero"), tokenizer=tok).to_pylist()
    assert [r["reward"] for r in t] == [0.5, 0.0, 0.5, 0.5]
    assert [r["reward_errors"] for r in t] == [[], [FN + "fails_on_35"], [], []]
    with pytest.raises(RewardError, match=r"failed on every row of the step \(4\), e\.g\. question_id='q7' "
                                          r"sample_index=0: ValueError: returned 2 scores for 1 completions"):
        score_rollouts(table, RewardConfig(sources=[{"name": FN + "one_too_many"}], on_error="zero"), tokenizer=tok)
