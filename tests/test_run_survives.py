"""A run survives anything: killed with SIGKILL at every named point (stages/faults.py), resumed in a
fresh process each time, it ends exactly as an uninterrupted run with the same seed does.

Every pipeline run here is a process of its own running `flows.iterative_grpo.main` (forked from a
process that has done the imports, tests/forked_runs.py, or a plain `python -m` where two must run at
once), on a shared Prefect API (the test harness's) and an MLflow SQLite store per artifacts root.
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
from tests.test_pipeline_e2e import TINY_RUN as E2E_RUN

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# The e2e test's tiny sizes (a policy right about half the time, so the updates are not zero), plus SFT
# checkpoints to be killed between, two samples per evaluation question, and the control.
TINY_RUN = [*E2E_RUN, "sft.checkpoint_every=30", "loop.eval_samples=2", "control.sft_same_time=true"]
# Metrics that measure time (and the control, which is given RL's CPU time): they differ between any two runs.
TIMED = {"rollout_seconds", "update_seconds", "update_step_seconds", "step_seconds", "update_tokens_per_s",
         "sft_same_time_accuracy"}
# The whole pipeline in run order, each point killed once: every process resumes the one killed before it.
CHAIN = ["sft@2", "initial_rm", "sampling", "scoring", "advantages", "update", "checkpoint_write", "update@2",
         "rm_retraining", "iteration_eval", "sampling@2", "final_eval", "sft_control"]


@pytest.fixture(scope="module")
def api_url(prefect_api):
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def forks(api_url):
    from tests.forked_runs import ForkServer

    server = ForkServer(ROOT, {**os.environ, "PREFECT_API_URL": api_url})
    yield server
    server.close()


def argv(root, run_id, *extra):
    return ["--config", str(ROOT / "configs/demo.yaml"), f"storage.artifacts_root={root}", *TINY_RUN,
            f"run_id={run_id}", *extra]


def start(api_url, root, run_id, *extra):
    """A pipeline process of its own (`python -m`), for runs that must overlap."""
    return subprocess.Popen([sys.executable, "-m", "flows.iterative_grpo", *argv(root, run_id, *extra)], cwd=ROOT,
                            env={**os.environ, "PREFECT_API_URL": api_url}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run(forks, root, run_id, *extra, crash=None, expect=0):
    log = Path(root) / f"{run_id}-{crash or 'run'}-{time.monotonic_ns()}.log"
    code = forks.run(argv(root, run_id, *extra), {"GRPO_CRASH_AT": crash or ""}, log)
    out = log.read_text()
    assert code == expect, f"{run_id} crash={crash}: exit {code}, expected {expect}\n{out[-4000:]}"
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
def shared(tmp_path_factory):
    """One artifacts root for the runs that need not start from nothing: they share the SFT warm start."""
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def straight(forks, shared):
    run(forks, shared, "r")
    return outcome(shared, "r")


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


def test_killed_at_every_point_and_resumed_each_time_it_ends_as_the_uninterrupted_run(forks, tmp_path, straight):
    for point in CHAIN:
        run(forks, tmp_path, "r", crash=point, expect=-signal.SIGKILL)
    run(forks, tmp_path, "r")
    assert_same_run(straight, outcome(tmp_path, "r"))
    # in Prefect, each killed process's flow runs were marked Crashed by the process that resumed the run
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["run:r"])))
    killed = [f for f in flow_runs if f.state.type.value == "CRASHED"]
    assert not [f for f in flow_runs if f.state.type.value in ("RUNNING", "PENDING")]
    assert len({f.parent_task_run_id is None and f.id for f in killed} - {False}) == len(CHAIN)
    assert all("was resumed by flow run" in f.state.message for f in killed)


def test_a_second_process_on_the_same_run_id_stops_at_once_naming_the_holder(api_url, forks, shared, straight):
    first = start(api_url, shared, "lock")
    lock = shared / "runs/lock/run.lock"
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text()):
        assert first.poll() is None and time.time() < deadline, "the first process never took the lock"
        time.sleep(0.05)
    second = run(forks, shared, "lock", expect=2)
    holder = json.loads(lock.read_text())
    assert second.strip().count("\n") == 0, second
    assert f"pid {holder['pid']}" in second and "run 'lock' is in use" in second
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out[-3000:]
    assert_same_run(straight, outcome(shared, "lock"))


def test_a_run_folder_moved_elsewhere_resumes_there(forks, shared, tmp_path, straight):
    run(forks, shared, "moved", crash="update@3", expect=-signal.SIGKILL)  # iteration 1, its first update
    (tmp_path / "runs").mkdir()
    shutil.move(str(shared / "runs/moved"), str(tmp_path / "runs/moved"))
    # the new root has nothing of the old one to lean on: no SFT warm start, data splits or MLflow store
    run(forks, tmp_path, "moved")
    assert_same_run(straight, outcome(tmp_path, "moved"))


def test_a_run_id_reused_with_another_config_is_refused_naming_the_fields(forks, shared):
    run(forks, shared, "cfg", crash="sampling", expect=-signal.SIGKILL)
    out = run(forks, shared, "cfg", "grpo.lr=0.0001", "sampling.temperature=0.7", expect=2)
    assert out.strip().count("\n") == 0, out
    assert "grpo.lr (3e-05 -> 0.0001)" in out and "sampling.temperature (1.0 -> 0.7)" in out
    assert "loop" not in out  # only what differs
    # what may change on resume: how many iterations (and where the run lives)
    run(forks, shared, "cfg", "loop.iterations=1")
    assert read_state(RunLayout.of(shared, "cfg")).iteration == 1


def test_checkpoints_every_two_steps_and_mu_two_resume_after_kills_between_checkpoints(forks, shared):
    extra = ["loop.steps_per_iteration=3", "loop.checkpoint_every=2", "grpo.mu=2"]
    run(forks, shared, "ce-straight", *extra)
    # sampling@2: step 1 is sampled after step 0's update, which no checkpoint holds (redone on resume);
    # update@3: step 2's update, after the checkpoint of step 1
    for point in ("sampling@2", "update@3"):
        run(forks, shared, "ce-killed", *extra, crash=point, expect=-signal.SIGKILL)
    run(forks, shared, "ce-killed", *extra)
    straight, resumed = outcome(shared, "ce-straight"), outcome(shared, "ce-killed")
    assert [s for p, s, _ in straight["records"] if p == ""] == list(range(6))
    assert_same_run(straight, resumed)
    assert sorted(p.name for p in (shared / "runs/ce-killed/checkpoints/policy").iterdir()) == \
        ["iteration=0", "iteration=1"]
    # plain hive partitioning: a generic reader sees both keys
    table = ds.dataset(str(shared / "runs/ce-killed/rollouts"), partitioning="hive").to_table()
    assert table.num_rows == 6 * 4 * 4 and sorted(set(table.column("step").to_pylist())) == list(range(6))
