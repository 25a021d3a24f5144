"""MLflow tracking: one MLflow run per pipeline run, found again by its run_id on resume.

Metrics reach MLflow from the run's committed records (stages/run_state.py): sent once after each
commit (`log_records`), and on resume whatever a killed process committed but had not yet sent
(`send_missing`). So every metric is in MLflow once per step, whatever was killed when.
"""
from __future__ import annotations

import fcntl
import math
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import mlflow
import pyarrow as pa
from mlflow.data.dataset_source_registry import get_registered_sources
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from configs import PipelineConfig, dump_config
from stages.rollout_store import open_rollouts
from stages.run_state import MetricRecord

RUN_TAG = "pipeline_run_id"
# The experiment's kind for MLflow's UI: model training, so it opens on the runs and their charts (not
# on GenAI traces, and without guessing the kind from the first runs it finds).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def client_for(cfg: PipelineConfig) -> MlflowClient:
    return _client(cfg.mlflow_uri())


@lru_cache(maxsize=8)
def _client(uri: str) -> MlflowClient:
    with store_lock(uri):  # the client's constructor creates (and migrates) the store
        return MlflowClient(tracking_uri=uri)


@contextmanager
def store_lock(uri: str):
    """Held while the embedded SQLite store may be created or migrated, or the experiment created:
    two runs starting together would otherwise race in MLflow's schema migration (one dies). A no-op
    for other stores."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(uri[len("sqlite:///"):] + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def experiment_id(client: MlflowClient, cfg: PipelineConfig) -> str:
    with store_lock(cfg.mlflow_uri()):  # two runs must not both create it
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is not None:
            return exp.experiment_id
        location = (cfg.artifacts() / "mlartifacts").as_uri()
        return client.create_experiment(cfg.tracking.experiment, artifact_location=location, tags=EXPERIMENT_KIND)


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
        mlflow_run_id = client.create_run(exp_id, run_name=run_id, tags={RUN_TAG: run_id}).info.run_id
    if not found or not found[0].data.params:  # a process killed right after creating the run logged none
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


def log_records(cfg: PipelineConfig, mlflow_run_id: str, records: list[MetricRecord], synchronous: bool = False) -> None:
    """Committed metric records to MLflow, one batch each (asynchronous by default: the run's ledger
    holds them, and `send_missing` re-sends what a killed process lost)."""
    for r in records:
        log_metrics(cfg, mlflow_run_id, r.metrics, r.step, prefix=r.prefix, synchronous=synchronous)


def _marker(r: MetricRecord) -> str | None:
    """The MLflow key that tells whether record `r` arrived: its first finite metric (a batch is
    stored in one transaction, so one key stands for the record)."""
    return next((r.prefix + k for k, v in r.metrics.items() if math.isfinite(v)), None)


def send_missing(cfg: PipelineConfig, mlflow_run_id: str, records: list[MetricRecord]) -> int:
    """Send the committed records MLflow does not have (a killed process's unsent queue); returns how many."""
    wait_for_logging()
    client = client_for(cfg)
    logged: dict[str, set[int]] = {}
    missing = []
    for r in records:
        key = _marker(r)
        if key is None:
            continue
        if key not in logged:
            logged[key] = {m.step for m in client.get_metric_history(mlflow_run_id, key)}
        if r.step not in logged[key]:
            missing.append(r)
    log_records(cfg, mlflow_run_id, missing, synchronous=True)
    return len(missing)


def log_rollouts(cfg: PipelineConfig, mlflow_run_id: str, rollouts_dir: Path, name: str) -> Dataset:
    """The Parquet rollouts under `rollouts_dir` as a training dataset input of the run: what the policy
    learned from (lineage). Returns MLflow's record of it (name, digest). Safe to repeat: the run keeps
    one input per dataset name and digest."""
    table = open_rollouts(rollouts_dir).to_table()
    flat = table.select([f.name for f in table.schema if not pa.types.is_nested(f.type)])  # token ids etc.: no schema
    # Integer columns as float64: MLflow infers a dataset's schema like a model signature's and warns about
    # every integer column (no missing values in a model's input), which does not apply to a dataset.
    flat = flat.cast(pa.schema([pa.field(f.name, pa.float64()) if pa.types.is_integer(f.type) else f
                                for f in flat.schema]))
    dataset = mlflow.data.from_pandas(flat.to_pandas(), source=_local_source(rollouts_dir), name=name)
    training = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])
    client_for(cfg).log_inputs(mlflow_run_id, datasets=[training])
    return training.dataset


def _local_source(folder: Path):
    """MLflow's dataset source for a local folder, by its type: a path given as a string is matched against
    every registered source, and MLflow registers two alike local ones (for plain paths and file: URIs), so
    it warns that the source is ambiguous."""
    local = next(s for s in reversed(get_registered_sources()) if s._get_source_type() == "local")
    return local(Path(folder).resolve().as_uri())


def set_tags(cfg: PipelineConfig, mlflow_run_id: str, tags: dict[str, str]) -> None:
    client = client_for(cfg)
    for key, value in tags.items():
        client.set_tag(mlflow_run_id, key, value)


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
