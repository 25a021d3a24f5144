"""The deployments of prefect.yaml, on a real Prefect server with a real process worker: what the README
tells a user to do, in a throwaway PREFECT_HOME and port: `prefect server start`, `prefect work-pool
create`, `prefect deploy --all`, `prefect deployment run`, `prefect worker start`; then it waits for the
flow runs to complete. (tests/test_deploy.py reads prefect.yaml itself, in `make test`.)
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from configs import load_config
from tests.test_deploy import DEMO, EVAL, RESUME, TINY_RUN
from tests.ui.processes import free_port, stop, tail

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")


@pytest.mark.slow
def test_deploy_all_and_run_through_a_process_worker(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_CLI_PROMPT="false",
               PREFECT_WORKER_QUERY_SECONDS="2", HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true",
               TOKENIZERS_PARALLELISM="false", DO_NOT_TRACK="1", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    artifacts = tmp_path / "artifacts"
    server = worker = None
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    t_start = time.monotonic()

    def cli(*args: str, timeout: float = 180) -> str:
        out = subprocess.run([PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout + out.stderr

    def trigger(deployment: str, params: dict) -> str:
        out = cli("deployment", "run", deployment, "--params", json.dumps(params))
        match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
        assert match, out
        return match.group(1)

    def wait_for(http: httpx.Client, run_id: str, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fr = http.get(f"/flow_runs/{run_id}").json()
            state = fr.get("state") or {}
            if state.get("type") in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                assert state["type"] == "COMPLETED", f"{state}\n--- worker log ---\n{tail(worker_log)}"
                return fr
            time.sleep(2)
        raise AssertionError(f"flow run {run_id} not done after {timeout}s: {state}\n{tail(worker_log)}")

    try:
        with server_log.open("w") as log:
            server = subprocess.Popen(
                [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off"],
                cwd=tmp_path, env=server_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        with httpx.Client(base_url=api, timeout=30) as http:
            deadline = time.monotonic() + 120
            while True:
                assert server.poll() is None, f"server exited:\n{tail(server_log)}"
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"server not healthy after 120s:\n{tail(server_log)}"
                time.sleep(1)

            cli("work-pool", "create", "local-process", "--type", "process")
            cli("--no-prompt", "deploy", "--all", timeout=240)
            deployments = http.post("/deployments/filter", json={}).json()
            names = {f"{d['entrypoint'].rsplit(':', 1)[1]}/{d['name']}": d for d in deployments}
            assert set(names) == {"iterative_grpo/demo", "resume_run/one-more-iteration", "resume_run/nightly-iteration",
                                  "evaluate_checkpoint/greedy-accuracy", "compare_methods/unified-paradigm"}
            demo = names["iterative_grpo/demo"]
            assert demo["work_pool_name"] == "local-process"
            assert [s["active"] for s in demo["schedules"]] == [False]
            # the server stored the demo config as the deployment's parameter (what the UI form shows)
            assert demo["parameters"]["config"]["sft"] == yaml.safe_load((ROOT / "configs/demo.yaml").read_text())["sft"]
            (pull,) = demo["pull_steps"]  # deploy filled in this checkout as the working directory
            assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == str(ROOT)

            # A tiny pipeline run through the demo deployment (the whole config replaces the default),
            # then one more iteration of it through the resume deployment, then an evaluation.
            cfg = load_config(ROOT / "configs/demo.yaml", [*TINY_RUN, "run_id=deployed", "threads=1",
                                                          f"storage.artifacts_root={artifacts}"])
            first = trigger(DEMO, {"config": cfg.model_dump(mode="json")})
            with worker_log.open("w") as log:
                worker = subprocess.Popen(
                    [PREFECT, "worker", "start", "--pool", "local-process", "--type", "process"],
                    cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            wait_for(http, first)
            state = json.loads((artifacts / "runs/deployed/state.json").read_text())
            assert state["iteration"] == 1

            resumed = trigger(RESUME, {"run_id": "deployed", "artifacts_root": str(artifacts)})
            wait_for(http, resumed)
            state = json.loads((artifacts / "runs/deployed/state.json").read_text())
            assert state["iteration"] == 2 and Path(state["policy"]).name == "iteration=1"

            evaluated = trigger(EVAL, {"checkpoint": "run:deployed", "config": cfg.model_dump(mode="json")})
            wait_for(http, evaluated)

        from tasks.tracking import client_for

        client = client_for(cfg)
        (pipeline,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                                         filter_string="tags.pipeline_run_id = 'deployed'")
        assert max(m.step for m in client.get_metric_history(pipeline.info.run_id, "eval/accuracy")) == 2
        (ev,) = client.search_runs([pipeline.info.experiment_id], filter_string="tags.evaluated_pipeline_run = 'deployed'")
        assert ev.data.tags["checkpoint_path"] == str(artifacts / "runs/deployed" / state["policy"])
        assert 0 <= ev.data.metrics["eval/accuracy"] <= 1 and ev.data.metrics["eval/n"] == 8
        print(f"deploy test: {time.monotonic() - t_start:.0f}s")
    finally:
        stop(worker)
        stop(server)
