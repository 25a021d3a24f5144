"""Iterative GRPO (DeepSeekMath, Algorithm 1) as Prefect flows.

    policy <- SFT warm start (or model.policy as given: sft.steps: 0)
    for iteration k = 1..I:                                   subflow "iteration-k"
        reference <- policy
        for step = 1..M:
            rollouts   <- sample_groups(policy, questions)    G outputs per question
            rollouts   <- score_rollouts(rollouts)            verifier / outcome RM / process RM
                          (DAPO's dynamic sampling: both again on new questions until the groups whose
                           outputs scored differently fill the step; only those are kept)
            rollouts   <- compute_advantages(rollouts)        group-relative; the step's Parquet, written once
            policy     <- grpo_update(policy, rollouts)       mu clipped updates, KL to reference
        reward models <- retrain on this iteration's samples + 10% replay
    return policy

Run it: `python -m flows.iterative_grpo --config configs/demo.yaml [key.sub=value ...]`.
The run folder is the truth about a run (stages/run_layout.py): re-running with the same run_id
resumes after the last committed work, whatever was killed when; one process at a time owns a run.
"""
from __future__ import annotations

import sys
import time
import uuid
from functools import lru_cache

import pyarrow as pa
from prefect import flow, get_run_logger, tags
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run

from configs import PipelineConfig, UserError
from configs.schema import masked_uri
from models.trainer import NonFiniteUpdateError
from flows.cli import config_from_args, config_parser, one_line, preflight
from problems.datasets import draw_questions, read_problems
from stages import dynamic_sampling
from stages.checkpoints import copy_checkpoint
from stages.evaluation import Evaluation
from stages.run_layout import RunLayout
from stages.run_lock import hold_run_lock
from stages.run_state import (MetricRecord, RunState, check_same_config, commit, committed_records,
                              cut_uncommitted, read_state)
from tasks import cluster, registry, tracking
from tasks.journal import RunJournal
from tasks.prefect_runs import mark_crashed_flow_runs, reap_temporary_server_with_this_process, run_tag
from stages.prepare import start_label
from tasks.prepare import build_initial_policy, evaluate_policy, prepare_data, sft_control
from tasks.report import iteration_report
from tasks.reward_models import reward_models_needed, retrain_reward_models, train_initial_reward_models
from tasks.step import compute_advantages, grpo_update, sample_groups, score_rollouts


@lru_cache(maxsize=4)
def train_problems(path: str) -> list[dict]:
    return read_problems(path)


def pick_questions(train_path: str, cfg: PipelineConfig, step: int, sampling_round: int = 0,
                   drawn: frozenset[str] = frozenset()) -> list[dict]:
    """The questions of `step`'s sampling round `sampling_round` (0: the step's own; 1, 2, ...: dynamic
    sampling's), none of the ids in `drawn`: a seeded draw, so a redone step asks the same ones."""
    key = f"{cfg.data.seed}-{cfg.model.seed}-{step}" + (f"-round{sampling_round}" if sampling_round else "")
    pool = [p for p in train_problems(train_path) if str(p["id"]) not in drawn]
    return draw_questions(pool, cfg.loop.questions_per_step, key)


def scored_groups(cfg: PipelineConfig, run: RunJournal, train_path: str, step: int) -> pa.Table:
    """The step's groups, sampled and scored: `loop.questions_per_step` questions, G outputs each. Under
    `sampling.dynamic_sampling` (DAPO) rounds of as many new questions follow while the step has fewer
    groups whose outputs scored differently, `sampling.dynamic_max_rounds` at most, and only those groups
    are kept (stages/dynamic_sampling.py). The whole loop runs before the step's Parquet is written, so a
    redone step reads back what it trained on."""
    s, wanted = cfg.sampling, cfg.loop.questions_per_step
    rounds: list[pa.Table] = []
    drawn: frozenset[str] = frozenset()
    found = 0
    for sampling_round in range(1 + (s.dynamic_max_rounds if s.dynamic_sampling else 0)):
        questions = pick_questions(train_path, cfg, step, sampling_round, drawn)
        if not questions:
            break  # earlier rounds drew every train question
        rollouts = sample_groups(cfg, run.policy, questions, step, run.tokenizer, sampling_round, run.reference)
        rounds.append(score_rollouts(cfg, rollouts, run.tokenizer, run.reward_models))
        drawn |= {str(q["id"]) for q in questions}
        found += len(dynamic_sampling.informative_groups(rounds[-1], s.group_size, cfg.reward.supervision))
        if found >= wanted:
            break
    if not s.dynamic_sampling:
        return rounds[0]
    return dynamic_sampling.keep_informative(rounds, wanted, s.group_size, cfg.reward.supervision)


@flow(name="grpo-iteration", flow_run_name="iteration-{iteration}")
def grpo_iteration(config: PipelineConfig, state: RunState, iteration: int, train_path: str, test_path: str,
                   mlflow_run_id: str) -> RunState:
    """One outer iteration: reference refresh, M GRPO steps, reward-model retraining, evaluation."""
    cfg, run = config, RunJournal(config, state, mlflow_run_id)
    run.refresh_reference(iteration)
    for step in run.steps(iteration):
        run.start_step()
        rollouts = run.stored_rollouts(iteration, step)  # a step redone after a crash keeps its samples
        if rollouts is None:
            rollouts = scored_groups(cfg, run, train_path, step)  # sample_groups -> score_rollouts, in rounds
            rollouts = compute_advantages(cfg, rollouts)            # over the kept groups: the update's batch
            run.save_rollouts(iteration, step, rollouts)
        run.policy, update = grpo_update(cfg, run.policy, run.reference, rollouts, *run.checkpoint(step))
        run.end_step(step, rollouts, update)  # metrics; a commit when the checkpoint was written
        if run.eval_due(step):
            run.record_eval(evaluate_policy(cfg, run.policy, test_path), step + 1)
    if run.reward_models_due(iteration):
        with run.counted():
            new_rms = retrain_reward_models(cfg, str(run.layout.root), iteration, run.reward_models, run.tokenizer)
        run.commit_reward_models(iteration + 1, *new_rms)
    policy = run.save_iteration_policy(iteration)
    run.end_iteration(iteration, policy, evaluate_policy(cfg, policy, test_path))
    return run.state


def open_run_folder(cfg: PipelineConfig, layout: RunLayout, mlflow_run_id: str) -> RunState | None:
    """For a resumed run: its state, with what a killed process left unfinished cleared away and what
    it committed but never sent to MLflow sent; None for a new run."""
    logger = get_run_logger()
    for p in layout.remove_partial_writes():
        logger.info("removed %s, an unfinished write of a killed process", p)
    crashed = mark_crashed_flow_runs(cfg.run_id, flow_run.id, f"its process died; run {cfg.run_id} was resumed "
                                                                f"by flow run {flow_run.id}")
    state = read_state(layout)
    if state is None:
        return None
    cut_uncommitted(layout, state)
    resent = tracking.send_missing(cfg, mlflow_run_id, committed_records(layout, state))
    logger.info("resuming run %s after iteration %d step %d (%d flow run(s) marked crashed, %d metric record(s) "
                "re-sent to MLflow)", cfg.run_id, state.iteration, state.step, crashed, resent)
    return state


def start_run(cfg: PipelineConfig, layout: RunLayout, test_path: str, mlflow_run_id: str) -> RunState:
    """A new run: the SFT warm start, copied into the run (the iteration-0 reference, so that the run
    folder holds everything it resumes from) and evaluated."""
    sft = copy_checkpoint(build_initial_policy(cfg), layout.reference(0), with_optimizer=False)
    ev = evaluate_policy(cfg, str(sft), test_path)
    get_run_logger().info("initial policy: %s", ev.describe())
    record = MetricRecord(step=0, prefix="eval/", metrics=ev.metrics())
    state = commit(layout, RunState(run_id=cfg.run_id, policy=layout.ref(sft), reference=layout.ref(sft),
                                    reference_iteration=0, initial_eval=ev), [record])
    tracking.log_records(cfg, mlflow_run_id, [record])
    return state


@flow(name="iterative-grpo", log_prints=True)
def iterative_grpo(config: PipelineConfig = PipelineConfig()) -> dict:
    """The whole pipeline: data, SFT warm start, reward models, then I iterations of GRPO."""
    cfg = with_run_id(config)
    if cfg.algorithm != "grpo":
        raise UserError(f"algorithm: {cfg.algorithm!r} runs in flows/compare_methods.py (make compare); "
                        "this flow is iterative GRPO")
    # model.policy as a registry reference (models:/<name>@best): the run starts from that version's folder;
    # the config keeps the reference as given (a resume needs no start: the run folder holds a copy)
    start, start_version = registry.resolve_policy(cfg)
    preflight(start)  # a deployment's run gets its config here, not from the command line
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    layout = RunLayout.of(cfg.artifacts(), cfg.run_id)
    with hold_run_lock(layout.lock, cfg.run_id), tags(run_tag(cfg.run_id)):
        check_same_config(layout, cfg)
        train_path, test_path = prepare_data(cfg)
        warn_if_few_questions(cfg, train_path)
        mlflow_run_id = tracking.open_run(cfg, cfg.run_id, flow_run.id)
        if start_version:
            registry.link_input(cfg, mlflow_run_id, start_version)
        create_link_artifact(tracking.run_url(cfg, mlflow_run_id), link_text=f"MLflow run {cfg.run_id}",
                             key="mlflow-run", description="Metrics, params and artifacts of this pipeline run")
        try:
            state = open_run_folder(cfg, layout, mlflow_run_id) or start_run(start, layout, test_path, mlflow_run_id)
            summary = run_iterations(cfg, state, train_path, test_path, mlflow_run_id)
        except BaseException as err:
            tracking.finish_run(cfg, mlflow_run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            if cfg.cluster.backend == "ray":
                cluster.shutdown(cfg)  # the run's actors give their memory and GPUs back
        tracking.finish_run(cfg, mlflow_run_id)
    create_markdown_artifact(summary["report"], key="run-summary", description="Iterative GRPO result")
    return summary


def run_iterations(cfg: PipelineConfig, state: RunState, train_path: str, test_path: str, mlflow_run_id: str) -> dict:
    """Reward models, the iterations and their reports, the control: each skipped when the run has it."""
    run = RunJournal(cfg, state, mlflow_run_id)
    if reward_models_needed(cfg) and run.state.reward_models_data_iteration < 0:
        run.commit_reward_models(0, *train_initial_reward_models(cfg, str(run.layout.root), run.policy, train_path))
    for k in range(cfg.loop.iterations):
        if k >= run.state.iteration:
            run.state = grpo_iteration(cfg, run.state, k, train_path, test_path, mlflow_run_id)
        if k >= run.state.reported_iterations:
            iteration_report(cfg, str(run.layout.root), k, mlflow_run_id, run.state.last_eval)
            run.commit(reported_iterations=k + 1)
    if cfg.control.sft_same_time and run.state.control_accuracy is None:
        if cfg.cluster.backend == "ray":
            get_run_logger().warning("the SFT control gets RL's CPU seconds as counted in this process (%.0f s): the "
                                     "Ray actors' are not counted, so the control is given less than RL used",
                                     run.state.rl_cpu_seconds)
        control = sft_control(cfg, str(run.layout.reference(0)), run.state.rl_cpu_seconds, str(run.layout.control_sft))
        ev = evaluate_policy(cfg, control, test_path)
        run.record(cfg.loop.iterations * cfg.loop.steps_per_iteration, {"sft_same_time_accuracy": ev.accuracy},
                   prefix="control/")
        run.commit(control_accuracy=ev.accuracy)
    return summarize(cfg, run.state, run.layout, mlflow_run_id)


def with_run_id(cfg: PipelineConfig) -> PipelineConfig:
    """`cfg` with its run_id, a new one when it has none."""
    if cfg.run_id:
        return cfg
    return cfg.model_copy(update={"run_id": time.strftime("run-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]})


def warn_if_few_questions(cfg: PipelineConfig, train_path: str) -> None:
    n = len(train_problems(train_path))
    if cfg.loop.questions_per_step > n:
        get_run_logger().warning("loop.questions_per_step=%d but the train split has %d questions: each step "
                                 "uses all %d", cfg.loop.questions_per_step, n, n)


def summarize(cfg: PipelineConfig, state: RunState, layout: RunLayout, mlflow_run_id: str) -> dict:
    final = state.last_eval
    summary = {"run_id": cfg.run_id, "mlflow_run_id": mlflow_run_id, "initial_accuracy": state.initial_eval.accuracy,
               "final_accuracy": final.accuracy, "policy": layout.path(state.policy), "run_dir": str(layout.root),
               "rl_seconds": state.rl_seconds, "rl_cpu_seconds": state.rl_cpu_seconds,
               "initial_eval": state.initial_eval, "final_eval": final,
               "sampled": sampled_summary(state.initial_eval, final), "start": start_label(cfg)}
    report = (f"# Run {cfg.run_id}\n\nHeld-out greedy accuracy: {summary['initial_accuracy']:.3f} ({summary['start']}) -> "
              f"{summary['final_accuracy']:.3f} after {cfg.loop.iterations} iteration(s) "
              f"({summary['rl_seconds']:.0f} s of RL){summary['sampled']}.\n")
    if state.control_accuracy is not None:
        summary["control_sft_accuracy"] = state.control_accuracy
        report += (f"\nControl, the same {state.rl_cpu_seconds:.0f} CPU s spent continuing SFT from the same start: "
                   f"{state.control_accuracy:.3f}.\n")
    summary["report"] = report
    return summary


def sampled_summary(before: Evaluation, after: Evaluation) -> str:
    """'; Maj@K a -> b, Pass@K c -> d (N questions, K samples each)' from two evaluations, or ''
    when either sampled nothing (loop.eval_samples == 0) or they sampled a different K."""
    if not before.k or before.k != after.k:
        return ""
    return (f"; Maj@{after.k} {before.maj_at_k:.3f} -> {after.maj_at_k:.3f}, Pass@{after.k} {before.pass_at_k:.3f} -> "
            f"{after.pass_at_k:.3f} ({after.sample_questions} questions, {after.k} samples each)")


def print_summary(cfg: PipelineConfig, summary: dict) -> None:
    root = cfg.artifacts()
    control = ""
    if "control_sft_accuracy" in summary:
        control = (f"\nControl: the same {summary['rl_cpu_seconds']:.0f} CPU seconds spent continuing SFT from the "
                   f"same start reach {summary['control_sft_accuracy']:.3f}")
    print(f"""
Held-out greedy accuracy: {summary['initial_accuracy']:.3f} ({summary['start']}) -> {summary['final_accuracy']:.3f} \
after {summary['rl_seconds']:.0f} s of RL{summary['sampled']}{control}
  rollouts:     {summary['run_dir']}/rollouts/  (Parquet, hive-partitioned by iteration and step)
  checkpoints:  {summary['run_dir']}/checkpoints/
  MLflow run:   {summary['mlflow_run_id']} in {masked_uri(cfg.mlflow_uri())}
Open the UIs:
  .venv/bin/mlflow ui --host 127.0.0.1 --backend-store-uri {masked_uri(cfg.mlflow_uri())} --default-artifact-root {root / 'mlartifacts'}
  .venv/bin/prefect server start --host 127.0.0.1     (flow runs of this machine, http://127.0.0.1:4200)
Resume or extend this run: python -m flows.iterative_grpo --config <same config> run_id={summary['run_id']}""")


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(config_parser(__doc__).parse_args(argv))
    if cfg is None:
        return 2
    cfg = with_run_id(cfg)
    reap_temporary_server_with_this_process()  # a kill -9 of this process must not orphan Prefect's server
    try:
        layout = RunLayout.of(cfg.artifacts(), cfg.run_id)
        with hold_run_lock(layout.lock, cfg.run_id):  # a second process stops here, before any flow run
            check_same_config(layout, cfg)
            with tags(run_tag(cfg.run_id)):
                summary = iterative_grpo(cfg)
    except (UserError, NonFiniteUpdateError) as err:  # the latter: nothing of that step was written or recorded
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print_summary(cfg, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
