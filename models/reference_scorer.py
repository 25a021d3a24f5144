"""The reference model's log-probs of what a sampler draws, computed on a thread of their own while it draws.

On a CPU a decoding step is a few hundred small matrix products that stream the weights from memory: a
second thread does little for it (models/samplers.py, `sampling.threads`). The update's reference
forward, a compute-bound pass over every completion, can use that idle core instead: each chunk of
tokens the sampler has drawn is teacher-forced through the reference, which keeps a KV cache of its
own, so when decoding ends only the last chunk is left to score.

    scorer = ReferenceScorer(reference, prompts, n=G, threads=1)   # starts its thread: the prompts' pass
    ... every `chunk` decoding steps: scorer.feed(new_tokens)       # [rows, k] token ids
    logp = scorer.finish(rest)                                     # [rows, T] log pi_ref(token | prefix)

The log-probs are those `models.policy.completion_logprobs(reference, ...)` computes in one pass, up to
float noise from the different split of the same arithmetic (KV cache in chunks): the GRPO loss's KL term
takes either. Rows that ended early are scored on their padding too; the caller keeps each row's own
length. Plain torch and one thread: no I/O; an error in the thread is raised again by `finish`.
"""
from __future__ import annotations

import queue
import threading

import torch

from models.policy import CACHE, PackedBatch, _token_logprobs


class ReferenceScorer:
    def __init__(self, model, prompts: PackedBatch, *, n: int, threads: int = 1):
        """`prompts`: the distinct prompts, left-padded (`models.policy.pack`); each stands for `n`
        consecutive rows. `threads`: torch threads of the scorer's thread (the decoding keeps its own)."""
        self.model, self.prompts, self.n, self.threads = model, prompts, n, threads
        self.chunks: queue.Queue[torch.Tensor | None] = queue.Queue()
        self.logps: list[torch.Tensor] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="reference-scorer", daemon=True)
        self.thread.start()

    def feed(self, tokens: torch.Tensor) -> None:
        """The next [rows, k] sampled tokens of every row (a copy: the sampler goes on writing its own)."""
        if tokens.shape[1]:
            self.chunks.put(tokens.clone())

    def finish(self, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """[rows, T] log-probs of every token fed, `tokens` (the last ones) included."""
        if tokens is not None:
            self.feed(tokens)
        self.close()
        if self.error is not None:
            raise RuntimeError(f"the reference scorer failed: {self.error}") from self.error
        rows = self.prompts.input_ids.shape[0] * self.n
        return torch.cat(self.logps, dim=1) if self.logps else torch.zeros((rows, 0))

    def close(self) -> None:
        """End the thread (what it scored is kept; an error stays for `finish`)."""
        self.chunks.put(None)
        self.thread.join()

    def _run(self) -> None:
        try:
            torch.set_num_threads(self.threads)  # this thread's own: the sampler's thread keeps its count
            with torch.inference_mode():
                self._score()
        except BaseException as err:  # noqa: BLE001  (raised again in the caller's thread by finish)
            self.error = err
            while self.chunks.get() is not None:  # let finish() end
                pass

    def _score(self) -> None:
        pb, n = self.prompts, self.n
        out = self.model(input_ids=pb.input_ids, attention_mask=pb.attention_mask, position_ids=pb.position_ids,
                         use_cache=True, logits_to_keep=1)
        cache = getattr(out, CACHE)
        cache.batch_repeat_interleave(n)
        last = out.logits[:, -1:].repeat_interleave(n, 0)  # [rows, 1, V]: predicts the first new token
        mask = pb.attention_mask.repeat_interleave(n, 0)
        position = pb.position_ids[:, -1:].repeat_interleave(n, 0)
        while (tokens := self.chunks.get()) is not None:
            k = tokens.shape[1]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], k))], dim=1)
            out = self.model(input_ids=tokens, attention_mask=mask,
                             position_ids=position + torch.arange(1, k + 1), use_cache=True, **{CACHE: cache})
            logits = torch.cat([last, out.logits[:, :-1]], dim=1)  # [rows, k, V]: row j predicts tokens[:, j]
            self.logps.append(_token_logprobs(logits, tokens, False)[0])
            last, position = out.logits[:, -1:], position + k
