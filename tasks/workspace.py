"""The heavy objects of a run, kept in the flow's process and keyed by checkpoint path.

Tasks pass checkpoint paths, never models: a task asks the workspace for "the policy at
checkpoint X" (or "the tokenizer of X", "the reward model at Y") and gets the live object if that is
what is in memory (the common case, step after step), or a fresh load from disk (a resumed run, or a
new process). No task relies on what another task's body happened to load.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from configs import PipelineConfig
from configs.schema import RewardSource
from models.loading import load_policy, load_tokenizer
from models.lora import (AdaptersOff, add_adapters, base_of, is_adapter_checkpoint, load_adapters, merged_state_dict,
                         trainable_parameters)
from models.reward_model import ValueHeadRewardModel
from models.samplers import make_sampler
from problems.prompts import stop_marker
from stages.checkpoints import load_optimizer
from stages.pretrained_rewards import PretrainedRewardModel, load_pretrained_reward_model


class Workspace:
    def __init__(self) -> None:
        self.policy = self.tokenizer = self.optimizer = None
        self.policy_ckpt: str | None = None
        self.policy_base: str | None = None  # under LoRA: the folder of the frozen base the adapters sit on
        self.reference = None
        self.reference_ckpt: str | None = None
        self.sampler = None
        self.sampler_backend: str | None = None
        self.sampler_ckpt: str | None = None
        self.reward_models: dict[str, tuple[str, object]] = {}
        self.pretrained_reward_models: dict[tuple[str, bool], PretrainedRewardModel] = {}
        self.tokenizers: dict[str, object] = {}

    def _load(self, ckpt: str, cfg: PipelineConfig):
        return load_policy(str(ckpt), **cfg.model.load_kwargs())

    def _load_trainable(self, ckpt: str, cfg: PipelineConfig):
        """The policy at `ckpt` as it trains: an adapter checkpoint on its base; under LoRA a full model
        gets fresh adapters (B = 0, so it computes the same function); gradient checkpointing when asked."""
        if is_adapter_checkpoint(ckpt):
            self.policy_base = base_of(ckpt)
            base, _ = self._load(self.policy_base, cfg)
            model, tokenizer = load_adapters(base, ckpt), load_tokenizer(
                ckpt, trust_remote_code=cfg.model.trust_remote_code)
        else:
            model, tokenizer = self._load(ckpt, cfg)
            self.policy_base = None
            if cfg.model.lora.enabled:
                self.policy_base = ckpt
                model = add_adapters(model, cfg.model.lora, seed=cfg.model.seed)
        if cfg.model.gradient_checkpointing:
            # Non-reentrant: recomputes under autocast and with frozen (LoRA) inputs without extra hooks.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model, tokenizer

    def policy_at(self, ckpt: str | Path, cfg: PipelineConfig):
        """(model, tokenizer, optimizer) at `ckpt`; the optimizer state comes back when saved there."""
        ckpt = str(ckpt)
        if self.policy_ckpt != ckpt:
            self.policy, self.tokenizer = self._load_trainable(ckpt, cfg)
            self.policy.eval()
            # fused: one kernel over all tensors (CPU and CUDA); the per-tensor loop is 3x slower on SmolLM2
            self.optimizer = torch.optim.AdamW(trainable_parameters(self.policy), lr=cfg.grpo.lr,
                                               weight_decay=cfg.grpo.weight_decay,
                                               fused=next(self.policy.parameters()).device.type in ("cpu", "cuda"))
            if (Path(ckpt) / "optimizer.safetensors").exists():
                load_optimizer(self.optimizer, Path(ckpt))
            self.policy_ckpt = ckpt
            if self.sampler is not None and self.sampler_backend == "hf":
                self.sampler = None  # it wraps the old model object
        return self.policy, self.tokenizer, self.optimizer

    def tokenizer_at(self, ckpt: str | Path, cfg: PipelineConfig):
        """The tokenizer saved with checkpoint `ckpt` (the live policy's when that is the one in memory)."""
        ckpt = str(ckpt)
        if self.policy_ckpt == ckpt:
            return self.tokenizer
        if ckpt not in self.tokenizers:
            self.tokenizers[ckpt] = load_tokenizer(ckpt, trust_remote_code=cfg.model.trust_remote_code)
        return self.tokenizers[ckpt]

    def forget_policy(self) -> None:
        """The live policy answers for no checkpoint any more (the next request loads from disk)."""
        self.policy_ckpt = None

    def policy_moved_to(self, ckpt: str | Path) -> None:
        """The live policy was updated and saved at `ckpt`: it now answers for that path."""
        self.policy_ckpt = str(ckpt)

    def sampler_for(self, cfg: PipelineConfig, model, tokenizer):
        """The sampler serving the live policy: the trainer's own model for `hf`; for `vllm` an
        engine that is sent the new weights whenever the policy moved since it last sampled."""
        if self.sampler is None:
            self.sampler = make_sampler(cfg.sampling, self.policy_ckpt, model=model, tokenizer=tokenizer,
                                        device=cfg.model.device, dtype=cfg.model.dtype,
                                        trust_remote_code=cfg.model.trust_remote_code, seed=cfg.model.seed,
                                        stop_marker=stop_marker(tokenizer, cfg.prompt))
            self.sampler_backend = cfg.sampling.backend
        elif self.sampler_ckpt != self.policy_ckpt and self.sampler_backend != "hf":
            self.sampler.update_weights(merged_state_dict(model) if self.policy_base is not None else model)
        self.sampler_ckpt = self.policy_ckpt
        return self.sampler

    def reward_model_at(self, name: str, path: str, cfg: PipelineConfig):
        """A learned reward model (ValueHeadRewardModel) at `path`, loaded once."""
        cached = self.reward_models.get(name)
        if cached is None or cached[0] != str(path):
            rm = ValueHeadRewardModel.from_pretrained(path, device=cfg.model.device)
            rm.eval()
            self.reward_models[name] = (str(path), rm)
        return self.reward_models[name][1]

    def pretrained_reward_model(self, source: RewardSource, cfg: PipelineConfig) -> PretrainedRewardModel:
        """The pretrained reward model of `source` (a source with `model`), loaded once: it never
        trains, so it serves every step of the run."""
        key = (source.model, source.trust_remote_code)
        if key not in self.pretrained_reward_models:
            self.pretrained_reward_models[key] = load_pretrained_reward_model(source, device=cfg.model.device,
                                                                              dtype=cfg.model.dtype)
        return self.pretrained_reward_models[key]

    def reference_at(self, ckpt: str | Path, cfg: PipelineConfig):
        """The frozen reference model at `ckpt`: under LoRA the live policy with its adapters off when
        `ckpt` is its base (no second copy), else a copy of the live policy when that is what it is."""
        ckpt = str(ckpt)
        if self.policy_base is not None and Path(self.policy_base).resolve() == Path(ckpt).resolve():
            return AdaptersOff(self.policy)
        if self.reference_ckpt != ckpt:
            if self.policy_ckpt == ckpt:
                self.reference = copy.deepcopy(self.policy)
            else:
                self.reference, _ = self._load(ckpt, cfg)
            self.reference.eval().requires_grad_(False)
            self.reference_ckpt = ckpt
        return self.reference


WORKSPACE = Workspace()
