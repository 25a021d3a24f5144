"""Fixtures of the browser test: its output folder, the Prefect server and worker with the demo deployed,
the MLflow UI on the run's store, the browser. Each stops what it started when the test ends, passed or
failed."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.ui.browser import Browser
from tests.ui.mlflow_ui import MlflowUI
from tests.ui.prefect_stack import ROOT, PrefectStack, prefect_stack

OUT = ROOT / "artifacts" / "ui-test"


@pytest.fixture(scope="module")
def out() -> Path:
    """artifacts/ui-test/: the screenshots, the servers' logs and PREFECT_HOME, and `store/`, the
    artifacts root of the run the test starts (its MLflow store too). Emptied first: what is there after
    a run is that run's."""
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "screenshots").mkdir(parents=True)
    return OUT


@pytest.fixture(scope="module")
def prefect(out) -> PrefectStack:
    with prefect_stack(out / "prefect") as stack:
        stack.cli("--no-prompt", "deploy", "--name", "demo")
        stack.start_worker()
        yield stack


@pytest.fixture(scope="module")
def mlflow_ui(out) -> MlflowUI:
    ui = MlflowUI(out / "store", out / "mlflow-ui.log")
    try:
        yield ui
    finally:
        ui.close()


@pytest.fixture()
def browser(out) -> Browser:
    b = Browser(out / "screenshots")
    try:
        yield b
    finally:
        b.quit()
