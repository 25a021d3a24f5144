"""MLflow tracking: one MLflow run per pipeline run, found again by its run_id on resume."""
from __future__ import annotations

import math
import time
from functools import lru_cache
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from configs import PipelineConfig, dump_config
from stages.checkpoints import read_step_metrics

RUN_TAG = "pipeline_run_id"
STEP_KEY = "step_seconds"  # logged at every GRPO step: the highest step it has is the last one logged


def client_for(cfg: PipelineConfig) -> MlflowClient:
    return _client(cfg.mlflow_uri())


@lru_cache(maxsize=8)
def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def experiment_id(client: MlflowClient, cfg: PipelineConfig) -> str:
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    location = (cfg.artifacts() / "mlartifacts").as_uri()
    return client.create_experiment(cfg.tracking.experiment, artifact_location=location)


def open_run(cfg: PipelineConfig, run_id: str, flow_run_id: str | None = None) -> str:
    """The MLflow run of pipeline run `run_id`: the existing one on resume, else a new one with the
    flattened config as params and the resolved config as an artifact."""
    client = client_for(cfg)
    exp_id = experiment_id(client, cfg)
    found = client.search_runs([exp_id], filter_string=f"tags.{RUN_TAG} = '{run_id}'", max_results=1)
    if found:
        mlflow_run_id = found[0].info.run_id
        client.update_run(mlflow_run_id, status="RUNNING")
    else:
        run = client.create_run(exp_id, run_name=run_id, tags={RUN_TAG: run_id})
        mlflow_run_id = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in cfg.flat().items()]
        for i in range(0, len(params), 100):
            client.log_batch(mlflow_run_id, params=params[i:i + 100])
        client.log_text(mlflow_run_id, dump_config(cfg), "config.yaml")
    if flow_run_id:
        client.log_batch(mlflow_run_id, tags=[RunTag("prefect_flow_run_id", str(flow_run_id))])
    return mlflow_run_id


_PENDING: list = []  # MLflow RunOperations of asynchronous log_metrics calls not yet waited for


def log_metrics(cfg: PipelineConfig, mlflow_run_id: str, metrics: dict[str, float], step: int,
                prefix: str = "", synchronous: bool = True) -> None:
    """One batch per call (per-metric calls cost ~25 ms each on SQLite); non-finite values dropped.

    `synchronous=False` queues the batch on MLflow's logging thread (~5 ms instead of ~10-15 ms on
    the step's critical path); a caller that does so keeps its own durable record of the metrics, since
    a killed process loses the queue (the GRPO flow replays its step-metrics file on resume).
    """
    ts = int(time.time() * 1000)
    batch = [Metric(prefix + k, float(v), ts, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and math.isfinite(v)]
    for i in range(0, len(batch), 500):
        ops = client_for(cfg).log_batch(mlflow_run_id, metrics=batch[i:i + 500], synchronous=synchronous)
        if not synchronous:
            _PENDING.append(ops)


def wait_for_logging() -> None:
    """Block until every asynchronous `log_metrics` batch is in the store (before reading metrics back)."""
    while _PENDING:
        _PENDING.pop(0).wait()


def last_logged_step(cfg: PipelineConfig, mlflow_run_id: str, key: str) -> int:
    """The highest step at which `key` was logged (-1 if never): where a resumed run picks up logging."""
    wait_for_logging()
    return max((m.step for m in client_for(cfg).get_metric_history(mlflow_run_id, key)), default=-1)


def resume_logging(cfg: PipelineConfig, mlflow_run_id: str, run_dir: str | Path, done_step: int) -> int:
    """Re-send the step metrics a killed process had recorded (steps <= `done_step`, the last completed
    one) but not yet sent to MLflow; returns the last step MLflow now has."""
    logged = last_logged_step(cfg, mlflow_run_id, STEP_KEY)
    for step, metrics in read_step_metrics(run_dir).items():
        if logged < step <= done_step:
            log_metrics(cfg, mlflow_run_id, metrics, step)
            logged = step
    return logged


def log_artifact(cfg: PipelineConfig, mlflow_run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client = client_for(cfg)
    if Path(path).is_dir():
        client.log_artifacts(mlflow_run_id, str(path), artifact_path)
    else:
        client.log_artifact(mlflow_run_id, str(path), artifact_path)


def finish_run(cfg: PipelineConfig, mlflow_run_id: str, status: str = "FINISHED") -> None:
    wait_for_logging()
    client_for(cfg).set_terminated(mlflow_run_id, status=status)


def run_url(cfg: PipelineConfig, mlflow_run_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    exp_id = client_for(cfg).get_run(mlflow_run_id).info.experiment_id
    return f"{ui}/#/experiments/{exp_id}/runs/{mlflow_run_id}"
