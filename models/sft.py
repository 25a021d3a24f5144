"""Supervised fine-tuning: the warm start the paper begins RL from (gradient coefficient 1).

Masked LM loss on the completion (solution) tokens only; prompts are context, not targets.
"""
from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Iterator

import torch
from transformers import get_cosine_schedule_with_warmup

from models.policy import completion_logprobs
from models.trainer import clip_and_step


def target_nll(model, prompt_ids: list[list[int]], target_ids: list[list[int]], pad_id: int) -> torch.Tensor:
    """The model's mean negative log-likelihood over all target tokens of the batch (the SFT loss). []"""
    logp, mask, _ = completion_logprobs(model, prompt_ids, target_ids, pad_id=pad_id, with_grad=True)
    return -(logp * mask).sum() / mask.sum().clamp(min=1)


def sft_batches(n_examples: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """The example indices of every SFT step, without end: shuffled epochs from random.Random(seed),
    a batch straddling two epochs taking the end of one and the start of the next.

    A function of its arguments alone, so a resumed run finds the batch of step k by replaying the
    first k (a few shuffles of integer lists) instead of saving the generator's state.
    """
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            fresh = list(range(n_examples))
            rng.shuffle(fresh)
            order.extend(fresh)
        yield order[:batch_size]
        del order[:batch_size]


def sft_optimizer(model, lr: float) -> torch.optim.Optimizer:
    """The optimizer train_sft steps: AdamW, no weight decay. A resumed run loads the saved state into
    this and passes it to train_sft."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)


def train_sft(model, examples: list[tuple[list[int], list[int]]], *, pad_id: int, steps: int, batch_size: int,
              lr: float, warmup_steps: int, seed: int, grad_clip: float = 1.0,
              optimizer: torch.optim.Optimizer | None = None, start_step: int = 0,
              checkpoint_every: int | None = None,
              on_checkpoint: Callable[[int, torch.optim.Optimizer], None] | None = None,
              on_step: Callable[[int, float], None] | None = None,
              max_seconds: float | None = None, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Train `model` in place on (prompt_ids, target_ids) pairs; returns the loss of each step it ran.

    AdamW (`sft_optimizer`), the warm-up + cosine schedule over `steps`, the batches of
    `sft_batches` (same seed, same run). `max_seconds` stops early once that much time (by `clock`)
    is spent: a time-matched control.

    Resumable: after every `checkpoint_every`-th step but the last (whose result the caller saves
    anyway) `on_checkpoint(steps_done, optimizer)` is called, the moment to save the weights and
    the optimizer state. To resume, pass `start_step` = those steps done, `model` with their
    weights and `optimizer` = `sft_optimizer(model, lr)` with their state loaded: the schedule, the
    data order and any dropout are functions of the step, so the run continues as if it had never
    stopped, to the bit. A non-finite loss or gradient norm raises models.trainer.NonFiniteUpdateError
    before the step (no NaN weights to checkpoint).
    """
    if not examples:
        raise ValueError("SFT needs at least one example")
    opt = sft_optimizer(model, lr) if optimizer is None else optimizer
    # Resumed (last_epoch = start_step - 1): the schedule takes the lr of step `start_step` from the
    # initial_lr the first run's schedule left in the (loaded) optimizer's param groups.
    sched = get_cosine_schedule_with_warmup(opt, warmup_steps, steps, last_epoch=start_step - 1)
    batches = itertools.islice(sft_batches(len(examples), batch_size, seed), start_step, None)
    device = next(model.parameters()).device
    fork_devices = [device] if device.type == "cuda" else []
    losses = []
    model.train()
    start = clock()
    for step, rows in zip(range(start_step, steps), batches):
        if max_seconds is not None and clock() - start >= max_seconds:
            break
        batch = [examples[i] for i in rows]
        opt.zero_grad(set_to_none=True)
        # Dropout, in a model that has any, draws from a generator seeded by (seed, step): a resumed
        # run replays it without saving RNG state, and the caller's RNG is left as it was.
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed * 1_000_003 + step)
            loss = target_nll(model, [p for p, _ in batch], [t for _, t in batch], pad_id)
            loss.backward()
        losses.append(loss.item())
        clip_and_step(model, opt, losses[-1], grad_clip)
        sched.step()
        if on_step is not None:
            on_step(step, losses[-1])
        done = step + 1
        if on_checkpoint is not None and checkpoint_every and done % checkpoint_every == 0 and done < steps:
            on_checkpoint(done, opt)
    model.eval()
    return losses
