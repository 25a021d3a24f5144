"""Prefect tasks around the pipeline's stages.

Importing this package (the flows import it) turns the usage telemetry of Prefect's server and of
MLflow off unless the environment turns it on: a pipeline run talks to nothing beyond this machine.
"""
import os

for _name, _value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                      "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(_name, _value)
