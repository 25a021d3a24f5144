"""The MLflow model registry of the pipeline: each iteration's policy and learned reward models as model
versions, and registry references resolved back to checkpoint folders.

    <tracking.registered_model>              the policy, one version per iteration of each run
        @best                                the highest held-out greedy accuracy so far (moves only when it rises)
        @latest, /latest                     the newest version: MLflow's own (it reserves the alias name)
    <tracking.registered_model>-outcome_rm   a learned reward model, one version per data iteration
    <tracking.registered_model>-process_rm

A version's source is the checkpoint folder the run keeps anyway (the iteration's policy checkpoint, a
reward model's checkpoint; `RunLayout.prune_checkpoints` never deletes either): no weights are copied.
Each version also has a logged model of the run (`policy-iteration-<k>`, at the iteration's step), external
(its weights are that folder) except under LoRA, where it holds the iteration's adapters (MBs, from a step
checkpoint that is pruned) and its tags name the base they apply to.

Registration runs before the iteration's commit and is safe to repeat: a run killed in between registers
the iteration again on resume and finds what it had registered.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from mlflow.entities import LoggedModel, LoggedModelInput, LoggedModelOutput
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.utils.models import get_model_name_and_version
from mlflow.tracking import MlflowClient
from mlflow.utils.file_utils import local_file_uri_to_path
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL

from configs import PipelineConfig, UserError
from configs.schema import masked_uri
from models.lora import base_of, is_adapter_checkpoint
from stages.evaluation import Evaluation
from stages.run_layout import RunLayout
from stages.run_state import RunState
from tasks import tracking
from tasks.reward_models import KINDS

BEST = "best"
INPUT_TAG = "input_model_version"  # on a run that started from, or evaluated, a registered version


def register_iteration(cfg: PipelineConfig, mlflow_run_id: str, layout: RunLayout, state: RunState, iteration: int,
                       policy: str, ev: Evaluation) -> ModelVersion:
    """Register RL iteration `iteration`'s policy (checkpoint `policy`, evaluated `ev`) with its rollouts as
    the run's training input, and the learned reward models that scored them or were retrained on them;
    `best` moves to it when its held-out accuracy is above best's. `state`: before the iteration's commit (its
    policy is the last step's checkpoint: under LoRA, the adapters)."""
    client = tracking.client_for(cfg)
    rollouts = tracking.log_rollouts(cfg, mlflow_run_id, layout.iteration_rollouts(iteration),
                                     f"rollouts-iteration-{iteration}")
    step = (iteration + 1) * cfg.loop.steps_per_iteration
    tags = {"pipeline_run_id": cfg.run_id, "run_id": mlflow_run_id, "iteration": iteration, "step": step,
            "eval/accuracy": ev.accuracy, "reward_sources": ",".join(s.name for s in cfg.reward.sources),
            "rollouts": rollouts.name, "rollouts_digest": rollouts.digest}
    if ev.k:
        tags.update({f"eval/maj_at_{ev.k}": ev.maj_at_k, f"eval/pass_at_{ev.k}": ev.pass_at_k})
    newest = state.reward_models_data_iteration
    scorer = min(newest, iteration)  # RMs of data iteration d score RL iteration d (0: the SFT samples'); frozen: 0
    for name in state.reward_models:
        rm = _register_reward_model(cfg, client, mlflow_run_id, layout, name, scorer)
        tags[f"reward_model.{name}"] = f"models:/{rm.name}/{rm.version}"
        if newest > scorer:  # retrained on this iteration's rollouts
            _register_reward_model(cfg, client, mlflow_run_id, layout, name, newest)

    adapter = layout.path(state.policy)
    lora = cfg.model.lora.enabled and is_adapter_checkpoint(adapter)
    if lora:
        tags.update({"lora.base_model": cfg.model.policy, "lora.base_checkpoint": base_of(adapter)})
    model = _logged_model(client, mlflow_run_id, f"policy-iteration-{iteration}", "policy", step, tags,
                          external=not lora)
    if lora:  # the adapters only: their step checkpoint also holds the tokenizer and the optimizer state
        for f in sorted(Path(adapter).glob("adapter_*")):
            client.log_model_artifact(model.model_id, str(f))
        tags["lora.adapter"] = model.artifact_location
    client.finalize_logged_model(model.model_id, "READY")
    name = cfg.tracking.registry_name()
    with tracking.store_lock(cfg.mlflow_uri()):  # two runs registering under one name compare and move `best` in turn
        version = _version(client, name, policy, mlflow_run_id, {**tags, "model_id": model.model_id},
                           f"Run {cfg.run_id}, iteration {iteration}: {ev.describe()}")
        best = _alias_target(client, name, BEST)
        if best is None or ev.accuracy > float(best.tags.get("eval/accuracy", "-inf")):
            client.set_registered_model_alias(name, BEST, version.version)
    return version


def _register_reward_model(cfg: PipelineConfig, client: MlflowClient, mlflow_run_id: str, layout: RunLayout, name: str,
                           data_iteration: int) -> ModelVersion:
    """Reward model `name` trained on data iteration `data_iteration`, registered (once)."""
    step = data_iteration * cfg.loop.steps_per_iteration  # where its rm/ metrics are
    tags = {"pipeline_run_id": cfg.run_id, "run_id": mlflow_run_id, "iteration": data_iteration, "step": step}
    model = _logged_model(client, mlflow_run_id, f"{name}-iteration-{data_iteration}", "reward_model", step, tags,
                          external=True)
    client.finalize_logged_model(model.model_id, "READY")
    with tracking.store_lock(cfg.mlflow_uri()):
        return _version(client, f"{cfg.tracking.registry_name()}-{name}",
                        str(layout.reward_model(KINDS[name], data_iteration)), mlflow_run_id,
                        {**tags, "model_id": model.model_id},
                        f"Run {cfg.run_id}: {name} trained on data iteration {data_iteration} (0: the SFT policy's "
                        f"samples; k: RL iteration k-1's rollouts)")


def _logged_model(client: MlflowClient, mlflow_run_id: str, name: str, model_type: str, step: int, tags: dict,
                  external: bool) -> LoggedModel:
    """The run's logged model `name`, an output of the run at `step`; the one made before, if any."""
    run = client.get_run(mlflow_run_id)
    exp_id = run.info.experiment_id
    found = client.search_logged_models([exp_id], f"name = '{name}' AND source_run_id = '{mlflow_run_id}'",
                                        max_results=1)
    model = found[0] if found else client.create_logged_model(
        exp_id, name=name, source_run_id=mlflow_run_id, model_type=model_type,
        tags={k: str(v) for k, v in {**tags, **({MLFLOW_MODEL_IS_EXTERNAL: "true"} if external else {})}.items()})
    if model.model_id not in {o.model_id for o in run.outputs.model_outputs}:
        client.log_outputs(mlflow_run_id, [LoggedModelOutput(model.model_id, step)])
    return model


def _version(client: MlflowClient, name: str, checkpoint: str, mlflow_run_id: str, tags: dict,
             description: str) -> ModelVersion:
    """The version of registered model `name` whose source is folder `checkpoint`: the run's, if it has one.
    Called under `tracking.store_lock`, with a client made before (making one takes that lock too)."""
    source = Path(checkpoint).resolve().as_uri()
    for v in client.search_model_versions(f"run_id = '{mlflow_run_id}'"):
        if v.name == name and v.source == source:
            return v
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=(
            "Checkpoints of iterative GRPO runs, one version per iteration (a reward model's: per data iteration); "
            "a version's source is the checkpoint folder in its run."))
    return client.create_model_version(name, source, run_id=mlflow_run_id, tags={k: str(v) for k, v in tags.items()},
                                       description=description, await_creation_for=0)


def _alias_target(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


# ---- references ---------------------------------------------------------------------------------
def is_reference(value: str) -> bool:
    """A model registry reference: models:/<name>@<alias>, models:/<name>/<version>, models:/<name>/latest."""
    return value.startswith("models:/")


def model_version(cfg: PipelineConfig, reference: str, field: str) -> ModelVersion:
    """The registered version `reference` names, in the config's registry; a `UserError` naming `field`
    when there is none."""
    client = tracking.client_for(cfg)
    try:
        found = get_model_name_and_version(client, reference)
        if len(found) == 1:  # models:/<model id>: a logged model, whose weights are not ours to find
            raise UserError(f"{field}: {reference} names a logged model; give a registered version "
                            "(models:/<name>@<alias> or models:/<name>/<version>)")
        return client.get_model_version(*found)
    except MlflowException as err:
        registry = masked_uri(cfg.mlflow_uri())
        raise UserError(f"{field}: {reference}: {err.message.splitlines()[0]} (registry {registry})") from None


def local_folder(version: ModelVersion, field: str) -> str:
    """The checkpoint folder registered `version` points at; a `UserError` naming `field` when it is not a
    local folder (any more)."""
    ref = f"models:/{version.name}/{version.version}"
    if urlparse(version.source).scheme not in ("", "file"):
        raise UserError(f"{field}: {ref} is stored at {version.source}, not in a local folder")
    folder = local_file_uri_to_path(version.source)
    if not Path(folder).is_dir():
        raise UserError(f"{field}: {ref} points at {folder}, which no longer exists")
    return folder


def resolve_policy(cfg: PipelineConfig) -> tuple[PipelineConfig, ModelVersion | None]:
    """`cfg` with `model.policy` given as a registry reference replaced by that version's folder, and the
    version (None when `model.policy` is no reference)."""
    if not is_reference(cfg.model.policy):
        return cfg, None
    version = model_version(cfg, cfg.model.policy, "model.policy")
    model = cfg.model.model_copy(update={"policy": local_folder(version, "model.policy")})
    return cfg.model_copy(update={"model": model}), version


def link_input(cfg: PipelineConfig, mlflow_run_id: str, version: ModelVersion) -> None:
    """Record on the run that it starts from (or evaluates) registered `version`: a tag naming it and, for a
    version registered here, its logged model as an input of the run. Once: a resumed run keeps its start."""
    client = tracking.client_for(cfg)
    if INPUT_TAG in client.get_run(mlflow_run_id).data.tags:
        return
    if "model_id" in version.tags:
        client.log_inputs(mlflow_run_id, models=[LoggedModelInput(version.tags["model_id"])])
    client.set_tag(mlflow_run_id, INPUT_TAG, f"models:/{version.name}/{version.version}")
