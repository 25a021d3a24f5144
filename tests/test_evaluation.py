"""An evaluation's MLflow view and its words (stages.evaluation.Evaluation, the flow's summary)."""
from flows.iterative_grpo import sampled_summary
from stages.evaluation import Evaluation

BEFORE = Evaluation(accuracy=0.1, answered=0.9, mean_length=7.0, n=500, k=8, sample_questions=64, maj_at_k=0.234,
                    pass_at_k=0.562, pass_at_1=0.2)
AFTER = Evaluation(accuracy=0.352, answered=1.0, mean_length=24.0, n=500, k=8, sample_questions=64, maj_at_k=0.312,
                   pass_at_k=0.578, pass_at_1=0.3)
GREEDY_ONLY = Evaluation(accuracy=0.1, answered=0.9, mean_length=7.0, n=500)  # loop.eval_samples == 0


def test_metrics_name_k_in_the_sampled_keys_and_leave_them_out_when_nothing_was_sampled():
    assert BEFORE.metrics() == {"accuracy": 0.1, "answered": 0.9, "mean_length": 7.0, "n": 500.0, "maj_at_8": 0.234,
                                "pass_at_8": 0.562, "pass_at_1": 0.2, "sample_k": 8.0, "sample_questions": 64.0}
    assert GREEDY_ONLY.metrics() == {"accuracy": 0.1, "answered": 0.9, "mean_length": 7.0, "n": 500.0}


def test_the_log_line_and_the_summary_report_maj_and_pass_and_nothing_without_both():
    assert BEFORE.describe() == ("greedy accuracy 0.100 on 500 held-out questions; Maj@8 0.234, Pass@8 0.562 "
                                 "on the first 64")
    assert GREEDY_ONLY.describe() == "greedy accuracy 0.100 on 500 held-out questions"
    assert sampled_summary(BEFORE, AFTER) == "; Maj@8 0.234 -> 0.312, Pass@8 0.562 -> 0.578 (64 questions, 8 samples each)"
    assert sampled_summary(GREEDY_ONLY, AFTER) == ""
