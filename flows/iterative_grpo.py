"""Iterative GRPO (DeepSeekMath, Algorithm 1) as Prefect flows.

    policy <- SFT warm start
    for iteration k = 1..I:                                   subflow "iteration-k"
        reference <- policy
        for step = 1..M:
            rollouts   <- sample_groups(policy, questions)    G outputs per question, Parquet
            rollouts   <- score_rollouts(rollouts)            verifier / outcome RM / process RM
            rollouts   <- compute_advantages(rollouts)        group-relative
            policy     <- grpo_update(policy, rollouts)       mu clipped updates, KL to reference
        reward models <- retrain on this iteration's samples + 10% replay
    return policy

Run it: `python -m flows.iterative_grpo --config configs/demo.yaml [key.sub=value ...]`.
Re-running with the same run_id resumes after the last completed step.
"""
from __future__ import annotations

import shutil
import time
import uuid
from functools import lru_cache
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from configs import PipelineConfig, dump_config
from flows.cli import config_from_args, config_parser
from problems.datasets import draw_questions, read_problems
from stages.checkpoints import append_step_metrics, copy_checkpoint, read_state, write_state
from stages.evaluation import sampled_scores
from stages.rollout_store import rollout_path
from stages.step_metrics import rollout_metrics
from tasks import tracking
from tasks.prepare import build_initial_policy, evaluate_policy, prepare_data, sft_control
from tasks.reward_models import reward_models_needed, retrain_reward_models, train_initial_reward_models
from tasks.step import compute_advantages, grpo_update, sample_groups, score_rollouts
from tasks.report import iteration_report

@lru_cache(maxsize=4)
def train_problems(path: str) -> list[dict]:
    return read_problems(path)


def pick_questions(train_path: str, cfg: PipelineConfig, step: int) -> list[dict]:
    return draw_questions(train_problems(train_path), cfg.loop.questions_per_step,
                          f"{cfg.data.seed}-{cfg.model.seed}-{step}")


def _prune_step_checkpoints(policy_dir: Path, keep: set[str]) -> None:
    """Step checkpoints exist for resume; only the newest (and the reference's source) are kept."""
    for old in sorted(policy_dir.glob("step=*")):
        if str(old) not in keep:
            shutil.rmtree(old, ignore_errors=True)


@flow(name="grpo-iteration", flow_run_name="iteration-{iteration}")
def grpo_iteration(config: PipelineConfig, run_id: str, iteration: int, state: dict, train_path: str,
                   test_path: str, mlflow_run_id: str) -> dict:
    """One outer iteration: reference refresh, M GRPO steps, reward-model retraining."""
    cfg, logger = config, get_run_logger()
    run_dir = cfg.artifacts() / "runs" / run_id
    ckpt_dir = run_dir / "checkpoints"
    M = cfg.loop.steps_per_iteration
    if state.get("reference_iteration") != iteration:
        # Reference refresh: pi_ref <- pi_theta at the start of every iteration (a copy on disk, so
        # a resumed iteration keeps the same reference).
        state["reference"] = str(copy_checkpoint(state["policy"], ckpt_dir / "reference" / f"iteration={iteration}"))
        state["reference_iteration"] = iteration
        write_state(run_dir, state)
    for s in range(M):
        step = iteration * M + s
        if step <= state["step"]:
            continue
        t0, cpu0 = time.perf_counter(), time.process_time()
        questions = pick_questions(train_path, cfg, step)
        out = rollout_path(cfg.artifacts(), run_id, iteration, step)
        path = sample_groups(cfg, run_id, iteration, step, state["policy"], questions, str(out))
        t1 = time.perf_counter()
        path = score_rollouts(cfg, run_id, iteration, step, path, state["reward_models"])
        t2 = time.perf_counter()
        path = compute_advantages(cfg, run_id, iteration, step, path)
        save = (step + 1) % cfg.loop.checkpoint_every == 0 or s == M - 1
        new_ckpt, update = grpo_update(cfg, state["policy"], state["reference"], path,
                                       str(ckpt_dir / "policy" / f"step={step}"), save)
        t3 = time.perf_counter()
        metrics = {**rollout_metrics(path, cfg.sampling.group_size), **update}
        metrics.update(sample_seconds=t1 - t0, score_seconds=t2 - t1, update_step_seconds=t3 - t2,
                       step_seconds=t3 - t0, sample_tokens_per_s=metrics["completion_tokens"] / max(t1 - t0, 1e-9))
        if step > state.get("logged_until", -1):  # a step redone after a crash is logged once
            append_step_metrics(run_dir, step, metrics)  # durable before state.json says the step is done
            tracking.log_metrics(cfg, mlflow_run_id, metrics, step, synchronous=False)
        logger.info("iter %d step %d/%d | reward %.3f acc %.3f kl %.4f loss %+.4f | %.1fs",
                    iteration, s + 1, M, metrics["reward_mean"], metrics["accuracy"], metrics.get("kl", 0.0),
                    metrics.get("loss", 0.0), metrics["step_seconds"])
        state["policy"] = new_ckpt
        state["rl_seconds"] = state.get("rl_seconds", 0.0) + metrics["step_seconds"]
        state["rl_cpu_seconds"] = state.get("rl_cpu_seconds", 0.0) + time.process_time() - cpu0
        if save:
            state["step"] = step
            state["saved_policy"] = new_ckpt
            write_state(run_dir, state)
            _prune_step_checkpoints(ckpt_dir / "policy", {new_ckpt, state.get("reference", "")})
        if (step + 1) % cfg.loop.eval_every == 0 and s != M - 1:
            ev = evaluate_policy(cfg, state["policy"], test_path)
            tracking.log_metrics(cfg, mlflow_run_id, ev, step + 1, prefix="eval/")
            logger.info("eval after step %d: greedy accuracy %.3f", step + 1, ev["accuracy"])

    if reward_models_needed(cfg) and cfg.reward_model.retrain_each_iteration:
        t0, cpu0 = time.perf_counter(), time.process_time()
        state["reward_models"], rm_metrics = retrain_reward_models(cfg, run_id, iteration, state["reward_models"])
        state["rl_seconds"] = state.get("rl_seconds", 0.0) + time.perf_counter() - t0
        state["rl_cpu_seconds"] = state.get("rl_cpu_seconds", 0.0) + time.process_time() - cpu0
        tracking.log_metrics(cfg, mlflow_run_id, rm_metrics, (iteration + 1) * M, prefix="rm/")
    final = copy_checkpoint(state["policy"], ckpt_dir / "policy" / f"iteration={iteration}")
    ev = evaluate_policy(cfg, str(final), test_path)
    tracking.log_metrics(cfg, mlflow_run_id, ev, (iteration + 1) * M, prefix="eval/")
    logger.info("iteration %d done: %s", iteration, eval_line(ev))
    iteration_report(cfg, run_id, iteration, mlflow_run_id, ev)
    state.update(iteration=iteration + 1, step=(iteration + 1) * M - 1, policy=str(final), saved_policy=str(final))
    write_state(run_dir, state)
    return state


@flow(name="iterative-grpo", log_prints=True)
def iterative_grpo(config: PipelineConfig = PipelineConfig()) -> dict:
    """The whole pipeline: data, SFT warm start, reward models, then I iterations of GRPO."""
    cfg = config
    if cfg.algorithm != "grpo":
        raise ValueError(f"algorithm: {cfg.algorithm!r} runs in flows/compare_methods.py (make compare); "
                         "this flow is iterative GRPO")
    run_id = cfg.run_id or time.strftime("run-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    cfg = cfg.model_copy(update={"run_id": run_id})
    logger = get_run_logger()
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    run_dir = cfg.artifacts() / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))

    train_path, test_path = prepare_data(cfg)
    sft_ckpt = build_initial_policy(cfg)
    mlflow_run_id = tracking.open_run(cfg, run_id, flow_run.id)
    create_link_artifact(tracking.run_url(cfg, mlflow_run_id), link_text=f"MLflow run {run_id}",
                         key="mlflow-run", description="Metrics, params and artifacts of this pipeline run")
    state = read_state(run_dir)
    if state is None:
        ev = evaluate_policy(cfg, sft_ckpt, test_path)
        tracking.log_metrics(cfg, mlflow_run_id, ev, 0, prefix="eval/")
        logger.info("initial policy: %s", eval_line(ev))
        state = {"run_id": run_id, "iteration": 0, "step": -1, "policy": sft_ckpt, "saved_policy": sft_ckpt,
                 "initial_policy": sft_ckpt, "initial_accuracy": ev["accuracy"], "initial_eval": ev,
                 "reward_models": {}}
        write_state(run_dir, state)
    else:
        logger.info("resuming run %s after iteration %d step %d", run_id, state["iteration"], state["step"])
        state["policy"] = state["saved_policy"]  # unsaved steps after it are redone
        state["logged_until"] = tracking.resume_logging(cfg, mlflow_run_id, run_dir, state["step"])
    if reward_models_needed(cfg) and not state["reward_models"]:
        state["reward_models"], rm_metrics = train_initial_reward_models(cfg, run_id, sft_ckpt, train_path)
        tracking.log_metrics(cfg, mlflow_run_id, rm_metrics, 0, prefix="rm/")
        write_state(run_dir, state)

    for k in range(state["iteration"], cfg.loop.iterations):
        state = grpo_iteration(cfg, run_id, k, state, train_path, test_path, mlflow_run_id)

    final = evaluate_policy(cfg, state["policy"], test_path)
    summary = {"run_id": run_id, "mlflow_run_id": mlflow_run_id, "initial_accuracy": state["initial_accuracy"],
               "final_accuracy": final["accuracy"], "policy": state["policy"], "run_dir": str(run_dir),
               "rl_seconds": state.get("rl_seconds", 0.0), "rl_cpu_seconds": state.get("rl_cpu_seconds", 0.0),
               "initial_eval": state.get("initial_eval", {}), "final_eval": final,
               "sampled": sampled_summary(state.get("initial_eval", {}), final)}
    report = (f"# Run {run_id}\n\nHeld-out greedy accuracy: {summary['initial_accuracy']:.3f} (SFT) -> "
              f"{summary['final_accuracy']:.3f} after {cfg.loop.iterations} iteration(s) "
              f"({summary['rl_seconds']:.0f} s of RL){summary['sampled']}.\n")
    if cfg.control.sft_same_time:
        control = sft_control(cfg, run_id, state["initial_policy"], summary["rl_cpu_seconds"])
        ev = evaluate_policy(cfg, control, test_path)
        summary["control_sft_accuracy"] = ev["accuracy"]
        tracking.log_metrics(cfg, mlflow_run_id, {"sft_same_time_accuracy": ev["accuracy"]},
                             cfg.loop.iterations * cfg.loop.steps_per_iteration, prefix="control/")
        report += (f"\nControl, the same {summary['rl_cpu_seconds']:.0f} CPU s spent continuing SFT from the same start: "
                   f"{ev['accuracy']:.3f}.\n")
    tracking.finish_run(cfg, mlflow_run_id)
    create_markdown_artifact(report, key="run-summary", description="Iterative GRPO result")
    return summary


def eval_line(ev: dict) -> str:
    """One evaluation in words, for the log."""
    scores = sampled_scores(ev)
    sampled = (f"; Maj@{scores[0]} {scores[1]:.3f}, Pass@{scores[0]} {scores[2]:.3f} on the first "
               f"{int(ev['sample_questions'])}") if scores else ""
    return f"greedy accuracy {ev['accuracy']:.3f} on {ev['n']} held-out questions{sampled}"


def sampled_summary(before: dict, after: dict) -> str:
    """'; Maj@K a -> b, Pass@K c -> d (N questions, K samples each)' from two evaluations, or ''
    when either has no sampled metrics (loop.eval_samples == 0, or a run started before they existed)."""
    old, new = sampled_scores(before), sampled_scores(after)
    if not old or not new or old[0] != new[0]:
        return ""
    k = new[0]
    return (f"; Maj@{k} {old[1]:.3f} -> {new[1]:.3f}, Pass@{k} {old[2]:.3f} -> {new[2]:.3f} "
            f"({int(after['sample_questions'])} questions, {k} samples each)")


def print_summary(cfg: PipelineConfig, summary: dict) -> None:
    root = cfg.artifacts()
    control = ""
    if "control_sft_accuracy" in summary:
        control = (f"\nControl: the same {summary['rl_cpu_seconds']:.0f} CPU seconds spent continuing SFT from the "
                   f"same start reach {summary['control_sft_accuracy']:.3f}")
    print(f"""
Held-out greedy accuracy: {summary['initial_accuracy']:.3f} (SFT policy) -> {summary['final_accuracy']:.3f} \
after {summary['rl_seconds']:.0f} s of RL{summary['sampled']}{control}
  rollouts:     {summary['run_dir']}/rollouts/  (Parquet, hive-partitioned by iteration)
  checkpoints:  {summary['run_dir']}/checkpoints/
  MLflow run:   {summary['mlflow_run_id']} in {cfg.mlflow_uri()}
Open the UIs:
  .venv/bin/mlflow ui --host 127.0.0.1 --backend-store-uri {cfg.mlflow_uri()} --default-artifact-root {root / 'mlartifacts'}
  .venv/bin/prefect server start --host 127.0.0.1     (flow runs of this machine, http://127.0.0.1:4200)
Resume or extend this run: python -m flows.iterative_grpo --config <same config> run_id={summary['run_id']}""")


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(config_parser(__doc__).parse_args(argv))
    if cfg is None:
        return 2
    summary = iterative_grpo(cfg)
    print_summary(cfg, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
