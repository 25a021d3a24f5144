"""A run survives anything: killed with SIGKILL at every named point (stages/faults.py), resumed in a
fresh process each time, it ends exactly as an uninterrupted run with the same seed does.

Every pipeline run here is a real `python -m flows.iterative_grpo` process on a shared Prefect API
(the test harness's) and its own MLflow SQLite store, with the tiny sizes of tests/test_pipeline_e2e.py.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import torch
from safetensors.torch import load_file

from configs import load_config
from stages.rollout_store import open_rollouts
from stages.run_layout import RunLayout
from stages.run_state import committed_records, read_state

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# One-operation problems and 80 SFT steps: the policy is right about half the time, so groups differ,
# gradients are not zero, and "the same final weights" says something.
TINY_RUN = [
    "sft.steps=80", "sft.batch_size=16", "sft.checkpoint_every=30", "data.arithmetic.min_steps=1",
    "data.arithmetic.max_steps=1", "data.train_size=300", "data.test_size=16", "loop.iterations=2",
    "loop.steps_per_iteration=2", "loop.questions_per_step=4", "loop.eval_every=1", "sampling.group_size=4",
    "sampling.max_new_tokens=16", "reward_model.init_questions=8", "reward_model.init_samples_per_question=2",
    "reward_model.epochs=1", "loop.eval_samples=2", "control.sft_same_time=true",
]
# Metrics that measure time (and the control, which is given RL's CPU time): they differ between any two runs.
TIMED = {"rollout_seconds", "update_seconds", "update_step_seconds", "step_seconds", "update_tokens_per_s",
         "sft_same_time_accuracy"}
# The whole pipeline in run order, each point killed once: every process resumes the one killed before it.
CHAIN = ["sft@2", "initial_rm", "sampling", "scoring", "advantages", "update", "checkpoint_write", "update@2",
         "rm_retraining", "iteration_eval", "sampling@2", "final_eval", "sft_control"]


@pytest.fixture(scope="module")
def api_url():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def start(api_url, root, run_id, *extra, crash=None):
    env = {**os.environ, "PREFECT_API_URL": api_url, "PYTHONUNBUFFERED": "1"}
    env.pop("GRPO_CRASH_AT", None)
    if crash:
        env["GRPO_CRASH_AT"] = crash
    cmd = [sys.executable, "-m", "flows.iterative_grpo", "--config", str(ROOT / "configs/demo.yaml"),
           f"storage.artifacts_root={root}", *TINY_RUN, f"run_id={run_id}", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run(api_url, root, run_id, *extra, crash=None, expect=0):
    proc = start(api_url, root, run_id, *extra, crash=crash)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == expect, f"{run_id} crash={crash}: exit {proc.returncode}, expected {expect}\n{out[-4000:]}"
    return out


def outcome(root, run_id):
    """What a finished run left: rollouts, committed metrics, MLflow histories, final weights."""
    from tasks.tracking import client_for

    layout = RunLayout.of(root, run_id)
    state = read_state(layout)
    rollouts = open_rollouts(layout.rollouts_dir).to_table().drop_columns(["sampled_at"]).sort_by(
        [("iteration", "ascending"), ("step", "ascending"), ("group_index", "ascending"),
         ("sample_index", "ascending")])
    records = [(r.prefix, r.step, {k: v for k, v in r.metrics.items() if k not in TIMED})
               for r in committed_records(layout, state)]
    cfg = load_config(None, [f"storage.artifacts_root={root}"])
    client = client_for(cfg)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.pipeline_run_id = '{run_id}'")
    assert len(runs) == 1, f"{len(runs)} MLflow runs for {run_id}"
    history = {key: sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, key))
               for key in runs[0].data.metrics}
    weights = load_file(str(layout.root / state.policy / "model.safetensors"))
    files = sorted(p.relative_to(layout.rollouts_dir).as_posix() for p in layout.rollouts_dir.rglob("*.parquet"))
    return dict(state=state, rollouts=rollouts, records=records, history=history, weights=weights, files=files,
                mlflow_status=runs[0].info.status, layout=layout)


def assert_same_run(a, b):
    assert b["files"] == a["files"]  # each step's file exactly once, nothing else left
    assert all(f.endswith("/part-0.parquet") for f in b["files"])
    ra, rb = a["rollouts"].drop_columns(["run_id"]), b["rollouts"].drop_columns(["run_id"])
    assert rb.equals(ra)
    assert [(p, s) for p, s, _ in b["records"]] == [(p, s) for p, s, _ in a["records"]]  # each record once, in order
    for (_, _, ma), (p, s, mb) in zip(a["records"], b["records"]):
        assert mb.keys() == ma.keys(), (p, s)
        assert mb == pytest.approx(ma, rel=1e-6, abs=1e-7), (p, s)
    assert b["history"] == a["history"]  # in MLflow: every key once per step, no gap
    assert b["mlflow_status"] == "FINISHED"
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    assert not list(b["layout"].root.rglob(".*tmp*"))


@pytest.fixture(scope="module")
def straight(api_url, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    run(api_url, root, "r")
    return outcome(root, "r")


def test_an_uninterrupted_run_records_each_step_and_evaluation_once(straight):
    M, I = 2, 2
    assert straight["files"] == [f"iteration={s // M}/step={s}/part-0.parquet" for s in range(M * I)]
    steps = [s for p, s, _ in straight["records"] if p == ""]
    assert steps == list(range(M * I))
    evals = [s for p, s, _ in straight["records"] if p == "eval/"]
    assert evals == [0, 1, 2, 3, 4]  # the SFT start, every step (eval_every=1), each iteration's end once
    assert [s for p, s, _ in straight["records"] if p == "rm/"] == [0, 2, 4]
    assert straight["history"]["eval/accuracy"] == [0, 1, 2, 3, 4]
    assert straight["history"]["reward_mean"] == [0, 1, 2, 3]
    assert straight["state"].iteration == I and straight["state"].control_accuracy is not None
    # the policy learned something, so equal final weights elsewhere mean the same updates
    assert any(m.get("grad_norm", 0) > 0 for p, _, m in straight["records"] if p == "")
    sft = load_file(str(straight["layout"].reference(0) / "model.safetensors"))
    assert any(not torch.equal(sft[k], straight["weights"][k]) for k in sft)
    # each row names the policy that sampled it by its version (GRPO steps taken), which the run records
    t = straight["rollouts"]
    assert t.column("policy_version").to_pylist() == t.column("step").to_pylist()


def test_killed_at_every_point_and_resumed_each_time_it_ends_as_the_uninterrupted_run(api_url, tmp_path, straight):
    for point in CHAIN:
        run(api_url, tmp_path, "r", crash=point, expect=-signal.SIGKILL)
    run(api_url, tmp_path, "r")
    assert_same_run(straight, outcome(tmp_path, "r"))


def test_a_second_process_on_the_same_run_id_stops_at_once_naming_the_holder(api_url, tmp_path, straight):
    first = start(api_url, tmp_path, "r")
    lock = tmp_path / "runs/r/run.lock"
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text()):
        assert first.poll() is None and time.time() < deadline, "the first process never took the lock"
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-m", "flows.iterative_grpo", "--config", str(ROOT / "configs/demo.yaml"),
                             f"storage.artifacts_root={tmp_path}", *TINY_RUN, "run_id=r"], cwd=ROOT,
                            env={**os.environ, "PREFECT_API_URL": api_url}, capture_output=True, text=True, timeout=120)
    holder = json.loads(lock.read_text())
    assert second.returncode == 2
    assert second.stderr.strip().count("\n") == 0, second.stderr
    assert f"pid {holder['pid']}" in second.stderr and "run 'r' is in use" in second.stderr
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out[-3000:]
    assert_same_run(straight, outcome(tmp_path, "r"))


def test_a_run_folder_moved_elsewhere_resumes_there(api_url, tmp_path, straight):
    old, new = tmp_path / "old", tmp_path / "new"
    run(api_url, old, "r", crash="update@3", expect=-signal.SIGKILL)  # iteration 1, its first update
    (new / "runs").mkdir(parents=True)
    shutil.move(str(old / "runs/r"), str(new / "runs/r"))
    shutil.rmtree(old)  # nothing of the old place is left to lean on (SFT cache, data, MLflow store)
    run(api_url, new, "r")
    assert_same_run(straight, outcome(new, "r"))


def test_a_run_id_reused_with_another_config_is_refused_naming_the_fields(api_url, tmp_path):
    run(api_url, tmp_path, "r", crash="sampling", expect=-signal.SIGKILL)
    out = run(api_url, tmp_path, "r", "grpo.lr=0.0001", "sampling.temperature=0.7", expect=2)
    assert out.strip().count("\n") == 0, out
    assert "grpo.lr (3e-05 -> 0.0001)" in out and "sampling.temperature (1.0 -> 0.7)" in out
    assert "loop" not in out  # only what differs
    # what may change on resume: how many iterations (and where the run lives)
    run(api_url, tmp_path, "r", "loop.iterations=1")
    assert read_state(RunLayout.of(tmp_path, "r")).iteration == 1


def test_checkpoints_every_two_steps_and_mu_two_resume_after_kills_between_checkpoints(api_url, tmp_path_factory):
    extra = ["loop.steps_per_iteration=3", "loop.checkpoint_every=2", "grpo.mu=2"]
    a, b = tmp_path_factory.mktemp("ce-straight"), tmp_path_factory.mktemp("ce-killed")
    run(api_url, a, "r", *extra)
    # sampling@2: step 1 is sampled after step 0's update, which no checkpoint holds (redone on resume);
    # update@3: step 2's update, after the checkpoint of step 1
    for point in ("sampling@2", "update@3"):
        run(api_url, b, "r", *extra, crash=point, expect=-signal.SIGKILL)
    run(api_url, b, "r", *extra)
    straight, resumed = outcome(a, "r"), outcome(b, "r")
    assert [s for p, s, _ in straight["records"] if p == ""] == list(range(6))
    assert_same_run(straight, resumed)
    assert sorted(p.name for p in (b / "runs/r/checkpoints/policy").iterdir()) == ["iteration=0", "iteration=1"]
    assert ds.dataset(str(b / "runs/r/rollouts"), partitioning="hive").to_table().num_rows == 6 * 2 * 4
