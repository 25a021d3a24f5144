"""What runs inside the Ray actors of `cluster.backend: ray` (tasks/cluster.py creates and drives them).

    SamplerReplica   one sampler engine (transformers `generate`, or vLLM on a GPU) with the policy's
                     weights, told which weights it serves; samples its share of a step's questions
    TrainerRank      one rank of the FSDP2 trainer group: the sharded policy, its AdamW and the sharded
                     reference; runs `models.fsdp.sharded_grpo_update` and writes the same checkpoints
                     as the local backend (rank 0 writes, every rank gathers)

Plain classes: Ray wraps them (`ray.remote(cls)`) where they are created, so this file needs no Ray and
every method is a plain call in a test. Weights are named by the run's checkpoint path they stand for,
as in tasks/workspace.py, whether or not that checkpoint was written yet.
"""
from __future__ import annotations

import datetime as dt
import os
import signal
import socket
from pathlib import Path

import torch

from configs import PipelineConfig
from models.fsdp import full_model_state, full_optimizer_state, load_full_optimizer_state, shard, sharded_grpo_update
from models.generation import Completion
from models.loading import load_policy, load_tokenizer
from models.policy import completion_logprobs
from models.samplers import make_sampler
from models.trainer import UpdateBatch
from problems.prompts import stop_marker
from stages.checkpoints import read_optimizer_state, save_checkpoint


def _use_cpus(cfg: PipelineConfig) -> None:
    # Ray reserves cpus_per_actor for the actor; torch would otherwise start a thread per core of the node.
    torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_actor)))


class SamplerReplica:
    def __init__(self, cfg: PipelineConfig, policy: str):
        """Serving the checkpoint `policy` (version 0: the run's first policy) until sent other weights."""
        _use_cpus(cfg)
        self.cfg = cfg
        if cfg.sampling.backend == "hf":  # the sampler wraps a model of its own
            model, tokenizer = load_policy(policy, **cfg.model.load_kwargs())
            model.requires_grad_(False)
        else:  # vLLM loads the weights itself
            model, tokenizer = None, load_tokenizer(policy, trust_remote_code=cfg.model.trust_remote_code)
        self.sampler = make_sampler(cfg.sampling, policy, model=model, tokenizer=tokenizer, device=cfg.model.device,
                                    dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                                    seed=cfg.model.seed, stop_marker=stop_marker(tokenizer, cfg.prompt))
        self.weights, self.version = policy, 0

    def serving(self) -> tuple[str, int]:
        """(the checkpoint path whose weights it serves, the GRPO steps those weights have taken)."""
        return self.weights, self.version

    def load_weights(self, state: dict[str, torch.Tensor] | str, weights: str, version: int) -> None:
        """Serve `state` (a full state dict from the trainer, through Ray's object store, or a checkpoint
        folder) as the weights of checkpoint `weights`, `version` steps into the run."""
        self.sampler.update_weights(state)
        self.weights, self.version = weights, version

    def sample(self, prompt_ids: list[list[int]], n: int, seed: int, die: bool = False) -> tuple[int, list[Completion]]:
        """(the weights' version, n completions per prompt). `die`: SIGKILL this actor after sampling,
        before answering (the fault a test injects: stages/faults.py, point `sampler_replica`)."""
        with self.cfg.model.compute():
            completions = self.sampler.sample(prompt_ids, n=n, seed=seed)
        if die:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.version, completions

    def logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> torch.Tensor:
        """[B, T] teacher-forced log-probs under the served weights (hf backend)."""
        with self.cfg.model.compute():
            return completion_logprobs(self.sampler.model, prompt_ids, completion_ids,
                                       pad_id=self.sampler.tokenizer.pad_token_id)[0]


class TrainerRank:
    def __init__(self, cfg: PipelineConfig, rank: int, world: int):
        _use_cpus(cfg)
        self.cfg, self.rank, self.world = cfg, rank, world
        self.policy = self.optimizer = self.tokenizer = self.reference = None
        self.policy_ckpt: str | None = None
        self.reference_ckpt: str | None = None

    def rendezvous(self) -> tuple[str, int]:
        """(this node's address, a free port): rank 0's, where the process group meets."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def join(self, address: str, port: int) -> None:
        """Join the group's process group: NCCL on GPUs, gloo on CPU."""
        from torch.distributed.device_mesh import init_device_mesh

        cuda = self.cfg.model.device.startswith("cuda")
        torch.distributed.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://{address}:{port}",
                                             rank=self.rank, world_size=self.world,
                                             timeout=dt.timedelta(minutes=30))
        self.mesh = init_device_mesh("cuda" if cuda else "cpu", (self.world,))

    def _load(self, ckpt: str):
        model, tokenizer = load_policy(ckpt, **self.cfg.model.load_kwargs())
        if self.cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return shard(model, self.mesh), tokenizer

    def load_policy(self, ckpt: str) -> None:
        """The policy at `ckpt`, sharded, with its AdamW state when the checkpoint has one."""
        g = self.cfg.grpo
        self.policy, self.tokenizer = self._load(ckpt)
        self.policy.eval()
        self.optimizer = torch.optim.AdamW([p for p in self.policy.parameters() if p.requires_grad], lr=g.lr,
                                           weight_decay=g.weight_decay)
        if (Path(ckpt) / "optimizer.safetensors").exists():
            load_full_optimizer_state(self.policy, self.optimizer, read_optimizer_state(Path(ckpt)))
        self.policy_ckpt = ckpt

    def _reference_at(self, ckpt: str):
        if self.reference_ckpt != ckpt:
            self.reference, _ = self._load(ckpt)
            self.reference.eval().requires_grad_(False)
            self.reference_ckpt = ckpt
        return self.reference

    def serving(self) -> str | None:
        """The checkpoint path whose weights the rank holds (None: none, or part-updated ones)."""
        return self.policy_ckpt

    def update(self, policy: str, reference: str, batch: UpdateBatch, out_ckpt: str, save: bool,
               die: bool = False) -> dict[str, float]:
        """The GRPO update of the policy at `policy` on `batch` (every rank is given all of it); the
        updated policy answers for `out_ckpt`, written there when `save`. Returns the batch's metrics.
        `die`: SIGKILL this rank first (the fault a test injects: stages/faults.py, point `trainer_rank`)."""
        if die:
            os.kill(os.getpid(), signal.SIGKILL)
        g = self.cfg.grpo
        if self.policy_ckpt != policy:
            self.load_policy(policy)
        ref = self._reference_at(reference) if g.beta > 0 else None
        try:
            with self.cfg.model.compute():
                metrics = sharded_grpo_update(
                    self.policy, self.optimizer, batch, rank=self.rank, world=self.world,
                    micro_batch_size=g.micro_batch_size, aggregation=g.aggregation,
                    pad_id=self.tokenizer.pad_token_id, ref_model=ref, beta=g.beta, mu=g.mu, eps_low=g.eps_low,
                    eps_high=g.eps_high, grad_clip=g.grad_clip, importance_correction=g.importance_correction,
                    importance_cap=g.importance_cap)
        except BaseException:
            self.policy_ckpt = None  # part-updated weights answer for no checkpoint
            raise
        self.policy_ckpt = out_ckpt
        if save:
            self.save(out_ckpt)
        return metrics

    def save(self, out_ckpt: str) -> None:
        """Gather the full weights and optimizer state (a collective) and write the checkpoint (rank 0)."""
        weights = full_model_state(self.policy)
        optimizer = full_optimizer_state(self.policy, self.optimizer)
        if self.rank == 0:
            save_checkpoint(self.policy, self.tokenizer, out_ckpt, optimizer, state_dict=weights)
        torch.distributed.barrier()  # no rank answers before the checkpoint exists

    def full_state(self) -> dict[str, torch.Tensor]:
        """The full weights on rank 0 ({} elsewhere); a collective: every rank is called."""
        return full_model_state(self.policy)

    def logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> torch.Tensor:
        """[B, T] teacher-forced log-probs under the trainer's policy; a collective."""
        with self.cfg.model.compute():
            return completion_logprobs(self.policy, prompt_ids, completion_ids,
                                       pad_id=self.tokenizer.pad_token_id)[0]
