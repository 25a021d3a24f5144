"""MLflow tracking of a run: committed metrics reach MLflow once, whatever a kill interrupted."""


def test_committed_records_mlflow_lacks_are_sent_once_and_uncommitted_ones_never(tmp_path):
    """A killed process may die with records committed but still queued for MLflow, and with ledger
    lines past the last commit (work it never finished). The resumed run cuts the latter and sends
    exactly the committed records MLflow lacks, each once."""
    from configs import PipelineConfig
    from stages.evaluation import Evaluation
    from stages.run_layout import RunLayout
    from stages.run_state import MetricRecord, RunState, commit, committed_records, cut_uncommitted, read_state
    from tasks import tracking

    cfg = PipelineConfig(storage={"artifacts_root": str(tmp_path)}, run_id="r1")
    run = tracking.open_run(cfg, "r1")
    layout = RunLayout.of(tmp_path, "r1")
    state = RunState(run_id="r1", policy="p", initial_eval=Evaluation(accuracy=0.5, answered=1.0, mean_length=3.0, n=4))
    records = [MetricRecord(step=s, metrics={"step_seconds": 1.0 + s, "loss": 0.1 * s}) for s in range(4)]
    records.append(MetricRecord(step=2, prefix="eval/", metrics={"accuracy": 0.25, "auc": float("nan")}))
    state = commit(layout, state, records[:2], step=1)
    state = commit(layout, state, records[2:], step=3)
    with open(layout.metrics, "a") as f:  # a step the killed process recorded but never committed
        f.write(MetricRecord(step=4, metrics={"step_seconds": 9.0}).model_dump_json() + "\n")
    tracking.log_records(cfg, run, records[:2], synchronous=True)  # what had reached MLflow before the kill

    state = read_state(layout)
    cut_uncommitted(layout, state)
    assert [r.step for r in committed_records(layout, state)] == [0, 1, 2, 3, 2]
    assert committed_records(layout, state)[-1].metrics == {"accuracy": 0.25}  # NaN left out, as MLflow would
    assert tracking.send_missing(cfg, run, committed_records(layout, state)) == 3
    client = tracking.client_for(cfg)
    assert sorted((m.step, m.value) for m in client.get_metric_history(run, "step_seconds")) == \
        [(0, 1.0), (1, 2.0), (2, 3.0), (3, 4.0)]
    assert [m.step for m in client.get_metric_history(run, "eval/accuracy")] == [2]
    assert tracking.send_missing(cfg, run, committed_records(layout, state)) == 0  # idempotent
    assert len(client.get_metric_history(run, "loss")) == 4


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


def test_two_runs_creating_the_embedded_store_together_both_get_it(tmp_path):
    """Two processes opening their MLflow runs on a fresh artifacts root at the same moment: the store's
    creation (schema migration) and the experiment's are done once, under a lock; both runs exist."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from configs import PipelineConfig; from tasks import tracking; "
            "sys.stdin.read(); "  # both wait here, past their imports, for the same starting signal
            f"cfg = PipelineConfig(storage={{'artifacts_root': {str(tmp_path)!r}}}); "
            "print(tracking.open_run(cfg, sys.argv[1]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, name], cwd=Path(__file__).resolve().parents[1],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=os.environ) for name in ("a", "b")]
    for p in procs:  # released together, each once its imports are done
        p.stdin.write("go")
        p.stdin.close()
    errs = [p.stderr.read() for p in procs]
    assert [p.wait(timeout=300) for p in procs] == [0, 0], [err[-2000:] for err in errs]
    from configs import PipelineConfig
    from tasks import tracking

    client = tracking.client_for(PipelineConfig(storage={"artifacts_root": str(tmp_path)}))
    (exp,) = [e for e in client.search_experiments() if e.name == "iterative-grpo"]
    assert {r.data.tags["pipeline_run_id"] for r in client.search_runs([exp.experiment_id])} == {"a", "b"}
