"""The deployments of prefect.yaml, on a real Prefect server with a real process worker.

The slow test does what the README tells a user to do, in a throwaway PREFECT_HOME and port:
`prefect server start`, `prefect work-pool create`, `prefect deploy --all`, `prefect deployment run`,
`prefect worker start`; then it waits for the flow runs to complete. The fast tests only read
prefect.yaml.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from configs import build_config, load_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")
DEMO, RESUME, EVAL = "iterative-grpo/demo", "resume-run/one-more-iteration", "evaluate-checkpoint/greedy-accuracy"
TINY_RUN = [
    "sft.steps=10", "data.train_size=100", "data.test_size=8", "loop.iterations=1", "loop.steps_per_iteration=1",
    "loop.questions_per_step=2", "loop.eval_every=1", "sampling.group_size=2", "sampling.max_new_tokens=16",
]


def _deployments() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return {d["name"]: d for d in spec["deployments"]}


# --- fast: the file itself ---------------------------------------------------------------------------

def test_demo_deployment_parameters_are_the_demo_config():
    deps = _deployments()
    demo = load_config(ROOT / "configs/demo.yaml")
    assert build_config(deps["demo"]["parameters"]["config"]) == demo
    assert build_config(deps["greedy-accuracy"]["parameters"]["config"]) == demo


def test_deployments_point_at_flows_that_accept_their_parameters():
    from prefect.flows import load_flow_from_entrypoint

    for dep in _deployments().values():
        assert dep["work_pool"]["name"] == "local-process"
        flow = load_flow_from_entrypoint(str(ROOT / dep["entrypoint"]))
        required = {"run_id": "some-run"} if dep["name"] in ("one-more-iteration", "nightly-iteration") else {}
        flow.validate_parameters({**dep["parameters"], **required})
    (schedule,) = _deployments()["demo"]["schedules"]
    assert schedule["active"] is False and schedule["cron"]


# --- slow: server, deploy, worker, runs --------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen | None, grace: float = 15) -> None:
    """SIGTERM the process group we started, again if ignored (workers may ignore the first), then KILL."""
    if proc is None or proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


@pytest.mark.slow
def test_deploy_all_and_run_through_a_process_worker(tmp_path):
    port = _free_port()
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
                assert state["type"] == "COMPLETED", f"{state}\n--- worker log ---\n{_tail(worker_log)}"
                return fr
            time.sleep(2)
        raise AssertionError(f"flow run {run_id} not done after {timeout}s: {state}\n{_tail(worker_log)}")

    try:
        with server_log.open("w") as log:
            server = subprocess.Popen(
                [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off"],
                cwd=tmp_path, env=server_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        with httpx.Client(base_url=api, timeout=30) as http:
            deadline = time.monotonic() + 120
            while True:
                assert server.poll() is None, f"server exited:\n{_tail(server_log)}"
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"server not healthy after 120s:\n{_tail(server_log)}"
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
        _stop(worker)
        _stop(server)
