"""How an evaluation's sampled scores are read and reported (stages.evaluation, the flow's summary)."""
from flows.iterative_grpo import eval_line, sampled_summary
from stages.evaluation import sampled_scores

BEFORE = {"accuracy": 0.1, "n": 500, "sample_k": 8.0, "maj_at_8": 0.234, "pass_at_8": 0.562, "sample_questions": 64.0}
AFTER = {"accuracy": 0.352, "n": 500, "sample_k": 8.0, "maj_at_8": 0.312, "pass_at_8": 0.578, "sample_questions": 64.0}


def test_sampled_scores_are_k_maj_and_pass_or_none_when_nothing_was_sampled():
    assert sampled_scores(BEFORE) == (8, 0.234, 0.562)
    assert sampled_scores({"accuracy": 0.1, "n": 500}) is None  # loop.eval_samples == 0


def test_the_summary_reports_maj_and_pass_before_and_after_and_nothing_without_both():
    assert sampled_summary(BEFORE, AFTER) == "; Maj@8 0.234 -> 0.312, Pass@8 0.562 -> 0.578 (64 questions, 8 samples each)"
    assert sampled_summary({}, AFTER) == ""  # a run started before evaluations sampled
    assert eval_line(BEFORE) == ("greedy accuracy 0.100 on 500 held-out questions; Maj@8 0.234, Pass@8 0.562 "
                                 "on the first 64")
    assert eval_line({"accuracy": 0.1, "n": 500}) == "greedy accuracy 0.100 on 500 held-out questions"
