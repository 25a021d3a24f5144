"""DAPO's soft overlong penalty (arXiv 2503.14476, eq. 13) as the built-in reward source `overlong`."""
import pytest

from configs.schema import ConfigError, RewardConfig, build_config
from models.rewards import overlong_penalty
from stages.rewards import RewardError, score_rollouts
from tests.test_reward_models import COMPLETIONS, rollout_rows, rollout_table


def test_penalty_is_zero_before_the_buffer_then_falls_linearly_to_minus_one():
    # L_max = 64, L_cache = 16: free up to 48 tokens, -1/16 per token after, -1 at and past the limit
    lengths = [0, 47, 48, 49, 52, 56, 63, 64, 65, 1000]
    assert [overlong_penalty(n, 64, 16) for n in lengths] == \
        [0.0, 0.0, 0.0, -0.0625, -0.25, -0.5, -0.9375, -1.0, -1.0, -1.0]
    for buffer in (0, 64):
        with pytest.raises(ValueError, match=rf"overlong buffer \({buffer}\) must be above 0 and below"):
            overlong_penalty(10, 64, buffer)


def test_the_buffer_must_fit_below_the_sampling_limit_when_overlong_is_a_source():
    cfg = build_config({"reward": {"sources": [{"name": "overlong"}]}})
    assert (cfg.reward.overlong_buffer, cfg.sampling.max_new_tokens) == (16, 64)
    with pytest.raises(ConfigError, match=r"^invalid config: reward: overlong_buffer \(8\) must be below "
                                          r"sampling\.max_new_tokens \(8\)"):
        build_config({"sampling": {"max_new_tokens": 8},
                      "reward": {"sources": [{"name": "verifier"}, {"name": "overlong"}], "overlong_buffer": 8}})
    assert build_config({"sampling": {"max_new_tokens": 8}}).reward.overlong_buffer == 16  # unused: not checked
    with pytest.raises(ConfigError, match=r"reward\.overlong_buffer: Input should be greater than 0"):
        build_config({"reward": {"overlong_buffer": 0}})


def test_overlong_scores_through_score_rollouts_with_weights(tiny):
    _, tok = tiny
    completions = ["#### 36", COMPLETIONS[1], COMPLETIONS[3]]  # right and short, wrong, right
    table = rollout_table(rollout_rows(tok, completions))
    assert table.column("completion_length").to_pylist() == [7, 22, 23]  # tokens + EOS
    # L_max = 23, L_cache = 4: 7 tokens free; 22 -> (19 - 22) / 4 = -0.75; 23 (the limit) -> -1
    cfg = RewardConfig(sources=[{"name": "verifier"}, {"name": "overlong", "weight": 0.5}], overlong_buffer=4)
    rows = score_rollouts(table, cfg, tokenizer=tok, max_new_tokens=23).to_pylist()
    assert [r["reward_overlong"] for r in rows] == [0.0, -0.75, -1.0]
    assert [r["reward"] for r in rows] == [1.0, 0.5 * -0.75, 1.0 + 0.5 * -1.0]
    # process view: the penalty on the last step (the verifier's step labels elsewhere)
    assert rows[1]["step_rewards"] == [1.0, 0.0, 0.0 + 0.5 * -0.75]
    with pytest.raises(RewardError, match="'overlong' is configured but no max_new_tokens was given"):
        score_rollouts(table, cfg, tokenizer=tok)
