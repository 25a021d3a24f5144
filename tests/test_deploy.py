"""The deployments of prefect.yaml, read: their parameters are the demo config and the flows accept them.
(tests/ui/test_deploy_all.py deploys them on a live server and runs them through a worker: `make test-ui`.)
"""
from __future__ import annotations

from pathlib import Path

import yaml

from configs import build_config, load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO, RESUME, EVAL = "iterative-grpo/demo", "resume-run/one-more-iteration", "evaluate-checkpoint/greedy-accuracy"
TINY_RUN = [
    "sft.steps=10", "data.train_size=100", "data.test_size=8", "loop.iterations=1", "loop.steps_per_iteration=1",
    "loop.questions_per_step=2", "loop.eval_every=1", "sampling.group_size=2", "sampling.max_new_tokens=16",
]


def _deployments() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return {d["name"]: d for d in spec["deployments"]}


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
