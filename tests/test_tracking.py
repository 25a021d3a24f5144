"""MLflow tracking of a run: step metrics survive a kill between recording and sending."""


def test_resume_logging_resends_recorded_steps_mlflow_lacks(tmp_path):
    """A killed process may die with step metrics recorded locally but still queued for MLflow: the
    resumed run sends exactly the recorded steps MLflow lacks, each once, and nothing past the last
    completed step (those steps are redone and logged then)."""
    from configs import PipelineConfig
    from stages.checkpoints import append_step_metrics, read_step_metrics
    from tasks import tracking

    cfg = PipelineConfig(storage={"artifacts_root": str(tmp_path)})
    run = tracking.open_run(cfg, "r1")
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    for step in range(5):
        append_step_metrics(run_dir, step, {"step_seconds": 1.0 + step, "loss": 0.1 * step})
    append_step_metrics(run_dir, 3, {"step_seconds": 9.0, "loss": 0.9})  # step 3 redone after a crash
    with open(run_dir / "step_metrics.jsonl", "a") as f:
        f.write('{"step": 5, "metr')  # the line a kill cut short
    for step in range(2):  # what had reached MLflow before the kill
        tracking.log_metrics(cfg, run, {"step_seconds": 1.0 + step}, step)

    assert list(read_step_metrics(run_dir)) == [0, 1, 2, 3, 4]
    assert tracking.resume_logging(cfg, run, run_dir, done_step=3) == 3
    hist = tracking.client_for(cfg).get_metric_history(run, "step_seconds")
    assert sorted((m.step, m.value) for m in hist) == [(0, 1.0), (1, 2.0), (2, 3.0), (3, 9.0)]
    assert tracking.resume_logging(cfg, run, run_dir, done_step=3) == 3  # idempotent
    assert len(tracking.client_for(cfg).get_metric_history(run, "loss")) == 2  # steps 2 and 3


def test_importing_the_flows_turns_usage_telemetry_off_unless_the_environment_says_otherwise():
    """A fresh interpreter (none of the variables set, but one the user chose) imports the flows: the
    unset ones get their off values, the user's value is kept."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    names = ["PREFECT_SERVER_ANALYTICS_ENABLED", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"]
    env = {k: v for k, v in os.environ.items() if k not in names}
    env["MLFLOW_DISABLE_TELEMETRY"] = "false"
    code = f"import json, os, flows.iterative_grpo; print(json.dumps({{k: os.environ.get(k) for k in {names!r}}}))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1"}
