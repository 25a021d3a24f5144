"""End to end: the real flow on the real Prefect API (ephemeral) and a real MLflow SQLite store.

Tiny sizes: a barely-trained tiny model, 2 iterations x 2 steps of 2 questions x G=4. Crashes and
resume: tests/test_run_survives.py.
"""
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import torch
from safetensors.torch import load_file

from configs import load_config
from stages.rollout_store import open_rollouts
from stages.run_layout import RunLayout
from stages.run_state import read_state, step_metrics

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# One-operation problems and 80 SFT steps: right about half the time, so rewards differ within groups
# and the policy moves (with 30 steps on the demo's problems every reward was 0 and nothing moved).
TINY_RUN = [
    "sft.steps=80", "sft.batch_size=16", "data.arithmetic.min_steps=1", "data.arithmetic.max_steps=1",
    "data.train_size=300", "data.test_size=16", "loop.iterations=2", "loop.steps_per_iteration=2",
    "loop.questions_per_step=4", "loop.eval_every=1", "sampling.group_size=4", "sampling.max_new_tokens=16",
    "reward_model.init_questions=8", "reward_model.init_samples_per_question=2", "reward_model.epochs=1",
]
STEP_METRICS = ["reward_mean", "reward_std", "accuracy", "zero_std_group_frac", "advantage_mean", "advantage_abs_mean",
                "kl", "clip_frac_low", "clip_frac_high", "ratio_mean", "entropy", "loss", "grad_norm",
                "completion_length_mean", "truncation_rate", "update_tokens_per_s", "rollout_seconds",
                "update_step_seconds", "step_seconds", "sampler_logp_gap", "flat_batch_skipped"]



def _config(root, *extra):
    return load_config(ROOT / "configs/demo.yaml", [f"storage.artifacts_root={root}", *TINY_RUN, *extra])


def _weights(ckpt):
    return load_file(str(Path(ckpt) / "model.safetensors"))


def test_outcome_pipeline_with_a_retrained_reward_model(prefect_api, tmp_path):
    from flows.iterative_grpo import iterative_grpo
    from tasks.tracking import client_for

    cfg = _config(tmp_path, "run_id=outcome", "reward.sources=[{name: verifier}, {name: outcome_rm, weight: 0.5}]",
                  "control.sft_same_time=true")
    summary = iterative_grpo(cfg)
    run_dir = tmp_path / "runs" / "outcome"

    # Parquet: every step once, G rows per question, group/sample indices in order.
    layout = RunLayout.of(tmp_path, "outcome")
    table = open_rollouts(layout.rollouts_dir).to_table()
    per_file = sorted(p.relative_to(layout.rollouts_dir).as_posix() for p in layout.rollouts_dir.rglob("*.parquet"))
    assert per_file == [f"iteration={s // 2}/step={s}/part-0.parquet" for s in range(4)]
    assert table.num_rows == 4 * 4 * 4
    for it in (0, 1):
        part = table.filter(ds.field("iteration") == it)
        assert part.num_rows == 2 * 4 * 4
    assert set(table.column("sample_index").to_pylist()) == {0, 1, 2, 3}
    assert "advantages" in table.column_names and "reward" in table.column_names

    # MLflow: one run, the step metrics at every step, eval and RM metrics per iteration.
    client = client_for(cfg)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.tags["pipeline_run_id"] == "outcome" and "prefect_flow_run_id" in run.data.tags
    assert run.data.params["grpo.beta"] == "0.04"
    for key in STEP_METRICS:
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [0, 1, 2, 3], key
    # ... sent asynchronously, and each step first recorded in the run's own file (what a resume re-sends)
    recorded = step_metrics(layout, read_state(layout))
    assert list(recorded) == [0, 1, 2, 3]
    losses = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert [v for _, v in losses] == pytest.approx([recorded[s]["loss"] for s in range(4)])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/accuracy")) == [0, 1, 2, 3, 4]
    # Each evaluation also samples K=8 per question for Maj@8 <= Pass@8 (the headroom RL can sharpen into)
    maj = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/maj_at_8")}
    pass_ = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/pass_at_8")}
    assert sorted(maj) == sorted(pass_) == [0, 1, 2, 3, 4]
    assert all(0 <= maj[s] <= pass_[s] <= 1 for s in maj)
    assert summary["sampled"].startswith("; Maj@8 ") and "(16 questions, 8 samples each)" in summary["sampled"]
    replay = client.get_metric_history(run.info.run_id, "rm/outcome_rm/replay_fraction")
    assert [m.step for m in replay] == [2, 4]
    n_new = client.get_metric_history(run.info.run_id, "rm/outcome_rm/n_new")
    n_replay = client.get_metric_history(run.info.run_id, "rm/outcome_rm/n_replay")
    for new, rep, frac in zip(n_new, n_replay, replay):
        assert rep.value == round(0.1 * new.value / 0.9)
        assert frac.value == pytest.approx(rep.value / (new.value + rep.value))
    assert (run_dir / "checkpoints/outcome_rm/iteration=2").is_dir()

    # Reference refresh: iteration 1's reference is iteration 0's policy checkpoint itself (no copy), the
    # policy moved away from it; each checkpoint is written once and only the newest keeps optimizer state.
    state = read_state(layout)
    assert state.reference == "checkpoints/policy/iteration=0" and state.reference_iteration == 1
    policy0, policy1 = _weights(run_dir / "checkpoints/policy/iteration=0"), _weights(summary["policy"])
    assert any(not torch.equal(policy0[k], policy1[k]) for k in policy1)  # the policy moved in iteration 1
    assert state.iteration == 2 and state.step == 3
    assert summary["policy"] == str(run_dir / "checkpoints/policy/iteration=1")
    assert sorted(p.name for p in (run_dir / "checkpoints/policy").iterdir()) == ["iteration=0", "iteration=1"]
    assert not (run_dir / "checkpoints/policy/iteration=0/optimizer.safetensors").exists()
    assert (run_dir / "checkpoints/policy/iteration=1/optimizer.safetensors").exists()
    assert not (layout.reference(0) / "optimizer.safetensors").exists()
    sizes = [m.value for m in client.get_metric_history(run.info.run_id, "checkpoint_mb")]
    assert len(sizes) == 4 and all(s > 0 for s in sizes)

    # The time-matched SFT control ran and was logged next to the RL result.
    assert 0.0 <= summary["control_sft_accuracy"] <= 1.0
    assert client.get_metric_history(run.info.run_id, "control/sft_same_time_accuracy")
    assert (run_dir / "checkpoints/control_sft/model.safetensors").exists()


def test_process_supervision_runs_with_a_process_reward_model(prefect_api, tmp_path):
    from flows.iterative_grpo import iterative_grpo

    cfg = _config(tmp_path, "run_id=process", "loop.iterations=1", "reward.supervision=process",
                  "reward.sources=[{name: verifier}, {name: process_rm, weight: 0.5}]")
    summary = iterative_grpo(cfg)
    table = open_rollouts(RunLayout.of(tmp_path, "process").rollouts_dir).to_table()
    assert table.num_rows == 2 * 4 * 4
    # Process advantages vary along a completion (suffix sums of step rewards), unlike outcome ones.
    varying = [len(set(a)) > 1 for a in table.column("advantages").to_pylist() if a]
    assert any(varying)
    for ends, rewards in zip(table.column("step_ends").to_pylist(), table.column("step_rewards").to_pylist()):
        assert len(ends) == len(rewards)
    assert (tmp_path / "runs/process/checkpoints/process_rm/iteration=1/value_head.safetensors").exists()
    assert summary["final_accuracy"] >= 0.0
