"""A Prefect server and a process worker of a test's own, started the way the README starts them
(`prefect server start`, `prefect work-pool create`, `prefect deploy`, `prefect worker start`) with a
private PREFECT_HOME, on 127.0.0.1 and a free port. The browser test and
tests/ui/test_scheduled_iterations.py use it; `prefect_stack()` stops every process it started, however
the test ends.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import httpx

from tests.ui.processes import free_port, stop, tail

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
T = TypeVar("T")


def wait_until(what: str, check: Callable[[], T | None], timeout: float, every: float = 2) -> T:
    """`check()`'s first truthy result, polled every `every` seconds for up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:.0f} s")
        time.sleep(every)


class PrefectStack:
    def __init__(self, folder: Path):
        self.folder = folder
        self.url = f"http://127.0.0.1:{free_port()}"
        self.api = f"{self.url}/api"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(folder / "prefect-home"), PREFECT_API_URL=self.api,
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_CLI_PROMPT="false",
                   PREFECT_WORKER_QUERY_SECONDS="2", HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true",
                   TOKENIZERS_PARALLELISM="false", DO_NOT_TRACK="1", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
        self.env = env
        self.http = httpx.Client(base_url=self.api, timeout=30)
        self.server: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None

    def start_server(self, timeout: float = 180) -> None:
        # The UI asks PREFECT_UI_API_URL for its API, 127.0.0.1:4200 when unset: --port alone would leave
        # the UI of a server on another port talking to nothing.
        env = {k: v for k, v in self.env.items() if k != "PREFECT_API_URL"} | {"PREFECT_UI_API_URL": self.api}
        log = self.folder / "server.log"
        self.server = self._start([PREFECT, "server", "start", "--host", "127.0.0.1",
                                   "--port", self.url.rsplit(":", 1)[1], "--analytics-off"], env, log)

        def healthy() -> bool:
            assert self.server.poll() is None, f"server exited:\n{tail(log)}"
            try:
                return self.http.get("/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(f"Prefect server at {self.url} healthy ({log})", healthy, timeout, every=1)

    def start_worker(self) -> None:
        self.worker = self._start([PREFECT, "worker", "start", "--pool", "local-process", "--type", "process"],
                                  self.env, self.folder / "worker.log")

    def _start(self, cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
        # cwd: the stack's folder, so that nothing a process writes beside itself lands in the checkout;
        # a session of its own, so that stopping it stops its children (the worker's flow runs) too.
        with log.open("w") as out:
            return subprocess.Popen(cmd, cwd=self.folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def cli(self, *args: str, timeout: float = 240) -> str:
        """`prefect <args>` from the repository root (where prefect.yaml is); fails the test on an error."""
        out = subprocess.run([PREFECT, *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout + out.stderr

    def trigger(self, deployment: str, params: dict | None = None) -> str:
        """`prefect deployment run`; the new flow run's id."""
        out = self.cli("deployment", "run", deployment, *(["--params", json.dumps(params)] if params else []))
        match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
        assert match, out
        return match.group(1)

    def deployment(self, name: str) -> dict:
        return self.http.get(f"/deployments/name/{name}").raise_for_status().json()

    def flow_runs_of(self, deployment_id: str) -> list[dict]:
        body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}}
        return self.http.post("/flow_runs/filter", json=body).raise_for_status().json()

    def flow_run(self, flow_run_id: str) -> dict:
        return self.http.get(f"/flow_runs/{flow_run_id}").raise_for_status().json()

    def wait_for(self, flow_run_id: str, timeout: float = 300) -> dict:
        """The flow run once it has reached a terminal state (whichever)."""
        try:
            return wait_until(f"flow run {flow_run_id} done",
                              lambda: (fr := self.flow_run(flow_run_id))["state_type"] in TERMINAL and fr, timeout)
        except AssertionError as err:
            raise AssertionError(f"{err}\n--- worker log ---\n{self.worker_log()}") from None

    def worker_log(self) -> str:
        return tail(self.folder / "worker.log")

    def server_log(self) -> str:
        return tail(self.folder / "server.log")

    def close(self) -> None:
        stop(self.worker)
        stop(self.server)
        self.http.close()


@contextmanager
def prefect_stack(folder: Path) -> Iterator[PrefectStack]:
    """A healthy Prefect server with the `local-process` work pool; the worker starts on request."""
    folder.mkdir(parents=True, exist_ok=True)
    stack = PrefectStack(folder)
    try:
        stack.start_server()
        stack.cli("work-pool", "create", "local-process", "--type", "process")
        yield stack
    finally:
        stack.close()
