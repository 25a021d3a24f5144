"""The MLflow UI on a store, started the way the README starts it (`mlflow ui --host 127.0.0.1 ...`) on a
free port. It starts at once and is waited for only when needed: its start takes tens of seconds on a
small machine, spent while the Prefect server starts."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx

from tests.ui.processes import free_port, stop, tail
from tests.ui.prefect_stack import BIN, wait_until


class MlflowUI:
    def __init__(self, store: Path, log: Path):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = log
        store.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            # --workers 1: one user; the default four cost a core for a minute on a 2-core machine.
            self.proc = subprocess.Popen(
                [str(BIN / "mlflow"), "ui", "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1],
                 "--workers", "1", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
                 "--default-artifact-root", str(store / "mlartifacts")],
                cwd=log.parent, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout: float = 180) -> str:
        def healthy() -> bool:
            assert self.proc.poll() is None, f"mlflow ui exited:\n{tail(self.log)}"
            try:
                return httpx.get(f"{self.url}/health", timeout=10).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(f"MLflow UI at {self.url} healthy ({self.log})", healthy, timeout)
        return self.url

    def close(self) -> None:
        stop(self.proc)
