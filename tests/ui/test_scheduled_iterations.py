"""Scheduled iterations: the `resume-run/nightly-iteration` deployment of prefect.yaml, switched on for a
run with the README's commands ("Schedule iterations"), on a real Prefect server with a real process
worker. Each trigger runs one more iteration of the run; a trigger that comes while an iteration runs
is cancelled by the deployment's concurrency limit, never run beside it; deploying again switches the
schedule off. (tests/ui/test_deploy_all.py runs the other deployments.)
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.test_deploy import TINY_RUN
from tests.ui.prefect_stack import ROOT, prefect_stack, wait_until

NIGHTLY = "resume-run/nightly-iteration"
RUN = "nightly"
# What an iteration learns is not the point here: the untrained tiny model, the verifier alone, no control
# and no Maj@K keep each iteration to seconds.
CHEAP_RUN = [*TINY_RUN, "sft.steps=0", "reward.sources=[{name: verifier}]", "control.sft_same_time=false",
             "loop.eval_samples=0"]


@pytest.mark.slow
def test_nightly_iteration_runs_one_iteration_per_trigger_and_never_two_at_once(tmp_path):
    t0 = time.monotonic()
    artifacts = tmp_path / "artifacts"

    def iterations() -> int:
        return json.loads((artifacts / f"runs/{RUN}/state.json").read_text())["iteration"]

    with prefect_stack(tmp_path / "prefect") as prefect:
        # the run to extend: one iteration, from the command line
        subprocess.run([sys.executable, "-m", "flows.iterative_grpo", "--config", "configs/demo.yaml", *CHEAP_RUN,
                        f"run_id={RUN}", "threads=1", f"storage.artifacts_root={artifacts}"],
                       cwd=ROOT, env=prefect.env, check=True, capture_output=True, timeout=600)
        assert iterations() == 1

        # Switched on as the README says; artifacts_root: this test's, not the checkout's artifacts/
        prefect.cli("--no-prompt", "deploy", "--name", "nightly-iteration",
                    "--param", f"run_id={RUN}", "--param", f"artifacts_root={artifacts}")
        prefect.cli("deployment", "schedule", "create", NIGHTLY, "--cron", "0 2 * * *", "--timezone", "UTC",
                    "--replace", "-y")
        nightly = prefect.deployment(NIGHTLY)
        (schedule,) = nightly["schedules"]
        assert schedule["active"] and schedule["schedule"]["cron"] == "0 2 * * *"
        assert nightly["parameters"] == {"run_id": RUN, "extra_iterations": 1, "artifacts_root": str(artifacts)}
        assert nightly["global_concurrency_limit"]["limit"] == 1
        assert nightly["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"

        # A trigger while an iteration runs (what a tick does when the last night's is not done) is
        # cancelled before it starts a process; the running one goes on to its end. The slot is taken
        # when the worker moves a flow run to PENDING, before its process starts.
        first = prefect.trigger(NIGHTLY)
        prefect.start_worker()
        wait_until("first iteration started", lambda: prefect.flow_run(first)["state_type"] in ("PENDING", "RUNNING"),
                   300, 1)
        second = prefect.wait_for(prefect.trigger(NIGHTLY), timeout=120)
        assert second["state_type"] == "CANCELLED", second["state"]
        assert second["state"]["message"] == "Deployment concurrency limit reached."
        assert prefect.flow_run(first)["state_type"] in ("PENDING", "RUNNING")  # they overlapped: the limit held
        assert prefect.wait_for(first)["state_type"] == "COMPLETED", prefect.worker_log()
        assert iterations() == 2

        # the slot is free again once the iteration ended: the next trigger runs the next iteration
        third = prefect.wait_for(prefect.trigger(NIGHTLY))
        assert third["state_type"] == "COMPLETED", prefect.worker_log()
        assert iterations() == 3

        # the schedule's ticks are runs of RUN (the scheduler made them from the deployment by now)
        ticks = prefect.http.post("/flow_runs/filter", json={
            "deployments": {"id": {"any_": [nightly["id"]]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}).json()
        assert ticks and all(t["parameters"]["run_id"] == RUN and t["expected_start_time"].endswith("T02:00:00Z")
                             for t in ticks)

        # Switched off as the README says: deployed again, the schedule is off and the run is forgotten
        prefect.cli("--no-prompt", "deploy", "--name", "nightly-iteration")
        nightly = prefect.deployment(NIGHTLY)
        assert [s["active"] for s in nightly["schedules"]] == [False] and "run_id" not in nightly["parameters"]
    print(f"scheduled iterations test: {time.monotonic() - t0:.0f} s")
