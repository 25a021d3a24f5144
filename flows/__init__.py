"""The pipeline's Prefect flows.

Usage telemetry of Prefect's server and of MLflow is off unless the environment turns it on: a run
started with `python -m flows...` talks to nothing beyond this machine, as under `make`.
"""
import os

for _name, _value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                      "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(_name, _value)
