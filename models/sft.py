"""Supervised fine-tuning: the warm start the paper begins RL from (gradient coefficient 1).

Masked LM loss on the completion (solution) tokens only; prompts are context, not targets.
"""
from __future__ import annotations

import random
import time
from typing import Callable

import torch
from transformers import get_cosine_schedule_with_warmup

from models.policy import completion_logprobs


def target_nll(model, prompt_ids: list[list[int]], target_ids: list[list[int]], pad_id: int) -> torch.Tensor:
    """The model's mean negative log-likelihood over all target tokens of the batch (the SFT loss). []"""
    logp, mask, _ = completion_logprobs(model, prompt_ids, target_ids, pad_id=pad_id, with_grad=True)
    return -(logp * mask).sum() / mask.sum().clamp(min=1)


def train_sft(model, examples: list[tuple[list[int], list[int]]], *, pad_id: int, steps: int, batch_size: int,
              lr: float, warmup_steps: int, seed: int, grad_clip: float = 1.0,
              on_step: Callable[[int, float], None] | None = None,
              max_seconds: float | None = None, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Train `model` in place on (prompt_ids, target_ids) pairs; returns the loss per step.

    AdamW, warm-up + cosine schedule over `steps`, shuffled epochs from a seeded RNG (same seed,
    same run). `max_seconds` stops early once that much time (by `clock`) is spent: a time-matched control.
    """
    if not examples:
        raise ValueError("SFT needs at least one example")
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, warmup_steps, steps)
    order: list[int] = []
    losses = []
    model.train()
    start = clock()
    for step in range(steps):
        if max_seconds is not None and clock() - start >= max_seconds:
            break
        if len(order) < batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order.extend(fresh)
        batch = [examples[i] for i in order[:batch_size]]
        del order[:batch_size]
        loss = target_nll(model, [p for p, _ in batch], [t for _, t in batch], pad_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses
