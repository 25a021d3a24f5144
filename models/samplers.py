"""Samplers: G outputs per prompt, with each token's log-prob under the sampler.

One small protocol, two implementations picked by `sampling.backend`:

- `hf` (`HFSampler`, here): transformers `generate`, CPU or GPU, batched (prompts sorted by length
  and cut into calls of `batch_size` rows, each prompt prefilled once and its KV cache shared by
  its G samples), left padding, temperature / top_p / max_new_tokens, stops at EOS and (with
  `stop_marker`) at the end of the answer line, seeded. It wraps a live model, so a trainer that
  updates that model in place needs no weight transfer at all.
- `vllm` (`models.vllm_sampler.VLLMSampler`): `vllm.LLM` with `SamplingParams(n=G)`, imported
  lazily; new weights are pushed into the live engine after each policy update.

What a sampler returns per row (`models.generation.Completion`): completion token ids (EOS
included when emitted), `finish_reason` ("eos" | "stop" | "length"; `truncated` is "length"),
and `logprobs`, the sampler's log-prob of each chosen token.

The sampler's log-prob is log_softmax of the RAW logits (temperature 1, before top-p): log pi_old of
the token under the policy that sampled it, the quantity in GRPO's ratio, and the one vLLM reports
with its default `logprobs_mode="raw_logprobs"`. Not the processed (temperature-scaled, top-p
truncated) distribution the token was actually drawn from: that would make the ratio mix two
different distributions. It is stored for audit and to measure the sampler/trainer mismatch; what
the update uses as pi_old is decided by the trainer (see `models.trainer.frozen_logprobs`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from models.generation import Completion, sample_completions

DEFAULT_STOP_MARKER = "####"  # GSM8K's answer line; problems.verify.ANSWER_MARK


@runtime_checkable
class Sampler(Protocol):
    backend: str
    tokenizer: Any

    def sample(self, prompt_ids: list[list[int]], *, n: int, seed: int) -> list[Completion]:
        """n completions per prompt, prompt-major ([p0s0..p0s(n-1), p1s0, ...])."""

    def update_weights(self, source: Any) -> None:
        """Serve new policy weights: an nn.Module, a state dict, or a checkpoint directory."""

    def sleep(self) -> None:
        """Release accelerator memory between steps (colocated training); no-op where unsupported."""

    def wake(self) -> None:
        """Undo `sleep`."""


class HFSampler:
    """transformers `generate` over a live model (see the module doc)."""

    backend = "hf"

    def __init__(self, model, tokenizer, *, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 64,
                 batch_size: int = 64, stop_marker: str | None = DEFAULT_STOP_MARKER, checkpoint: str | None = None,
                 threads: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.threads = threads  # torch threads while decoding; None: the process's
        self.temperature, self.top_p = temperature, top_p
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.stop_marker = stop_marker
        self.checkpoint = checkpoint  # what the weights are, for the record

    def sample(self, prompt_ids: list[list[int]], *, n: int, seed: int, reference=None) -> list[Completion]:
        """`reference`: a model that scores the drawn tokens on a thread of its own while this decodes
        (`Completion.ref_logprobs`, models/reference_scorer.py), on the threads the decoding leaves free
        (at least 1)."""
        was_training, threads = self.model.training, torch.get_num_threads()
        self.model.eval()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            return sample_completions(self.model, self.tokenizer, prompt_ids, n=n, max_new_tokens=self.max_new_tokens,
                                      temperature=self.temperature, top_p=self.top_p, batch_size=self.batch_size,
                                      seed=seed, return_logprobs=True, stop_marker=self.stop_marker,
                                      reference=reference, reference_threads=max(1, threads - (self.threads or threads)))
        finally:
            self.model.train(was_training)
            torch.set_num_threads(threads)

    def update_weights(self, source: Any) -> None:
        if source is self.model:
            return  # the trainer updated this very model in place
        if isinstance(source, torch.nn.Module):
            source = source.state_dict()
        if isinstance(source, (str, Path)):
            from models.loading import load_causal_lm

            dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
            fresh = load_causal_lm(str(source), dtype=dtype, device="cpu")
            self.checkpoint = str(source)
            source = fresh.state_dict()
        self.model.load_state_dict(source)

    def sleep(self) -> None:  # the model is the trainer's: nothing to release
        pass

    def wake(self) -> None:
        pass


def make_sampler(sampling_cfg, policy_ref: str | Path, *, model=None, tokenizer=None, device: str = "cpu",
                 dtype: str = "float32", trust_remote_code: bool = False,
                 stop_marker: str | None = DEFAULT_STOP_MARKER, seed: int = 0) -> Sampler:
    """A sampler for `sampling_cfg.backend` (a `configs.schema.SamplingConfig`).

    `hf`: wraps `model`/`tokenizer` when given (the trainer's live model), else loads `policy_ref`.
    `vllm`: starts an engine on `policy_ref` (a checkpoint dir or hub id); raises a one-line
    ImportError saying how to install vLLM when it is not importable.
    """
    if sampling_cfg.backend == "hf":
        if model is None or tokenizer is None:
            from models.loading import load_policy

            model, tokenizer = load_policy(str(policy_ref), dtype=dtype, device=device,
                                           trust_remote_code=trust_remote_code)
        return HFSampler(model, tokenizer, temperature=sampling_cfg.temperature, top_p=sampling_cfg.top_p,
                         max_new_tokens=sampling_cfg.max_new_tokens, batch_size=sampling_cfg.batch_size,
                         stop_marker=stop_marker, checkpoint=str(policy_ref), threads=sampling_cfg.threads)
    if sampling_cfg.backend == "vllm":
        from models.vllm_sampler import VLLMSampler

        return VLLMSampler(str(policy_ref), temperature=sampling_cfg.temperature, top_p=sampling_cfg.top_p,
                           max_new_tokens=sampling_cfg.max_new_tokens,
                           gpu_memory_utilization=sampling_cfg.gpu_memory_utilization,
                           sleep_between_steps=sampling_cfg.vllm_sleep_between_steps, dtype=dtype,
                           trust_remote_code=trust_remote_code, stop_marker=stop_marker, seed=seed)
    raise ValueError(f"sampling.backend: unknown backend {sampling_cfg.backend!r} (expected 'hf' or 'vllm')")
