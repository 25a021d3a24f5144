"""Flows that exist for deployments (prefect.yaml): resume a run, evaluate a checkpoint.

    resume-run           one more iteration (or `extra_iterations`) of an existing run, from its last
                         saved checkpoint, with the config the run was started with
    evaluate-checkpoint  held-out greedy accuracy of any checkpoint, logged to MLflow and Prefect

The nightly pipeline itself is `flows.iterative_grpo:iterative_grpo`, deployed as is.
"""
from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from configs import PipelineConfig, load_config
from flows.iterative_grpo import eval_line, iterative_grpo
from stages.checkpoints import read_state
from tasks import tracking
from tasks.prepare import build_initial_policy, evaluate_policy, prepare_data


@flow(name="resume-run", flow_run_name="resume-{run_id}")
def resume_run(run_id: str, extra_iterations: int = 1, artifacts_root: str = "artifacts") -> dict:
    """Continue pipeline run `run_id` from its last saved checkpoint for `extra_iterations` more
    iterations, with the config it was started with (<artifacts_root>/runs/<run_id>/config.yaml).

    An iteration that was interrupted counts as the first of them: it is finished from its last
    saved step. The MLflow run of `run_id` is continued, not replaced.
    """
    run_dir = Path(artifacts_root).resolve() / "runs" / run_id
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"no run {run_id!r}: {run_dir / 'config.yaml'} does not exist")
    state = read_state(run_dir)
    done = state["iteration"] if state else 0
    # The saved config holds the run's own artifacts root (absolute after resolve, or relative to the
    # directory it was started from): point it at where the run was found.
    cfg = load_config(run_dir / "config.yaml", [f"storage.artifacts_root={Path(artifacts_root).resolve()}",
                                                f"loop.iterations={done + extra_iterations}"])
    get_run_logger().info("resuming run %s: %d iteration(s) done, running to %d", run_id, done,
                          cfg.loop.iterations)
    return iterative_grpo(cfg)


def resolve_checkpoint(checkpoint: str, cfg: PipelineConfig) -> str:
    """A checkpoint reference -> a directory (or hub id) `evaluate_policy` can load.

    "sft"          the SFT warm start of this config (trained first when not cached)
    "run:<run_id>" the newest saved policy of pipeline run <run_id> under storage.artifacts_root
    anything else  a checkpoint directory (relative to the working directory) or a hub id
    """
    if checkpoint == "sft":
        return build_initial_policy(cfg)
    if checkpoint.startswith("run:"):
        run_dir = cfg.artifacts() / "runs" / checkpoint[4:]
        state = read_state(run_dir)
        if state is None:
            raise FileNotFoundError(f"no run state in {run_dir}")
        return state["saved_policy"]
    path = Path(checkpoint)
    return str(path.resolve()) if path.exists() else checkpoint


@flow(name="evaluate-checkpoint", log_prints=True)
def evaluate_checkpoint(checkpoint: str = "sft", config: PipelineConfig = PipelineConfig()) -> dict:
    """Held-out greedy accuracy of `checkpoint` ("sft", "run:<run_id>", or a path) on the test split of
    `config.data`, logged as an MLflow run of its own in `config.tracking.experiment`."""
    cfg, logger = config, get_run_logger()
    _, test_path = prepare_data(cfg)
    ckpt = resolve_checkpoint(checkpoint, cfg)
    ev = evaluate_policy(cfg, ckpt, test_path)
    logger.info("%s (%s): %s", checkpoint, ckpt, eval_line(ev))

    client = tracking.client_for(cfg)
    exp_id = tracking.experiment_id(client, cfg)
    tags = {"evaluated_checkpoint": checkpoint, "checkpoint_path": str(ckpt)}
    if flow_run.id:
        tags["prefect_flow_run_id"] = str(flow_run.id)
    if checkpoint.startswith("run:"):
        tags["evaluated_pipeline_run"] = checkpoint[4:]  # not pipeline_run_id: that tag finds a run to resume
    run = client.create_run(exp_id, run_name=time.strftime("eval-%Y%m%d-%H%M%S"), tags=tags)
    client.log_param(run.info.run_id, "data.test_size", cfg.data.test_size)
    tracking.log_metrics(cfg, run.info.run_id, ev, 0, prefix="eval/")
    tracking.finish_run(cfg, run.info.run_id)
    create_markdown_artifact(
        f"# Evaluation of `{checkpoint}`\n\n`{ckpt}`\n\nResult: {eval_line(ev)} (answered {ev['answered']:.3f}, "
        f"mean length {ev['mean_length']:.1f}).\n",
        key="checkpoint-eval", description="Held-out accuracy of a checkpoint")
    return {**ev, "checkpoint": str(ckpt), "mlflow_run_id": run.info.run_id}
