"""Batched sampling and greedy decoding with transformers `generate`.

Rows are prompt-major: for prompts [p0, p1] and n=2 the output is [p0s0, p0s1, p1s0, p1s1].
Completions are token-id lists that include the EOS token when the model emitted one (its
log-prob is part of what the policy learns) and never include padding.

The sampler's log-prob of each chosen token (`Completion.logprobs`, with `return_logprobs=True`) is
`log_softmax` of the model's RAW next-token logits, i.e. log pi_old(token | prefix) at temperature 1,
before temperature / top-p reshape the sampling distribution. That is the quantity GRPO's ratio
uses and what `models.policy.completion_logprobs` computes teacher-forced, so the two agree up to
float noise (KV-cache vs full-sequence numerics). It is recorded step by step by a logits processor
that runs before generate's warpers, so only one [rows, vocab] slice is alive at a time (generate's
own `output_logits=True` would keep all of them: 39 GB for 64 rows x 1024 steps x a 151k vocab).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, \
    StoppingCriteriaList, TemperatureLogitsWarper, TopPLogitsWarper

from models.advantages import delimiter_token_ids
from models.kv_cache import preallocated_cache
from models.policy import CACHE, pack
from models.reference_scorer import ReferenceScorer

FINISH_EOS, FINISH_STOP, FINISH_LENGTH = "eos", "stop", "length"
# Decoding steps per chunk the reference scores while sampling: what is left to score when decoding ends.
# Each chunk reads the reference's weights once more (~16 ms for SmolLM2-135M on this CPU): small.
REFERENCE_CHUNK = 16


@dataclass
class Completion:
    token_ids: list[int]
    finished: bool  # ended with EOS (or a stop condition) rather than by running out of max_new_tokens
    logprobs: list[float] | None = None  # sampler's log-prob of each token in token_ids (raw logits, T=1)
    finish_reason: str = field(default="")  # "eos" | "stop" (answer line ended) | "length"
    ref_logprobs: list[float] | None = None  # the reference's, when scored while sampling (models/reference_scorer)

    def __post_init__(self):
        if not self.finish_reason:
            self.finish_reason = FINISH_EOS if self.finished else FINISH_LENGTH

    @property
    def truncated(self) -> bool:
        return self.finish_reason == FINISH_LENGTH


class _RawLogprobRecorder(LogitsProcessor):
    """Records log_softmax(raw logits)[chosen token] per generated position.

    Called once per decoding step with the logits of the next token; the token chosen at the
    previous step is then the last column of `input_ids`, so its log-prob is gathered one call
    late, and the last step's after generate returns (`finish`)."""

    def __init__(self):
        self.prev: torch.Tensor | None = None  # [rows, vocab] log-softmax of the previous step
        self.steps: list[torch.Tensor] = []     # [rows] per generated position

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self.steps.append(self.prev.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[rows, new_tokens] log-probs (0 where nothing was generated)."""
        if self.prev is not None:
            self.steps.append(self.prev.gather(-1, sequences[:, -1:]).squeeze(-1))
            self.prev = None
        if not self.steps:
            return torch.zeros((sequences.shape[0], 0))
        return torch.stack(self.steps, dim=1).cpu()


class _DrawToken(LogitsProcessor):
    """Draws the next token from the (warped) scores and leaves it the only finite score, so generate's greedy
    step picks it: sampling by the inverse CDF (a cumulative sum and one uniform per row) instead of
    generate's `torch.multinomial`, which on a CPU draws an exponential variate per vocabulary entry: 22 ms a
    step for 16 rows over a 49k vocabulary, 10% of a 135M model's decoding step, against 1.4 ms here."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cdf = torch.softmax(scores.float(), dim=-1).cumsum(-1)
        u = torch.rand((scores.shape[0], 1), device=scores.device) * cdf[:, -1:]
        # right=True: the first entry above u, so a zero-probability token (a flat stretch of the CDF) is never drawn
        token = torch.searchsorted(cdf, u, right=True).clamp(max=scores.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(-1, token, 0.0)


def sampling_processors(temperature: float, top_p: float) -> list[LogitsProcessor]:
    """What generate's `do_sample` would apply (temperature, then top-p), then the draw (`_DrawToken`)."""
    warpers: list[LogitsProcessor] = [] if temperature == 1.0 else [TemperatureLogitsWarper(temperature)]
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return [*warpers, _DrawToken()]


class AnswerLineStop(StoppingCriteria):
    """Stops a row once the line holding `marker` (e.g. GSM8K's '####') has ended with a newline.

    Checked only on rows whose newest token contains a newline, by decoding that row's completion,
    so the cost is a handful of decodes per step. `stop_len[row]` is the completion length at which
    the row stopped (the newline included); the caller trims there, because generate pads a stopped
    row with the pad token, which may equal EOS."""

    def __init__(self, tokenizer, marker: str, prompt_width: int, rows: int):
        self.tokenizer, self.marker, self.start = tokenizer, marker, prompt_width
        self.newline_ids = delimiter_token_ids(tokenizer)
        self.stop_len: dict[int, int] = {}

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        last = input_ids[:, -1].tolist()
        for row, tok in enumerate(last):
            if row in self.stop_len:
                done[row] = True
            elif tok in self.newline_ids:
                text = self.tokenizer.decode(input_ids[row, self.start:].tolist())
                if answer_line_ended(text, self.marker):
                    self.stop_len[row] = input_ids.shape[1] - self.start
                    done[row] = True
        return done


def answer_line_ended(text: str, marker: str) -> bool:
    idx = text.find(marker)
    return idx >= 0 and "\n" in text[idx:]


def cut_after_answer_line(c: Completion, tokenizer, marker: str) -> Completion:
    """The same stop rule applied after the fact (for samplers that cannot stop on it themselves):
    the completion ends at the newline closing the `marker` line; the rest is dropped."""
    newline_ids = delimiter_token_ids(tokenizer)
    for j, tok in enumerate(c.token_ids):
        if tok in newline_ids and answer_line_ended(tokenizer.decode(c.token_ids[: j + 1]), marker):
            if j + 1 == len(c.token_ids) and c.finish_reason == FINISH_EOS:
                return c
            return Completion(c.token_ids[: j + 1], True,
                              None if c.logprobs is None else c.logprobs[: j + 1], FINISH_STOP)
    return c


class _FeedReference(StoppingCriteria):
    """Hands a `ReferenceScorer` the newest `chunk` tokens of every row as soon as they are drawn; stops nothing."""

    def __init__(self, scorer: ReferenceScorer, prompt_width: int, chunk: int):
        self.scorer, self.start, self.chunk, self.sent = scorer, prompt_width, chunk, 0

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        drawn = input_ids.shape[1] - self.start
        if drawn - self.sent >= self.chunk:
            self.scorer.feed(input_ids[:, self.start + self.sent:])
            self.sent = drawn
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _trim(row: list[int], eos_ids: set[int], stop_len: int | None = None,
          logprobs: list[float] | None = None) -> Completion:
    limit = len(row) if stop_len is None else stop_len
    for j, tok in enumerate(row[:limit]):
        if tok in eos_ids:
            return Completion(row[: j + 1], True, None if logprobs is None else logprobs[: j + 1], FINISH_EOS)
    if stop_len is not None:
        return Completion(row[:stop_len], True, None if logprobs is None else logprobs[:stop_len], FINISH_STOP)
    # Neither EOS nor a stop: the row ran all of generate's steps (generate only pads finished rows),
    # so every token is sampled, even a pad token the model happened to choose.
    return Completion(row, False, logprobs, FINISH_LENGTH)


def _generation_config(*, max_new_tokens: int, pad_id: int, eos_ids: list[int]) -> GenerationConfig:
    """Greedy steps over our processors (sampling is `sampling_processors`'), everything else explicit and
    neutral, so a model's shipped generation_config (Qwen's top_k=20, repetition_penalty=1.05, ...) cannot
    silently change what is sampled."""
    return GenerationConfig(do_sample=False, num_return_sequences=1, max_new_tokens=max_new_tokens,
                            pad_token_id=pad_id, eos_token_id=eos_ids, use_cache=True, repetition_penalty=1.0,
                            no_repeat_ngram_size=0, min_new_tokens=0)


def shared_prompt_cache(model, pb, n: int, cache=None):
    """The KV cache of every prompt but its last token, computed once and repeated n times (into `cache`
    when given: an empty one, e.g. models.kv_cache's).

    `generate(num_return_sequences=n)` would run the prompt through the model n times; here each
    prompt is prefilled once and the G samples of a group share it, so generate only feeds the
    last prompt token (1/n of the prefill arithmetic; generation of 8 x 8 rows, 32 new tokens, went
    from 0.278 to 0.239 s on this CPU). Returns None when there is no prefix to share (one-token prompts).
    """
    if pb.input_ids.shape[1] < 2:
        return None
    cache = getattr(model(input_ids=pb.input_ids[:, :-1], attention_mask=pb.attention_mask[:, :-1],
                          position_ids=pb.position_ids[:, :-1], use_cache=True, logits_to_keep=1,  # the cache only
                          **{CACHE: cache}), CACHE)
    cache.batch_repeat_interleave(n)
    return cache


@torch.inference_mode()  # no autograd bookkeeping on the ~3000 small ops of a decoding step
def sample_completions(model, tokenizer, prompt_ids: list[list[int]], *, n: int = 1, max_new_tokens: int = 64,
                       greedy: bool = False, temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64,
                       seed: int | None = None, return_logprobs: bool = False,
                       stop_marker: str | None = None, reference=None, reference_threads: int = 1) -> list[Completion]:
    """n completions per prompt (prompt-major), `batch_size` rows (prompt x sample) per `generate` call.

    Prompts are bucketed by length (sorted, then cut into calls) so a call pads little, and
    returned in input order. `seed` fixes the result for the same inputs and batch size (each call
    re-seeds from (seed, call index) inside a forked RNG, so the caller's RNG state is untouched).
    `temperature == 0` or `greedy` decodes greedily (n identical rows per prompt). `stop_marker`:
    also stop a row when the line holding it has ended (see `AnswerLineStop`). `reference`: a model whose
    log-prob of each drawn token each completion also gets (`ref_logprobs`), computed on a thread of
    `reference_threads` while the sampler decodes (models/reference_scorer.py).
    """
    greedy = greedy or temperature == 0
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids))
    per_call = max(1, batch_size // n)
    reps = n if greedy else 1  # greedy: repeat the prompt rows, generate would refuse n>1
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    results: dict[int, list[Completion]] = {}
    gen_cfg = _generation_config(max_new_tokens=max_new_tokens, pad_id=pad_id, eos_ids=sorted(eos_ids))
    fork_devices = [device] if device.type == "cuda" else []
    for call, start in enumerate(range(0, len(order), per_call)):
        idx = order[start:start + per_call]
        rows_in = [prompt_ids[i] for i in idx for _ in range(reps)]
        pb = pack(rows_in, [[] for _ in rows_in], pad_id, device)
        ids, attn = pb.input_ids, pb.attention_mask
        cache = preallocated_cache(model.config, ids.shape[1] + max_new_tokens)  # no copy per decoding step
        if not greedy and n > 1:  # G samples of a prompt share its prefill
            cache = shared_prompt_cache(model, pb, n, cache)
            ids, attn = ids.repeat_interleave(n, 0), attn.repeat_interleave(n, 0)
        processors = LogitsProcessorList()
        recorder = _RawLogprobRecorder() if return_logprobs else None
        if recorder is not None:
            processors.append(recorder)
        if not greedy:
            processors.extend(sampling_processors(temperature, top_p))
        stopping = StoppingCriteriaList()
        stop = None
        if stop_marker:
            stop = AnswerLineStop(tokenizer, stop_marker, ids.shape[1], len(idx) * n)
            stopping.append(stop)
        feed = None
        if reference is not None:
            scorer = ReferenceScorer(reference, pb, n=ids.shape[0] // pb.input_ids.shape[0], threads=reference_threads)
            feed = _FeedReference(scorer, ids.shape[1], REFERENCE_CHUNK)
            stopping.append(feed)
        try:
            with torch.random.fork_rng(devices=fork_devices, enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed * 1_000_003 + call)
                out = model.generate(input_ids=ids, attention_mask=attn, generation_config=gen_cfg,
                                     **{CACHE: cache}, logits_processor=processors, stopping_criteria=stopping)
        except BaseException:
            if feed is not None:
                feed.scorer.close()  # its thread ends; the sampler's error is the one raised
            raise
        new_t = out[:, ids.shape[1]:]
        new = new_t.tolist()
        lps = recorder.finish(out).tolist() if recorder is not None else None
        ref = feed.scorer.finish(new_t[:, feed.sent:]).tolist() if feed is not None else None
        for k, i in enumerate(idx):
            results[i] = [
                _trim(new[r], eos_ids, None if stop is None else stop.stop_len.get(r),
                      None if lps is None else lps[r])
                for r in range(k * n, k * n + n)
            ]
            if ref is not None:
                for r, c in zip(range(k * n, k * n + n), results[i]):
                    c.ref_logprobs = ref[r][:len(c.token_ids)]
    return [c for i in range(len(prompt_ids)) for c in results[i]]


def generate(model, tokenizer, prompt_ids: list[list[int]], *, n: int = 1, max_new_tokens: int = 64,
             greedy: bool = False, temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64,
             seed: int | None = None, stop_marker: str | None = None) -> list[Completion]:
    """n completions per prompt (see `sample_completions`); kept for greedy evaluation."""
    if greedy and n != 1:
        raise ValueError("greedy decoding gives one completion per prompt; use n=1")
    return sample_completions(model, tokenizer, prompt_ids, n=n, max_new_tokens=max_new_tokens, greedy=greedy,
                              temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed,
                              stop_marker=stop_marker)
