"""The GRPO update data-parallel over FSDP2 ranks (torch `fully_shard`), and the full state dicts that
keep every other part of the pipeline unchanged.

    shard(model, mesh)                      each decoder layer, then the root, sharded over the mesh
    sharded_grpo_update(policy, optimizer, batch, rank=r, world=N, **grpo_update's knobs) -> metrics
    full_model_state(model) / full_optimizer_state(model, optimizer) / load_full_optimizer_state(...)

Each rank is given the whole batch and trains on its contiguous share of the rows. Its loss is scaled by
N * (its share of the aggregation's denominator), because FSDP averages gradients over the ranks: the
averaged gradient is then the full batch's, so N ranks take the same optimizer step as one (checked
against world size 1 in tests/test_cluster.py). Every rank must run the same collectives, so every rank
runs the same number of micro-batches, and a rank whose rows happen to be flat still does its forward and
backward (only a flat *batch* is skipped, by every rank alike).

Plain torch.distributed: the process group (gloo on CPU, NCCL on GPUs) is the caller's.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard

from models.trainer import UpdateBatch, grpo_update, micro_batch_share

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """`model` (a transformers causal LM) sharded in place: each decoder layer is its own FSDP unit (its
    parameters are gathered only while it runs), the embeddings and head go with the root."""
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU, on rank 0 (other ranks get {}); a collective: every rank calls it."""
    return get_model_state_dict(model, options=FULL)


def _trainable_names(model: torch.nn.Module) -> list[str]:
    """Parameter names in the order the optimizer was given them (`models.lora.trainable_parameters`)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's unsharded state on rank 0 in torch's own index-keyed layout, the one a single-process
    optimizer saves (`stages.checkpoints.save_optimizer`), so a checkpoint resumes on either backend."""
    by_name = get_optimizer_state_dict(model, optimizer, options=FULL)
    if not by_name:
        return {}
    index = {name: i for i, name in enumerate(_trainable_names(model))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]
    return {"state": {index[n]: st for n, st in by_name["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an index-keyed full optimizer state (every rank passes the same one) into the sharded optimizer."""
    names = _trainable_names(model)
    by_name = {"state": {names[i]: st for i, st in state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def rank_rows(n: int, rank: int, world: int) -> list[int]:
    """Rank `rank`'s contiguous share of `n` rows: the first n % world ranks take one row more."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (rank < extra)))


def sharded_grpo_update(policy, optimizer, batch: UpdateBatch, *, rank: int, world: int, micro_batch_size: int,
                        aggregation: str = "sequence", **knobs) -> dict[str, float]:
    """`models.trainer.grpo_update` on this rank's rows of `batch` (every rank passes the whole batch);
    returns the batch's metrics, the same on every rank."""
    if not bool(batch.advantages.ne(0).any()):  # every rank sees the whole batch: all skip, or none
        return {"flat_batch_skipped": 1.0, "update_seconds": 0.0, "update_tokens_per_s": 0.0}
    if len(batch) < world:
        raise ValueError(f"the step has {len(batch)} rows to train on, fewer than cluster.trainer_world_size={world}")
    rows = rank_rows(len(batch), rank, world)
    # The same number of micro-batches on every rank (each forward and backward is a collective)
    n_micro = math.ceil(len(rank_rows(len(batch), 0, world)) / micro_batch_size)
    local_mbs = math.ceil(len(rows) / n_micro)
    if math.ceil(len(rows) / local_mbs) != n_micro:
        raise ValueError(f"grpo.micro_batch_size={micro_batch_size} cuts the ranks' shares of {len(batch)} rows into "
                         f"different numbers of micro-batches; make the rows a multiple of the trainer world size")
    local = batch.rows(rows)
    mask = batch.completion_mask()
    # Dr. GRPO divides by the batch's width, not the share's
    max_len = batch.width if aggregation == "dr_grpo" else None
    share = micro_batch_share(mask, rows, aggregation)  # this rank's rows are its one micro-batch of the batch
    metrics = grpo_update(policy, optimizer, local, aggregation=aggregation, micro_batch_size=local_mbs,
                          loss_scale=world * share, skip_flat=False, max_len=max_len, **knobs)
    return reduce_metrics(metrics, share, world)


def reduce_metrics(metrics: dict[str, float], share: float, world: int) -> dict[str, float]:
    """The batch's metrics from each rank's: share-weighted sums, extremes of *_min / *_max, the slowest
    rank's seconds, the ranks' tokens per second added up. Gathered as objects (a few floats), so a key
    one rank lacks cannot desynchronise the collectives."""
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (metrics, share))
    out: dict[str, float] = {}
    for key in sorted({k for m, _ in gathered for k in m}):
        values = [(m[key], s) for m, s in gathered if key in m]
        if key.endswith("_min"):
            out[key] = min(v for v, _ in values)
        elif key.endswith("_max") or key in ("update_seconds", "grad_norm", "flat_batch_skipped"):
            out[key] = max(v for v, _ in values)
        elif key == "update_tokens_per_s":
            out[key] = sum(v for v, _ in values)
        else:
            out[key] = sum(v * s for v, s in values) / max(sum(s for _, s in values), 1e-12)
    return out
