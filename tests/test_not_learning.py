"""Steps that learn nothing are said out loud: a warning and an MLflow tag after several in a row."""
import logging

from configs import PipelineConfig
from tasks import journal


def test_flat_steps_in_a_row_warn_once_and_tag_the_run(monkeypatch):
    tags, logger = [], logging.getLogger("not-learning-test")
    monkeypatch.setattr(journal, "get_run_logger", lambda: logger)
    monkeypatch.setattr(journal.tracking, "set_tags", lambda cfg, run_id, t: tags.append((run_id, t)))
    run = journal.RunJournal.__new__(journal.RunJournal)  # only what the warning reads
    run.cfg, run.mlflow_run_id, run._flat_steps = PipelineConfig(grpo={"warn_after_flat_steps": 3}), "mlf", 0
    for step, flat in enumerate([True, True, False, True, True, True, True]):
        run._warn_if_not_learning(step, flat)
    assert len(tags) == 1 and tags[0][0] == "mlf"
    message = tags[0][1]["warning.not_learning"]
    assert message.startswith("3 steps in a row (to step 5) learned nothing") and "reward.verifier.last_number" in message
