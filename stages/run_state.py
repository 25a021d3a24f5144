"""What a run has done, as its folder says: `RunState` (state.json) and the metrics ledger (metrics.jsonl).

Work is done when a commit says so. `commit(layout, state, records)` appends the work's metric
records to the ledger, then atomically replaces state.json with the new state, which carries the
ledger's committed length. Ledger lines past that length come from work that a killed process never
committed (it is redone on resume): `cut_uncommitted` removes them. MLflow is fed committed records
only, so each metric reaches it once (tasks/tracking.py re-sends what a killed process had not).

A state is never changed in place: each commit returns a new one.
"""
from __future__ import annotations

import math
import os

import yaml
from pydantic import BaseModel, ConfigDict, field_validator

from configs import UserError, build_config, dump_config
from configs.schema import ClusterConfig
from stages.evaluation import Evaluation
from stages.run_layout import RunLayout


class MetricRecord(BaseModel):
    """Metrics logged at one step: `prefix` + key in MLflow ("" for GRPO steps, "eval/", "rm/", ...).
    Non-finite values (an AUC of a one-class split) are left out, as MLflow leaves them out."""

    model_config = ConfigDict(frozen=True)
    step: int
    prefix: str = ""
    metrics: dict[str, float]

    @field_validator("metrics")
    @classmethod
    def _finite(cls, metrics: dict[str, float]) -> dict[str, float]:
        return {k: float(v) for k, v in metrics.items() if math.isfinite(v)}


class RunState(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    run_id: str
    iteration: int = 0                  # iterations completed
    reported_iterations: int = 0        # iterations whose report (MLflow and Prefect artifacts) is out
    step: int = -1                      # last committed GRPO step (global: iteration * M + s)
    policy: str                         # the committed policy checkpoint (layout.ref)
    reference: str | None = None        # pi_ref of iteration `reference_iteration`
    reference_iteration: int = -1
    reward_models: dict[str, str] = {}  # learned reward sources -> checkpoint (layout.ref)
    reward_models_data_iteration: int = -1  # the newest RM data iteration they were trained on (0: SFT samples)
    initial_eval: Evaluation
    last_eval: Evaluation | None = None     # the newest iteration-end evaluation
    control_accuracy: float | None = None   # the time-matched SFT control, once it ran
    rl_seconds: float = 0.0             # wall and CPU time of committed RL work (the control's budget)
    rl_cpu_seconds: float = 0.0
    metrics_committed: int = 0          # bytes of metrics.jsonl that committed work wrote


class RunConfigChanged(UserError):
    """A run_id reused with a config that differs in fields a run cannot change."""


# What a resumed run may change: where it lives, how long it goes on, how many threads it gets.
# Where the stages run does not change what a run is: a run started locally may go on on a Ray cluster, and
# the reference's log-probs may come from the update's forward or from scoring while sampling (the same numbers).
RESUMABLE_FIELDS = frozenset({"run_id", "loop.iterations", "storage.artifacts_root", "threads", "sampling.threads",
                              "grpo.reference_while_sampling", "tracking.mlflow_uri",
                              *(f"cluster.{name}" for name in ClusterConfig.model_fields)})


def check_same_config(layout: RunLayout, cfg) -> None:
    """Refuse a config that differs from the run's stored one outside `RESUMABLE_FIELDS`, naming
    the fields; then store `cfg` (a longer run, a moved folder)."""
    if layout.config.exists():
        old = build_config(yaml.safe_load(layout.config.read_text(encoding="utf-8"))).flat()
        new = cfg.flat()
        changed = [f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in sorted(set(old) | set(new))
                   if k not in RESUMABLE_FIELDS and old.get(k) != new.get(k)]
        if changed:
            raise RunConfigChanged(f"run {layout.run_id!r} was started with another config: {', '.join(changed)}; "
                                   f"resume it with {layout.config} or start a new run_id")
    layout.root.mkdir(parents=True, exist_ok=True)
    tmp = layout.config.with_name(".config.yaml.tmp")
    tmp.write_text(dump_config(cfg), encoding="utf-8")
    os.replace(tmp, layout.config)


def read_state(layout: RunLayout) -> RunState | None:
    if not layout.state.exists():
        return None
    return RunState.model_validate_json(layout.state.read_text())


def _write_state(layout: RunLayout, state: RunState) -> None:
    tmp = layout.state.with_name(f".state.json.{os.getpid()}.tmp")
    tmp.write_text(state.model_dump_json(indent=1))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, layout.state)


def commit(layout: RunLayout, state: RunState, records: list[MetricRecord] = (), **changes) -> RunState:
    """Record `records` and make `state` updated with `changes` the run's state; returns the new state."""
    layout.root.mkdir(parents=True, exist_ok=True)
    size = state.metrics_committed
    if records:
        with open(layout.metrics, "ab") as f:
            f.truncate(size)  # nothing uncommitted may sit between committed records
            f.write("".join(r.model_dump_json() + "\n" for r in records).encode())
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
    new = RunState.model_validate({**dict(state), **changes, "metrics_committed": size})  # validated, unlike model_copy
    _write_state(layout, new)
    return new


def cut_uncommitted(layout: RunLayout, state: RunState) -> None:
    """Drop ledger lines that no commit covers (a killed process's unfinished work)."""
    if layout.metrics.exists() and layout.metrics.stat().st_size > state.metrics_committed:
        with open(layout.metrics, "rb+") as f:
            f.truncate(state.metrics_committed)


def committed_records(layout: RunLayout, state: RunState) -> list[MetricRecord]:
    if not layout.metrics.exists():
        return []
    with open(layout.metrics, "rb") as f:
        data = f.read(state.metrics_committed)
    return [MetricRecord.model_validate_json(line) for line in data.decode().splitlines() if line]


def step_metrics(layout: RunLayout, state: RunState) -> dict[int, dict[str, float]]:
    """{step: metrics} of the committed GRPO steps, in order."""
    return {r.step: r.metrics for r in committed_records(layout, state) if r.prefix == ""}
