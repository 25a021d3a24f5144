"""Prefect tasks around the pipeline's stages.

Importing this package (the flows import it) turns the usage telemetry of Prefect's server and of
MLflow off unless the environment turns it on: a pipeline run talks to nothing beyond this machine.
It also gives Prefect's temporary server two minutes rather than 20 s to start: on a busy 2-core
machine it can take longer than 20 s, and the run would fail before it began.
"""
import os

for _name, _value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                      "DO_NOT_TRACK": "1", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}.items():
    os.environ.setdefault(_name, _value)
