"""Micro-benchmark: models.grpo.grpo_loss forward+backward vs the same maths row by row.

Run from the repo root:  .venv/bin/python bench/grpo_loss.py
Writes/replaces the "## grpo_loss forward+backward" section of BENCHMARKS.md.

B = 64 outputs, T = 512 positions, right-padded completions of ragged lengths,
random old/ref log-probs around the policy's (so some tokens clip), beta = 0.04,
paper ("sequence") aggregation. The naive baseline is what one writes without
masks: a Python loop over outputs that slices each completion to its length and
applies the formula to that row (torch ops within the row). It computes only the
loss, while grpo_loss also computes its metrics, so the comparison favours the
baseline. Both are checked to give the same loss and gradient before timing.

Timed on one torch thread: the per-row ops are below ATen's parallel grain size
(32768 elements) and never use the thread pool, so one thread compares the maths
rather than OpenMP. The vectorised loss at torch's default thread count is
reported as well, with the load average: on a small shared machine OpenMP's
barriers make it much slower when other processes hold the CPUs.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import cpu_model, write_section  # noqa: E402

from models.grpo import grpo_loss  # noqa: E402

B, T, EPS, BETA = 64, 512, 0.2, 0.04
REPEATS, WARMUP = 30, 3
SECTION = "## grpo_loss forward+backward"
COMMAND = ".venv/bin/python bench/grpo_loss.py"


def naive_grpo_loss(logp, old_logp, ref_logp, advantages, lengths):
    """Sequence-mean GRPO loss, one completion at a time (rows of length 0 skipped)."""
    row_objectives = []
    for i, n in enumerate(lengths):
        if n == 0:
            continue
        lp, old, ref = logp[i, :n], old_logp[i, :n], ref_logp[i, :n]
        ratio = torch.exp(lp - old)
        surr = torch.min(ratio * advantages[i], torch.clamp(ratio, 1 - EPS, 1 + EPS) * advantages[i])
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        row_objectives.append((surr - BETA * kl).mean())
    return -torch.stack(row_objectives).mean()


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, T + 1, (B,), generator=g)
    lengths[:4] = T  # some completions hit the length limit, as in practice
    mask = torch.arange(T)[None, :] < lengths[:, None]
    logp = -torch.rand(B, T, generator=g) * 4
    old_logp = logp + 0.1 * torch.randn(B, T, generator=g)
    ref_logp = logp + 0.1 * torch.randn(B, T, generator=g)
    advantages = torch.randn(B, generator=g)
    return logp, old_logp, ref_logp, advantages, mask, lengths.tolist()


def loss_and_grad(fn, logp):
    logp = logp.detach().requires_grad_(True)
    loss = fn(logp)
    loss.backward()
    return loss.detach(), logp.grad


def median_ms(fn, logp):
    for _ in range(WARMUP):
        loss_and_grad(fn, logp)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        loss_and_grad(fn, logp)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-write", action="store_true", help="print the section, do not touch BENCHMARKS.md")
    args = ap.parse_args()
    logp, old_logp, ref_logp, advantages, mask, lengths = make_batch()

    def vectorised(lp):
        return grpo_loss(lp, old_logp, ref_logp, advantages, mask, eps_low=EPS, beta=BETA)[0]

    def naive(lp):
        return naive_grpo_loss(lp, old_logp, ref_logp, advantages, lengths)

    loss_v, grad_v = loss_and_grad(vectorised, logp)
    loss_n, grad_n = loss_and_grad(naive, logp)
    torch.testing.assert_close(loss_v, loss_n)
    torch.testing.assert_close(grad_v, grad_n)

    default_threads = torch.get_num_threads()
    t_vec_default = median_ms(vectorised, logp)
    torch.set_num_threads(1)
    t_vec, t_naive = median_ms(vectorised, logp), median_ms(naive, logp)
    ratio = t_naive / t_vec
    nproc = len(os.sched_getaffinity(0))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    text = (
        f"{SECTION}\n\n"
        f"`{COMMAND}` (bench/grpo_loss.py): B={B}, T={T}, float32, ragged right-padded lengths "
        f"({sum(lengths)} tokens), sequence aggregation, beta={BETA}; median of {REPEATS} runs "
        f"after {WARMUP} warm-up, forward + backward.\n\n"
        f"- machine: {nproc} CPUs ({cpu_model()}), torch {torch.__version__}, Python "
        f"{platform.python_version()}, load average {load} at the end of the run\n"
        f"- 1 torch thread: `grpo_loss` (masked, vectorised, with metrics) {t_vec:.2f} ms, "
        f"naive per-row loop (loss only) {t_naive:.2f} ms: speed-up {ratio:.1f}x\n"
        f"- `grpo_loss` at torch's default {default_threads} threads: {t_vec_default:.2f} ms\n"
    )
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
