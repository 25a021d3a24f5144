"""One GRPO policy update on a scored, advantage-annotated batch (the inner loop of Algorithm 1).

    ref_logp  <- reference model, no grad                    (skipped when beta == 0)
    old_logp  <- policy, no grad, teacher-forced             (only when mu > 1)
    repeat mu times:
        for each micro-batch: loss = grpo_loss(...) * its share of the batch; backward
        clip grad norm; AdamW step         (not taken, NonFiniteUpdateError, if loss or norm is inf/NaN)

With mu == 1 the policy that sampled is the policy being updated, so `old_logp` is the update's
own log-probs detached: the ratio is 1 in value but still carries the gradient (spec). With
mu > 1 the first inner update's log-probs must be frozen; they are recomputed by the trainer
rather than taken from the sampler, whose numerics (vLLM's above all) differ.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from models.grpo import grpo_loss, importance_ratio_metrics, importance_weights, sampler_log_ratio
from models.policy import completion_logprobs, completion_mask


@dataclass
class UpdateBatch:
    """What an update needs, without re-tokenising: B rows laid out group after group
    (`group_size` outputs per question), T = the longest completion.

    GRPO (`grpo_update`) reads advantages: [B] (outcome) or [B, T] (process), sampler_logp: [B, T]
    (for the sampler/trainer mismatch metric) and ref_logp: [B, T] (pi_ref's, when scored while sampling:
    then the update runs no reference forward). The other methods (models/method_update.py) read
    correct: [B] bool (rule verifier) and rewards: [B] float (PPO's r_phi).
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    correct: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    group_size: int = 1
    advantages: torch.Tensor | None = None
    sampler_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return max((len(c) for c in self.completion_ids), default=0)

    def __len__(self) -> int:
        return len(self.completion_ids)

    def completion_mask(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """[B, T] bool, true on completion tokens."""
        return completion_mask(torch.tensor([len(c) for c in self.completion_ids], device=device), self.width)

    def rows(self, index: list[int]) -> "UpdateBatch":
        """The rows `index`, in that order, as single outputs (group_size 1); [B, T] tensors are cut to the
        picked rows' longest completion, the new T."""
        width = max((len(self.completion_ids[i]) for i in index), default=0)

        def pick(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else (x[index][:, :width] if x.dim() == 2 else x[index])

        return UpdateBatch([self.prompt_ids[i] for i in index], [self.completion_ids[i] for i in index],
                           pick(self.correct), pick(self.rewards), 1, pick(self.advantages), pick(self.sampler_logp),
                           pick(self.ref_logp))

    def informative_rows(self) -> list[int]:
        """The rows of the groups with a non-zero advantage somewhere (DAPO's dynamic-sampling filter without
        the resampling): a group whose outputs all scored alike adds no policy gradient, only its KL term
        and its share of the loss's denominator, at a full forward and backward's cost."""
        g = self.group_size
        keep = self.advantages.reshape(len(self) // g, -1).ne(0).any(-1)
        return [i for i in range(len(self)) if keep[i // g]]


def micro_batch_share(mask: torch.Tensor, rows: slice | list[int], aggregation: str) -> float:
    """A micro-batch's weight in the full-batch loss, so that accumulated gradients equal the
    full-batch gradient for each aggregation's denominator (also a data-parallel rank's: models/fsdp.py)."""
    mb = mask[rows]
    if aggregation == "token":
        return float(mb.sum()) / max(1.0, float(mask.sum()))
    if aggregation == "sequence":  # rows with no tokens are left out of the mean (models/grpo.py)
        return float(mb.any(-1).sum()) / max(1.0, float(mask.any(-1).sum()))
    return mb.shape[0] / max(1, mask.shape[0])


class NonFiniteUpdateError(RuntimeError):
    """A loss or gradient norm was inf or NaN; the update stopped before its optimizer step."""


def clip_and_step(model, optimizer, loss: float, grad_clip: float) -> float:
    """Clip the accumulated gradients' norm to `grad_clip` and take the optimizer step; returns the
    norm before clipping.

    Raises NonFiniteUpdateError before the step when `loss` or the norm is inf or NaN: one such
    step writes NaN into every weight AdamW touches, and the caller would checkpoint them.
    """
    if not math.isfinite(loss):
        raise NonFiniteUpdateError(f"non-finite loss {loss}: update stopped before the optimizer step")
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a replicated DTensor
    if not math.isfinite(norm):
        raise NonFiniteUpdateError(f"non-finite gradient norm {norm}: update stopped before the optimizer step")
    optimizer.step()
    return norm


@torch.no_grad()
def frozen_logprobs(model, batch: UpdateBatch, pad_id: int, micro_batch_size: int) -> torch.Tensor:
    """[B, T] teacher-forced log-probs under `model`, no grad (pi_ref, or pi_old when mu > 1)."""
    logp, _, _ = completion_logprobs(model, batch.prompt_ids, batch.completion_ids, pad_id=pad_id,
                                     width=batch.width, micro_batch_size=micro_batch_size)
    return logp


def accumulate_policy_gradients(policy, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                                mask: torch.Tensor, loss_of, *, pad_id: int, aggregation: str,
                                micro_batch_size: int, want_entropy: bool = False,
                                loss_scale: float = 1.0) -> dict[str, float]:
    """Backpropagate a batch's loss micro-batch by micro-batch (the optimizer step is the caller's).

    mask: [B, T] completion mask of the whole batch. `loss_of(rows, logp, mb_mask, entropy)` returns
    (loss, metrics) for the micro-batch `rows` (logp, mb_mask, entropy: [b, T]). Each micro-batch's
    loss is weighted by its share of the aggregation's denominator, so the accumulated gradient is
    the full-batch gradient; metrics come back share-weighted the same way, with "loss". `loss_scale`
    multiplies what is backpropagated, not the metrics (a data-parallel rank's weight: models/fsdp.py).
    """
    B, T = mask.shape
    totals: dict[str, float] = {}
    for start in range(0, B, micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        logp, mb_mask, entropy = completion_logprobs(policy, prompt_ids[rows], completion_ids[rows], pad_id=pad_id,
                                                     width=T, with_grad=True, return_entropy=want_entropy)
        loss, metrics = loss_of(rows, logp, mb_mask, entropy)
        share = micro_batch_share(mask, rows, aggregation)
        (loss * (share * loss_scale)).backward()
        metrics["loss"] = loss.item()
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v * share
    return totals


def grpo_update(policy, optimizer, batch: UpdateBatch, *, pad_id: int, ref_model=None, beta: float = 0.04,
                mu: int = 1, eps_low: float = 0.2, eps_high: float | None = None, aggregation: str = "sequence",
                grad_clip: float = 1.0, micro_batch_size: int = 64, importance_correction: str = "none",
                importance_cap: float = 3.0, loss_scale: float = 1.0, skip_flat: bool = True,
                max_len: int | None = None) -> dict[str, float]:
    """Run `mu` optimizer steps of GRPO on `batch`; returns metrics averaged over the inner steps
    (entropy, the sampler/trainer log-prob gap and the importance ratio's statistics: from the first,
    before any update).

    `importance_correction` (models/grpo.py, IMPORTANCE_CORRECTIONS): weight each token's surrogate by the
    trainer's old probability over the sampler's (`batch.sampler_logp`), truncated or masked at `importance_cap`.

    A batch whose advantages are all 0 (every group's outputs scored alike) carries no learning signal:
    no optimizer step is taken (AdamW would still move the weights by its decay and its momentum of
    earlier steps), and the metrics say so with `flat_batch_skipped` = 1.

    For a data-parallel rank (models/fsdp.py): `loss_scale` weights the backpropagated loss, `skip_flat=False`
    trains a flat share of a batch that is not flat, `max_len` is Dr. GRPO's width (default: the batch's)."""
    if beta > 0 and ref_model is None and batch.ref_logp is None:
        raise ValueError(f"grpo.beta={beta} needs a reference model or the batch's reference log-probs")
    if batch.advantages is None:
        raise ValueError("grpo needs batch.advantages (stages.advantages.compute_advantages)")
    if importance_correction != "none" and batch.sampler_logp is None:
        raise ValueError(f"importance correction {importance_correction!r} needs the sampler's log-probs of every "
                         "output (the rollouts' old_logprobs), and this batch has none")
    if skip_flat and not bool(batch.advantages.ne(0).any()):
        return {"flat_batch_skipped": 1.0, "update_seconds": 0.0, "update_tokens_per_s": 0.0}
    t0 = time.perf_counter()
    T = batch.width
    device = next(policy.parameters()).device
    mask = batch.completion_mask(device)
    adv = batch.advantages.to(device)
    ref_logp = None
    if beta > 0:
        ref_logp = (batch.ref_logp.to(device) if batch.ref_logp is not None
                    else frozen_logprobs(ref_model, batch, pad_id, micro_batch_size))
    old_logp = frozen_logprobs(policy, batch, pad_id, micro_batch_size) if mu > 1 else None
    level = importance_correction.split("_")[0]
    log_ratios: list[torch.Tensor] = []  # the first inner pass's, for the ratio's statistics

    def loss_of(rows, logp, mb_mask, entropy):
        old = old_logp[rows] if old_logp is not None else logp.detach()
        is_weights = None
        if importance_correction != "none":
            log_ratio = sampler_log_ratio(old, batch.sampler_logp[rows].to(device), mb_mask, level)
            is_weights = importance_weights(log_ratio, importance_correction, importance_cap)
            if entropy is not None:
                log_ratios.append(log_ratio[mb_mask] if level == "token" else log_ratio[mb_mask.any(-1)].flatten())
        loss, metrics = grpo_loss(logp, old, ref_logp[rows] if ref_logp is not None else None, adv[rows], mb_mask,
                                  eps_low=eps_low, eps_high=eps_high, beta=beta, aggregation=aggregation,
                                  max_len=max_len or T,
                                  is_weights=is_weights)
        if entropy is not None:
            n = mb_mask.sum().clamp(min=1)
            metrics["entropy"] = float((entropy * mb_mask).sum() / n)
            if batch.sampler_logp is not None:
                gap = (logp.detach() - batch.sampler_logp[rows].to(device)).abs()
                metrics["sampler_logp_gap"] = float((gap * mb_mask).sum() / n)
        return loss, metrics

    policy.train()
    totals: dict[str, float] = {}
    for inner in range(mu):
        optimizer.zero_grad(set_to_none=True)
        metrics = accumulate_policy_gradients(policy, batch.prompt_ids, batch.completion_ids, mask, loss_of,
                                              pad_id=pad_id, aggregation=aggregation,
                                              micro_batch_size=micro_batch_size, want_entropy=inner == 0,
                                              loss_scale=loss_scale)
        metrics["grad_norm"] = clip_and_step(policy, optimizer, metrics["loss"], grad_clip)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + (v if k in ("entropy", "sampler_logp_gap") else v / mu)
    policy.eval()
    if log_ratios:
        totals.update(importance_ratio_metrics(torch.cat(log_ratios), importance_cap))
    seconds = time.perf_counter() - t0
    totals["flat_batch_skipped"] = 0.0
    totals["update_seconds"] = seconds
    totals["update_tokens_per_s"] = float(mask.sum()) * mu / max(seconds, 1e-9)
    return totals
