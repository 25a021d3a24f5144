"""The flow's handle on its run: the committed state, the work since the last commit, and its records.

The flows ask it which steps remain, where a step's checkpoint goes, when to evaluate; it times the
steps, turns their results into metric records, and commits (the ledger and state.json, then MLflow)
whenever the work on disk is complete: after a checkpoint, a reference refresh, the reward models'
retraining, an iteration's evaluation. What a killed process had not committed is redone on resume
and recorded then, so each metric is recorded once.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
from prefect import get_run_logger

from configs import PipelineConfig
from stages.dynamic_sampling import drawn_metrics, dynamic_note
from stages.evaluation import Evaluation
from stages.faults import crash_point
from stages.rollout_store import read_rollouts, write_atomic
from stages.run_layout import RunLayout
from stages.run_state import MetricRecord, RunState, commit
from stages.step_metrics import (agreement_note, reward_model_agreement, rm_thresholds, rollout_metrics,
                                 zeroed_note)
from tasks import registry, tracking
from tasks.step import merge_adapters


class RunJournal:
    def __init__(self, cfg: PipelineConfig, state: RunState, mlflow_run_id: str):
        self.cfg, self.state, self.mlflow_run_id = cfg, state, mlflow_run_id
        self.layout = RunLayout.of(cfg.artifacts(), cfg.run_id)
        self.policy = self.layout.path(state.policy)  # the live policy: ahead of the committed one between checkpoints
        self._pending: list[MetricRecord] = []
        self._wall = self._cpu = 0.0  # RL time spent since the last commit
        self._step_start: tuple[float, float] | None = None
        self._rollouts_done = 0.0
        self._updated_since_commit = False  # the live policy is ahead of the committed checkpoint
        self._flat_steps = 0  # steps in a row whose groups all scored alike (no optimizer step)

    # ---- what the tasks are given -----------------------------------------------------------------
    @property
    def reference(self) -> str:
        return self.layout.path(self.state.reference)

    @property
    def tokenizer(self) -> str:
        """A checkpoint on disk whose tokenizer is the policy's: the run's start (iteration 0's reference),
        one path for the whole run, so the workspace loads it at most once."""
        return str(self.layout.reference(0))

    @property
    def reward_models(self) -> dict[str, str]:
        return {name: self.layout.path(ref) for name, ref in self.state.reward_models.items()}

    # ---- commits ----------------------------------------------------------------------------------
    def record(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        self._pending.append(MetricRecord(step=step, prefix=prefix, metrics=metrics))

    def commit(self, **changes) -> RunState:
        records, self._pending = self._pending, []
        self.state = commit(self.layout, self.state, records, rl_seconds=self.state.rl_seconds + self._wall,
                            rl_cpu_seconds=self.state.rl_cpu_seconds + self._cpu, **changes)
        self._wall = self._cpu = 0.0
        tracking.log_records(self.cfg, self.mlflow_run_id, records)
        return self.state

    # ---- the iteration ---------------------------------------------------------------------------
    def refresh_reference(self, iteration: int) -> None:
        """pi_ref <- pi_theta at the start of iteration `iteration`: the previous iteration's policy
        checkpoint, which is kept (no copy; under LoRA it is the merged export the new adapters sit on)."""
        if self.state.reference_iteration == iteration:
            return
        self.commit(reference=self.state.policy, reference_iteration=iteration)

    def steps(self, iteration: int) -> range:
        """The global steps of `iteration` that no commit covers yet."""
        M = self.cfg.loop.steps_per_iteration
        return range(max(iteration * M, self.state.step + 1), (iteration + 1) * M)

    def start_step(self) -> None:
        self._step_start = (time.perf_counter(), time.process_time())

    def stored_rollouts(self, iteration: int, step: int) -> pa.Table | None:
        """A finished step's rollouts (a file is written once, complete), or None."""
        path = self.layout.rollouts(iteration, step)
        table = read_rollouts(path) if path.exists() else None
        self._rollouts_done = time.perf_counter()
        return table

    def save_rollouts(self, iteration: int, step: int, rollouts: pa.Table) -> None:
        write_atomic(rollouts, self.layout.rollouts(iteration, step))
        self._rollouts_done = time.perf_counter()

    def checkpoint(self, step: int) -> tuple[str, bool]:
        """(where the policy after `step` goes, whether it is written there): every
        `loop.checkpoint_every` steps and at the end of each iteration. An iteration's last step goes
        straight to the iteration's checkpoint (written once, never copied), except under LoRA, where
        that is the merged export (`save_iteration_policy`) and the adapters go to a step checkpoint.
        Under the Ray backend a step before an evaluation is written too: the trainer group holds the
        live weights, and the evaluation, in this process, reads them from disk."""
        every, M = self.cfg.loop.checkpoint_every, self.cfg.loop.steps_per_iteration
        last = (step + 1) % M == 0
        out = (self.layout.policy_iteration(step // M) if last and not self.cfg.model.lora.enabled
               else self.layout.policy_step(step))
        on_ray_eval = self.cfg.cluster.backend == "ray" and self.eval_due(step)
        return str(out), (step + 1) % every == 0 or last or on_ray_eval

    def end_step(self, step: int, rollouts: pa.Table, update: dict[str, float]) -> None:
        """Record the step's metrics and log its line; commit when its checkpoint was written."""
        t0, cpu0 = self._step_start
        now = time.perf_counter()
        self._wall += now - t0
        self._cpu += time.process_time() - cpu0
        metrics = {**rollout_metrics(rollouts, self.cfg.sampling.group_size), **drawn_metrics(rollouts),
                   **reward_model_agreement(rollouts, rm_thresholds(self.cfg.reward)), **update,
                   "rollout_seconds": self._rollouts_done - t0, "update_step_seconds": now - self._rollouts_done,
                   "step_seconds": now - t0}
        self.record(step, metrics)
        M = self.cfg.loop.steps_per_iteration
        logger = get_run_logger()
        logger.info("iter %d step %d/%d | reward %.3f acc %.3f flat groups %.2f kl %.4f loss %+.4f | %.1fs%s",
                    step // M, step % M + 1, M, metrics["reward_mean"], metrics["accuracy"],
                    metrics["zero_std_group_frac"], metrics.get("kl", 0.0), metrics.get("loss", 0.0),
                    metrics["step_seconds"], (" | no update: every group scored alike" if update["flat_batch_skipped"]
                                              else "") + zeroed_note(metrics) + agreement_note(metrics)
                    + dynamic_note(metrics, self.cfg.loop.questions_per_step))
        self._warn_if_not_learning(step, bool(update["flat_batch_skipped"]))
        ckpt, saved = self.checkpoint(step)
        self._updated_since_commit = not saved
        if saved:
            self.commit(step=step, policy=self.layout.ref(ckpt))
            self.layout.prune_checkpoints(keep=Path(ckpt))

    def _warn_if_not_learning(self, step: int, flat: bool) -> None:
        """Said out loud, in the log and as an MLflow tag: steps in a row that learned nothing because
        every group's outputs scored alike (all wrong: the task is too hard for the policy, or the verifier
        cannot read its answers; all right: too easy)."""
        self._flat_steps = self._flat_steps + 1 if flat else 0
        if self._flat_steps == self.cfg.grpo.warn_after_flat_steps:
            message = (f"{self._flat_steps} steps in a row (to step {step}) learned nothing: in every group all "
                       f"{self.cfg.sampling.group_size} outputs got the same reward. Look at the rollouts' "
                       "completions and `extracted_answer`: is the task too hard or too easy for the policy, does "
                       "the prompt say how to answer (prompt.instruction), can the verifier read the answers "
                       "(reward.verifier.last_number)?")
            get_run_logger().warning(message)
            tracking.set_tags(self.cfg, self.mlflow_run_id, {"warning.not_learning": message})

    def eval_due(self, step: int) -> bool:
        """A held-out evaluation every `loop.eval_every` steps (an iteration's end has its own)."""
        return (step + 1) % self.cfg.loop.eval_every == 0 and (step + 1) % self.cfg.loop.steps_per_iteration != 0

    def record_eval(self, ev: Evaluation, at_step: int) -> None:
        """An evaluation of the live policy: committed at once when that policy is the committed one (a
        resumed run does not redo committed steps, so it would not redo their evaluation either), else
        with the next checkpoint (a resumed run redoes both)."""
        self.record(at_step, ev.metrics(), prefix="eval/")
        get_run_logger().info("eval after step %d: %s", at_step, ev.describe())
        if not self._updated_since_commit:
            self.commit()

    @contextmanager
    def counted(self):
        """Count the enclosed work as RL time (the SFT control's budget), as the steps are."""
        t0, cpu0 = time.perf_counter(), time.process_time()
        yield
        self._wall += time.perf_counter() - t0
        self._cpu += time.process_time() - cpu0

    def reward_models_due(self, iteration: int) -> bool:
        """Retrain the learned reward models on iteration `iteration`'s rollouts, unless already done."""
        return (bool(self.state.reward_models) and self.cfg.reward_model.retrain_each_iteration
                and self.state.reward_models_data_iteration < iteration + 1)

    def commit_reward_models(self, data_iteration: int, paths: dict[str, str], metrics: dict[str, float]) -> None:
        """Reward models trained on data iteration `data_iteration` (0: the SFT policy's samples)."""
        self.record(data_iteration * self.cfg.loop.steps_per_iteration, metrics, prefix="rm/")
        self.commit(reward_models={name: self.layout.ref(p) for name, p in paths.items()},
                    reward_models_data_iteration=data_iteration)

    def save_iteration_policy(self, iteration: int) -> str:
        """The policy at the end of `iteration`, kept (step checkpoints are pruned). Under LoRA: the
        adapters merged into their base, weights only: the export, and the next iteration's reference."""
        committed = self.layout.path(self.state.policy)
        if not self.cfg.model.lora.enabled:
            return committed  # the iteration's last step was written there (`checkpoint`)
        return merge_adapters(self.cfg, committed, str(self.layout.policy_iteration(iteration)))

    def end_iteration(self, iteration: int, policy: str, ev: Evaluation) -> None:
        crash_point("final_eval" if iteration == self.cfg.loop.iterations - 1 else "iteration_eval")
        # Before the commit, which prunes the step checkpoint LoRA's adapters are registered from (a resumed
        # run redoes an uncommitted registration and finds what it had registered)
        registry.register_iteration(self.cfg, self.mlflow_run_id, self.layout, self.state, iteration, policy, ev)
        M = self.cfg.loop.steps_per_iteration
        self.record((iteration + 1) * M, ev.metrics(), prefix="eval/")
        self.commit(iteration=iteration + 1, policy=self.layout.ref(policy), last_eval=ev)
        self.layout.prune_checkpoints(keep=Path(policy))
        get_run_logger().info("iteration %d done: %s", iteration, ev.describe())
