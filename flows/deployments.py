"""Flows that exist for deployments (prefect.yaml): resume a run, evaluate a checkpoint.

    resume-run           one more iteration (or `extra_iterations`) of an existing run, from its last
                         saved checkpoint, with the config the run was started with
    evaluate-checkpoint  held-out greedy accuracy of any checkpoint (a registered version too:
                         models:/<name>@best), logged to MLflow and Prefect

The nightly pipeline itself is `flows.iterative_grpo:iterative_grpo`, deployed as is.
"""
from __future__ import annotations

import time
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from configs import PipelineConfig, UserError, load_config
from flows.iterative_grpo import iterative_grpo
from stages.run_layout import RunLayout
from stages.run_state import read_state
from tasks import registry, tracking
from tasks.prepare import build_initial_policy, evaluate_policy, prepare_data


@flow(name="resume-run", flow_run_name="resume-{run_id}")
def resume_run(run_id: str, extra_iterations: int = 1, artifacts_root: str = "artifacts") -> dict:
    """Continue pipeline run `run_id` from its last saved checkpoint for `extra_iterations` more
    iterations, with the config it was started with (<artifacts_root>/runs/<run_id>/config.yaml).

    An iteration that was interrupted counts as the first of them: it is finished from its last
    saved step. The MLflow run of `run_id` is continued, not replaced.
    """
    layout = RunLayout.of(Path(artifacts_root).resolve(), run_id)
    if not layout.config.exists():
        raise UserError(f"run_id: no run {run_id!r} ({layout.config} does not exist)")
    state = read_state(layout)
    done = state.iteration if state else 0
    # The saved config holds the run's own artifacts root (absolute after resolve, or relative to the
    # directory it was started from): point it at where the run was found.
    cfg = load_config(layout.config, [f"storage.artifacts_root={Path(artifacts_root).resolve()}",
                                      f"loop.iterations={done + extra_iterations}"])
    get_run_logger().info("resuming run %s: %d iteration(s) done, running to %d", run_id, done,
                          cfg.loop.iterations)
    return iterative_grpo(cfg)


def resolve_checkpoint(checkpoint: str, cfg: PipelineConfig) -> tuple[str, ModelVersion | None]:
    """A checkpoint reference -> a directory (or hub id) `evaluate_policy` can load, and the registered
    version it names (None for the others).

    "sft"          the SFT warm start of this config (trained first when not cached)
    "run:<run_id>" the newest saved policy of pipeline run <run_id> under storage.artifacts_root
    "models:/<name>@<alias>", "models:/<name>/<version>"
                   a version in the config's model registry (tasks/registry.py): its checkpoint folder
    anything else  a checkpoint directory (relative to the working directory) or a hub id
    """
    if checkpoint == "sft":
        return build_initial_policy(cfg), None
    if registry.is_reference(checkpoint):
        version = registry.model_version(cfg, checkpoint, "checkpoint")
        return registry.local_folder(version, "checkpoint"), version
    if checkpoint.startswith("run:"):
        layout = RunLayout.of(cfg.artifacts(), checkpoint[4:])
        state = read_state(layout)
        if state is None:
            raise UserError(f"checkpoint: no run state in {layout.root}")
        return layout.path(state.policy), None
    path = Path(checkpoint)
    return (str(path.resolve()) if path.exists() else checkpoint), None


@flow(name="evaluate-checkpoint", log_prints=True)
def evaluate_checkpoint(checkpoint: str = "sft", config: PipelineConfig = PipelineConfig()) -> dict:
    """Held-out greedy accuracy of `checkpoint` ("sft", "run:<run_id>", "models:/<name>@best", or a path) on
    the test split of `config.data`, logged as an MLflow run of its own in `config.tracking.experiment`."""
    cfg, logger = config, get_run_logger()
    _, test_path = prepare_data(cfg)
    ckpt, version = resolve_checkpoint(checkpoint, cfg)
    ev = evaluate_policy(cfg, ckpt, test_path)
    logger.info("%s (%s): %s", checkpoint, ckpt, ev.describe())

    client = tracking.client_for(cfg)
    exp_id = tracking.experiment_id(client, cfg)
    tags = {"evaluated_checkpoint": checkpoint, "checkpoint_path": str(ckpt)}
    if flow_run.id:
        tags["prefect_flow_run_id"] = str(flow_run.id)
    if checkpoint.startswith("run:"):
        tags["evaluated_pipeline_run"] = checkpoint[4:]  # not pipeline_run_id: that tag finds a run to resume
    run = client.create_run(exp_id, run_name=time.strftime("eval-%Y%m%d-%H%M%S"), tags=tags)
    client.log_param(run.info.run_id, "data.test_size", cfg.data.test_size)
    if version:
        registry.link_input(cfg, run.info.run_id, version)
    tracking.log_metrics(cfg, run.info.run_id, ev.metrics(), 0, prefix="eval/")
    tracking.finish_run(cfg, run.info.run_id)
    create_markdown_artifact(
        f"# Evaluation of `{checkpoint}`\n\n`{ckpt}`\n\nResult: {ev.describe()} (answered {ev.answered:.3f}, "
        f"mean length {ev.mean_length:.1f}).\n",
        key="checkpoint-eval", description="Held-out accuracy of a checkpoint")
    return {**ev.metrics(), "checkpoint": str(ckpt), "mlflow_run_id": run.info.run_id}
