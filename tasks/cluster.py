"""The Ray backend (`cluster.backend: ray`): the flow's tasks drive long-lived Ray actors by name.

    sampler_for(cfg, policy, ...)    the run's sampler replicas, serving `policy`, behind the Sampler protocol
    trainer_update(cfg, ...)         the GRPO update on the FSDP2 trainer group
    run_remote(fn, *args)            a function as a Ray task (reward scoring, reward-model retraining)
    shutdown(cfg)                    the run's actors killed (their GPUs freed)

Prefect stays the control plane: the flow and its tasks are unchanged, the task bodies call here.
Actors are named `<run_id>.sampler-<k>` and `<run_id>.trainer-<r>` in namespace `grpo`, created once per
flow process and reused across steps and iterations. Ray's own retries are off everywhere
(`max_restarts=0`, `max_task_retries=0`, `max_retries=0`): Prefect's task retries and the run folder's
resume are the only ones. A dead replica fails its sampling task; the retry finds its name free and
creates it again, sends it the weights, and samples again, so the step's rollouts are still written once.
A trainer group that lost a rank is killed whole (its process group is broken); a new group redoes the
update from its checkpoint when that is on disk, else the run resumes from its last checkpoint, as the
local backend redoes a step after a crash.

Weights reach the replicas after each update through Ray's object store (rank 0's gathered state dict,
passed by reference: it never passes through the flow's process), or from the checkpoint folder when the
trainer does not hold them. On GPUs vLLM's NCCL / CUDA-IPC weight transfer would replace the object
store; it is not built here (no GPU to test it on).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from configs import PipelineConfig
from models.trainer import UpdateBatch
from stages.faults import fault_due

NAMESPACE = "grpo"
NO_RAY_RETRIES = dict(max_restarts=0, max_task_retries=0)
PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("cluster.backend: ray needs Ray: pip install -e '.[cluster]'") from None
    return ray


def connect(cfg: PipelineConfig) -> None:
    """Join `cluster.address`, or start a local Ray sized for the run's actors (logical CPUs: Ray places by
    what actors declare, so 2 replicas + 2 ranks fit a 2-core machine, taking turns on its cores)."""
    ray = _ray()
    if ray.is_initialized():
        return
    # Actors import this project; a fault injected into the flow's process must not fire in an actor.
    runtime_env = {"env_vars": {"PYTHONPATH": PROJECT_ROOT, "GRPO_CRASH_AT": ""}}
    c = cfg.cluster
    if c.address:
        ray.init(address=c.address, namespace=NAMESPACE, runtime_env=runtime_env, log_to_driver=True)
        return
    wanted = (c.sampler_replicas + c.trainer_world_size) * c.cpus_per_actor + 1  # +1: reward scoring tasks
    ray.init(namespace=NAMESPACE, runtime_env=runtime_env, include_dashboard=False,
             num_cpus=max(os.cpu_count() or 1, int(wanted + 0.999)), num_gpus=None if c.gpus_per_actor else 0)


def _resources(cfg: PipelineConfig) -> dict:
    c = cfg.cluster
    return dict(num_cpus=c.cpus_per_actor, num_gpus=c.gpus_per_actor / 2 if c.colocate else c.gpus_per_actor)


def _actor(cfg: PipelineConfig, cls, name: str, *args):
    """The live actor called `name`, or a new one built with `args` (a dead actor's name is free again).
    Detached: it lives until `shutdown` kills it, not until this process drops its last handle on it."""
    ray = _ray()
    return ray.remote(cls).options(name=f"{cfg.run_id}.{name}", namespace=NAMESPACE, get_if_exists=True,
                                   lifetime="detached", **NO_RAY_RETRIES, **_resources(cfg)).remote(*args)


class Cluster:
    """The flow process's handles on its run's actors, and which checkpoint the trainer group holds."""

    def __init__(self) -> None:
        self.trainer: list = []
        self.trainer_ckpt: str | None = None

    def replicas(self, cfg: PipelineConfig, start: str) -> list:
        """The run's sampler replicas; one created now loads `start`, the run's first policy (always on
        disk, where a later step's weights may not be yet), and is sent the weights it should serve."""
        from stages.ray_actors import SamplerReplica

        connect(cfg)
        return [_actor(cfg, SamplerReplica, f"sampler-{k}", cfg, start) for k in range(cfg.cluster.sampler_replicas)]

    def trainer_group(self, cfg: PipelineConfig) -> list:
        """The FSDP2 ranks, their process group formed (built on first use, and after a rank died)."""
        from stages.ray_actors import TrainerRank

        if not self.trainer:
            connect(cfg)
            ray, world = _ray(), cfg.cluster.trainer_world_size
            ranks = [_actor(cfg, TrainerRank, f"trainer-{r}", cfg, r, world) for r in range(world)]
            address, port = ray.get(ranks[0].rendezvous.remote())
            ray.get([r.join.remote(address, port) for r in ranks])
            self.trainer, self.trainer_ckpt = ranks, None
        return self.trainer

    def drop_trainer(self) -> None:
        """Kill the whole group: after one rank failed, the others may wait forever in a collective."""
        ray = _ray()
        for rank in self.trainer:
            ray.kill(rank, no_restart=True)
        self.trainer, self.trainer_ckpt = [], None


CLUSTER = Cluster()


def sync_replicas(cfg: PipelineConfig, replicas: list, policy: str, version: int) -> None:
    """Every replica serves `policy`: the trainer's weights through the object store when it holds them
    (the common case: the step just trained them), else the checkpoint folder."""
    ray = _ray()
    stale = [r for r, serving in zip(replicas, ray.get([r.serving.remote() for r in replicas]))
             if serving != (policy, version)]
    if not stale:
        return
    if CLUSTER.trainer and CLUSTER.trainer_ckpt == policy:
        states = [rank.full_state.remote() for rank in CLUSTER.trainer]  # a collective; rank 0's is the state
        source = states[0]
    else:
        source = policy
    ray.get([r.load_weights.remote(source, policy, version) for r in stale])


class ReplicaSampler:
    """The Sampler protocol (models/samplers.py) over the run's replicas: a step's prompts are cut into
    contiguous shares, one per replica, sampled at once and put back in order."""

    def __init__(self, cfg: PipelineConfig, replicas: list, tokenizer, version: int):
        self.cfg, self.replicas, self.tokenizer, self.version = cfg, replicas, tokenizer, version
        self.backend = f"ray-{cfg.sampling.backend}"

    def sample(self, prompt_ids: list[list[int]], *, n: int, seed: int) -> list:
        ray, k = _ray(), len(self.replicas)
        base, extra = divmod(len(prompt_ids), k)
        calls, start = [], 0
        for i, replica in enumerate(self.replicas):
            share = prompt_ids[start:start + base + (i < extra)]
            start += len(share)
            if share:  # each share its own seed: the same for the same step, whatever the other shares hold
                calls.append(replica.sample.remote(share, n, seed * 1009 + i, die=i == 0 and fault_due("sampler_replica")))
        out = []
        for version, completions in ray.get(calls):
            if version != self.version:
                raise RuntimeError(f"a sampler replica served the weights of step {version}, not {self.version}")
            out.extend(completions)
        return out


def sampler_for(cfg: PipelineConfig, policy: str, version: int, start: str, tokenizer) -> ReplicaSampler:
    """The run's replicas, all serving `policy` (`version` steps into the run), as one sampler. `start`: the
    run's first policy (`Cluster.replicas`); `tokenizer`: the policy's (prompts are encoded and completions
    decoded in this process)."""
    replicas = CLUSTER.replicas(cfg, start)
    sync_replicas(cfg, replicas, policy, version)
    return ReplicaSampler(cfg, replicas, tokenizer, version)


def trainer_update(cfg: PipelineConfig, policy: str, reference: str, batch: UpdateBatch, out_ckpt: str,
                   save: bool) -> dict[str, float]:
    """The GRPO update on the trainer group; the group answers for `out_ckpt` afterwards.

    A rank that dies takes the group with it (the others fail or hang in a collective): the group is killed,
    and when the update started from a checkpoint on disk (`loop.checkpoint_every: 1`, the default, or a
    checkpoint step) a new group loads it and redoes the update once; otherwise the step fails and the run
    resumes from its last checkpoint, as after any crash."""
    ray = _ray()
    batch_ref = ray.put(batch)  # one copy in the object store, read by every rank
    die, retried = fault_due("trainer_rank"), False
    while True:
        ranks = CLUSTER.trainer_group(cfg)
        calls = [r.update.remote(policy, reference, batch_ref, out_ckpt, save, die=die and i == len(ranks) - 1)
                 for i, r in enumerate(ranks)]
        try:
            metrics = ray.get(calls)[0]
        except ray.exceptions.RayError:
            lost = _lost_a_rank(ranks)
            CLUSTER.drop_trainer()
            if retried or not lost or not (Path(policy) / "config.json").exists():
                raise
            _logger().warning("a trainer rank died during the update of %s: the group is rebuilt from that checkpoint "
                              "and the update redone", policy)
            die, retried = False, True
            continue
        except BaseException:
            CLUSTER.drop_trainer()
            raise
        CLUSTER.trainer_ckpt = out_ckpt
        return metrics


def _lost_a_rank(ranks: list) -> bool:
    """Whether a rank of the group is dead (or too stuck to answer a call in 30 s)."""
    ray = _ray()
    for rank in ranks:
        try:
            ray.get(rank.serving.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return True
    return False


def _logger():
    """The flow run's logger inside a task, the module's elsewhere (a test driving the cluster directly)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def run_remote(cfg: PipelineConfig, fn, *args):
    """`fn(*args)` as a Ray task with Ray's retries off; its result comes back to the flow."""
    ray = _ray()
    connect(cfg)
    return ray.get(ray.remote(fn).options(max_retries=0, **_resources(cfg)).remote(*args))


def shutdown(cfg: PipelineConfig) -> None:
    """Kill the run's actors (the flow's end: their memory and GPUs go back to the cluster)."""
    ray = _ray()
    if not ray.is_initialized():
        return
    CLUSTER.drop_trainer()
    for k in range(cfg.cluster.sampler_replicas):
        try:
            ray.kill(ray.get_actor(f"{cfg.run_id}.sampler-{k}", namespace=NAMESPACE), no_restart=True)
        except ValueError:
            pass  # never created, or already gone

