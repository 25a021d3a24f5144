"""The model registry: each iteration's policy and learned reward models as MLflow model versions, `best`
moving only when held-out accuracy rises, and registry references resolved for evaluation and as
model.policy. Tracking's secrets: a password in the MLflow URI never reaches params or config.yaml."""
import shutil
import warnings
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from configs import PipelineConfig, UserError, load_config
from stages.evaluation import Evaluation
from stages.rollout_store import write_atomic
from stages.run_layout import RunLayout
from stages.run_state import RunState
from tasks import registry, tracking

ROOT = Path(__file__).resolve().parents[1]
# The smallest run with everything a version is tagged with: 2 iterations of one step, an outcome RM that
# is retrained, Maj@K. An untrained tiny model (sft.steps=0): accuracy is not the point here.
TINY_RUN = [
    "sft.steps=0", "data.arithmetic.min_steps=1", "data.arithmetic.max_steps=1", "data.train_size=64",
    "data.test_size=8", "loop.iterations=2", "loop.steps_per_iteration=1", "loop.questions_per_step=2",
    "loop.eval_every=100", "loop.eval_samples=2", "loop.eval_sample_questions=4", "sampling.group_size=2",
    "sampling.max_new_tokens=8", "reward_model.init_questions=2", "reward_model.init_samples_per_question=2",
    "reward_model.epochs=1", "control.sft_same_time=false",
    "reward.sources=[{name: verifier}, {name: outcome_rm, weight: 0.5}]",
]


def _ev(accuracy: float) -> Evaluation:
    return Evaluation(accuracy=accuracy, answered=1.0, mean_length=5.0, n=8, k=2, sample_questions=4,
                      maj_at_k=accuracy / 2, pass_at_k=accuracy, pass_at_1=accuracy / 2)


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One MLflow store for the tests that need no flow (creating one costs seconds), an experiment each."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _run_folder(tmp_path, tiny_dir, mlflow_uri, iterations: int, **config) -> tuple[PipelineConfig, RunLayout, str]:
    """A run folder with `iterations` iterations of rollouts and policy checkpoints, and its MLflow run (in an
    experiment, and so a registered model, named after the test)."""
    cfg = PipelineConfig(run_id="r", storage={"artifacts_root": str(tmp_path)}, **config,
                         tracking={"mlflow_uri": mlflow_uri, "experiment": tmp_path.name})
    layout = RunLayout.of(tmp_path, "r")
    rows = pa.table({"question_id": ["q1", "q1"], "sample_index": pa.array([0, 1], pa.int32()),
                     "completion": ["1", "2"], "reward": [1.0, 0.0], "completion_ids": [[5], [6]]})
    for k in range(iterations):
        write_atomic(rows, layout.rollouts(k, k))
        shutil.copytree(tiny_dir, layout.policy_iteration(k))
    return cfg, layout, tracking.open_run(cfg, "r")


def test_best_moves_only_when_held_out_accuracy_rises_and_a_redone_registration_adds_nothing(tmp_path, tiny_dir,
                                                                                              mlflow_uri):
    cfg, layout, run = _run_folder(tmp_path, tiny_dir, mlflow_uri, 4)
    name = cfg.tracking.registry_name()
    client = tracking.client_for(cfg)
    best = []
    for k, accuracy in enumerate([0.5, 0.25, 0.5, 0.75]):
        state = RunState(run_id="r", policy=layout.ref(layout.policy_iteration(k)), initial_eval=_ev(0.0))
        policy = str(layout.policy_iteration(k))
        version = registry.register_iteration(cfg, run, layout, state, k, policy, _ev(accuracy))
        assert version.version == k + 1
        best.append(client.get_model_version_by_alias(name, "best").version)
    assert best == [1, 1, 1, 4]  # a tie (0.5 again) keeps the earlier version
    # A process killed after registering iteration 3 but before committing it registers it again on resume.
    again = registry.register_iteration(cfg, run, layout, state, 3, str(layout.policy_iteration(3)), _ev(0.75))
    assert again.version == 4 and len(client.search_model_versions(f"name = '{name}'")) == 4
    assert len(client.get_run(run).outputs.model_outputs) == 4
    assert len(client.get_run(run).inputs.dataset_inputs) == 4

    v2 = client.get_model_version(name, "2")
    assert v2.source == layout.policy_iteration(1).resolve().as_uri() and v2.run_id == run
    assert {k: v2.tags[k] for k in ("iteration", "step", "eval/accuracy", "eval/maj_at_2", "pipeline_run_id",
                                    "run_id", "rollouts", "reward_sources")} == {
        "iteration": "1", "step": "100", "eval/accuracy": "0.25", "eval/maj_at_2": "0.125", "pipeline_run_id": "r",
        "run_id": run, "rollouts": "rollouts-iteration-1", "reward_sources": "verifier"}
    logged = client.get_logged_model(v2.tags["model_id"])
    assert (logged.name, logged.source_run_id, logged.tags["mlflow.model.isExternal"]) == ("policy-iteration-1", run,
                                                                                           "true")
    assert client.list_logged_model_artifacts(logged.model_id) == []  # its weights are the run's checkpoint

    # References: as model.policy (a one-line error naming the field when nothing is there) and for evaluation.
    start, version = registry.resolve_policy(cfg.model_copy(update={"model": cfg.model.model_copy(
        update={"policy": f"models:/{name}@best"})}))
    assert start.model.policy == str(layout.policy_iteration(3).resolve()) and version.version == 4
    assert registry.resolve_policy(cfg) == (cfg, None)
    assert registry.local_folder(registry.model_version(cfg, f"models:/{name}@latest", "checkpoint"),
                                 "checkpoint") == str(layout.policy_iteration(3).resolve())
    with pytest.raises(UserError, match=rf"^model\.policy: models:/{name}@gone: Registered model alias gone not "
                                        r"found\. \(registry sqlite:///"):
        registry.model_version(cfg, f"models:/{name}@gone", "model.policy")
    shutil.rmtree(layout.policy_iteration(0))
    with pytest.raises(UserError, match=rf"^checkpoint: models:/{name}/1 points at .*iteration=0, which no longer"):
        registry.local_folder(registry.model_version(cfg, f"models:/{name}/1", "checkpoint"), "checkpoint")


def test_under_lora_the_adapters_are_logged_and_their_base_named(tmp_path, tiny_dir, mlflow_uri):
    from models.lora import add_adapters
    from models.loading import load_policy
    from stages.checkpoints import save_checkpoint

    cfg, layout, run = _run_folder(tmp_path, tiny_dir, mlflow_uri, 1, model={"lora": {"enabled": True, "r": 4}})
    base = shutil.copytree(tiny_dir, layout.reference(0))
    model, tok = load_policy(str(base))
    adapters = save_checkpoint(add_adapters(model, cfg.model.lora, seed=0), tok, layout.policy_step(0),
                               torch.optim.AdamW(model.parameters()), adapter_base=str(base))
    state = RunState(run_id="r", policy=layout.ref(adapters), initial_eval=_ev(0.0))
    version = registry.register_iteration(cfg, run, layout, state, 0, str(layout.policy_iteration(0)), _ev(0.5))

    client = tracking.client_for(cfg)
    assert version.source == layout.policy_iteration(0).resolve().as_uri()  # the merged export: loads anywhere
    assert version.tags["lora.base_checkpoint"] == str(base) and version.tags["lora.base_model"] == "tiny"
    logged = client.get_logged_model(version.tags["model_id"])
    assert "mlflow.model.isExternal" not in logged.tags
    assert sorted(a.path for a in client.list_logged_model_artifacts(logged.model_id)) == [
        "adapter_config.json", "adapter_model.safetensors"]  # not the step checkpoint's tokenizer and optimizer
    copied = Path(logged.artifact_location.removeprefix("file://")) / "adapter_model.safetensors"
    want = load_file(str(adapters / "adapter_model.safetensors"))
    assert all(torch.equal(t, want[k]) for k, t in load_file(str(copied)).items())


def test_a_password_in_the_mlflow_uri_is_masked_in_params_and_config_files(tmp_path, monkeypatch, mlflow_uri):
    from stages.run_state import check_same_config

    cfg = PipelineConfig(run_id="r", storage={"artifacts_root": str(tmp_path)},
                         tracking={"mlflow_uri": "postgresql://bob:hunter2@db.internal:5432/mlflow"})
    assert cfg.mlflow_uri() == "postgresql://bob:hunter2@db.internal:5432/mlflow"  # what the run connects with
    store = tracking.client_for(PipelineConfig(tracking={"mlflow_uri": mlflow_uri}))  # no server in a test
    monkeypatch.setattr(tracking, "client_for", lambda _cfg: store)
    run = store.get_run(tracking.open_run(cfg, "r"))
    assert run.data.params["tracking.mlflow_uri"] == "postgresql://bob:***@db.internal:5432/mlflow"
    config_artifact = Path(run.info.artifact_uri.removeprefix("file://")) / "config.yaml"
    assert "mlflow_uri: postgresql://bob:***@db.internal:5432/mlflow" in config_artifact.read_text()
    layout = RunLayout.of(tmp_path, "r")
    check_same_config(layout, cfg)  # the run folder's config.yaml
    assert "hunter2" not in layout.config.read_text() and "bob:***@" in layout.config.read_text()


@pytest.mark.slow
def test_a_two_iteration_run_registers_its_models_and_best_loads_for_evaluation(prefect_api, one_thread, tmp_path):
    from flows.deployments import evaluate_checkpoint
    from flows.iterative_grpo import iterative_grpo

    cfg = load_config(ROOT / "configs/demo.yaml", [f"storage.artifacts_root={tmp_path}", *TINY_RUN, "run_id=two"])
    with warnings.catch_warnings(record=True) as caught:  # what a console shows: DeprecationWarnings are hidden
        warnings.simplefilter("always")                      # outside __main__
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        summary = iterative_grpo(cfg)
    # None: MLflow's dataset-source and integer-schema warnings, transformers' past_key_values one
    assert [f"{w.filename}: {w.message}" for w in caught] == []

    client, name, layout = tracking.client_for(cfg), cfg.tracking.registry_name(), RunLayout.of(tmp_path, "two")
    run = client.get_run(summary["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: v.version)
    assert [v.source for v in versions] == [layout.policy_iteration(k).resolve().as_uri() for k in (0, 1)]
    assert all((layout.policy_iteration(k) / "model.safetensors").exists() for k in (0, 1))  # never pruned
    evals = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/accuracy")}
    maj = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/maj_at_2")}
    rm = f"{name}-outcome_rm"
    rm_sources = [v.source for v in sorted(client.search_model_versions(f"name = '{rm}'"), key=lambda v: v.version)]
    assert rm_sources == [layout.reward_model("outcome", d).resolve().as_uri() for d in (0, 1, 2)]
    datasets = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    for k, v in enumerate(versions):
        assert (v.tags["iteration"], v.tags["step"], v.run_id) == (str(k), str(k + 1), run.info.run_id)
        assert (float(v.tags["eval/accuracy"]), float(v.tags["eval/maj_at_2"])) == (evals[k + 1], maj[k + 1])
        # iteration k's rollouts were scored by the RM trained on data iteration k (version k + 1)
        assert v.tags["reward_model.outcome_rm"] == f"models:/{rm}/{k + 1}"
        assert datasets[v.tags["rollouts"]] == v.tags["rollouts_digest"]
    assert {o.model_id: o.step for o in run.outputs.model_outputs}[versions[1].tags["model_id"]] == 2
    best = max(versions, key=lambda v: (float(v.tags["eval/accuracy"]), -v.version))  # the earlier on a tie
    assert client.get_model_version_by_alias(name, "best").version == best.version
    assert client.get_model_version_by_alias(name, "latest").version == 2

    result = evaluate_checkpoint(checkpoint=f"models:/{name}@best", config=cfg)
    assert result["checkpoint"] == str(layout.policy_iteration(best.version - 1).resolve())
    assert result["accuracy"] == float(best.tags["eval/accuracy"])
    eval_run = client.get_run(result["mlflow_run_id"])
    assert eval_run.data.tags["input_model_version"] == f"models:/{name}/{best.version}"
    assert [m.model_id for m in eval_run.inputs.model_inputs] == [best.tags["model_id"]]

    # Continue from the best model without a path: the run starts from that version's folder, its config
    # keeps the reference as given, and its MLflow run names the version it started from.
    follow = load_config(ROOT / "configs/demo.yaml", [
        f"storage.artifacts_root={tmp_path}", *TINY_RUN, "run_id=from-best", f"model.policy=models:/{name}@best",
        "loop.iterations=1", "reward.sources=[{name: verifier}]", "loop.eval_samples=0"])
    follow_run = client.get_run(iterative_grpo(follow)["mlflow_run_id"])
    start = load_file(str(RunLayout.of(tmp_path, "from-best").reference(0) / "model.safetensors"))
    best_weights = load_file(str(layout.policy_iteration(best.version - 1) / "model.safetensors"))
    assert all(torch.equal(start[k], best_weights[k]) for k in best_weights)
    assert follow_run.data.params["model.policy"] == f"models:/{name}@best"
    assert f"policy: models:/{name}@best" in RunLayout.of(tmp_path, "from-best").config.read_text()
    assert follow_run.data.tags["input_model_version"] == f"models:/{name}/{best.version}"
