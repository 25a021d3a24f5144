"""Before RL: the data splits, the initial (SFT) policy, and greedy evaluation.

Each function takes the config and returns references (paths, numbers); outputs that do not
depend on the run (splits, the SFT warm start) are keyed by the config sections they depend on
and reused by every run that shares them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
import uuid
from pathlib import Path

import torch

from configs import PipelineConfig
from models.generation import generate
from models.loading import load_policy
from models.lora import add_adapters, merged
from models.sft import sft_optimizer, train_sft
from models.tiny import save_tiny
from problems.arithmetic import VOCAB_WORDS
from problems.datasets import BUILT_IN, prepare_splits, read_problems, split_key
from problems.prompts import encode_prompts, encode_sft_examples, stop_marker
from problems.verify import extract_answer, is_correct
from stages.checkpoints import load_optimizer, save_optimizer
from stages.faults import crash_point

log = logging.getLogger(__name__)
TINY = "tiny"
SFT_CHECKPOINTS = "checkpoints"  # inside the warm start's .partial folder
SFT_PROGRESS = "sft_progress.json"  # in each checkpoint: {"step": steps done, "seconds": SFT time spent}


def prepare_data(cfg: PipelineConfig) -> tuple[Path, Path]:
    """(train, test) Parquet paths under <artifacts>/data/."""
    return prepare_splits(cfg.data, cfg.artifacts() / "data")


def sft_examples(cfg: PipelineConfig, tokenizer) -> list[tuple[list[int], list[int]]]:
    """The worked solutions SFT (and the SFT control) may learn from: the first `sft.examples`, a
    seeded `sft.answer_only_fraction` of them cut to their final answer line."""
    train_path, _ = prepare_data(cfg)
    problems = read_problems(train_path)[: cfg.sft.examples]
    if cfg.sft.answer_only_fraction > 0:
        rng = random.Random(cfg.data.seed)
        problems = [{**p, "solution": p["solution"].rstrip().splitlines()[-1]}
                    if rng.random() < cfg.sft.answer_only_fraction else p for p in problems]
    return encode_sft_examples(tokenizer, problems, cfg.prompt)


def _sft_dir(cfg: PipelineConfig) -> Path:
    """Keyed by what the warm start's weights depend on: the model and SFT settings (not how often it
    checkpoints) and the data, by content for a data file (`split_key`), so an edited file retrains."""
    key = {"model": cfg.model.model_dump(), "sft": cfg.sft.model_dump(exclude={"checkpoint_every"}),
           "data": split_key(cfg.data)}
    return cfg.artifacts() / "sft" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _latest_sft_checkpoint(partial: Path) -> Path | None:
    """The resumable checkpoint of an unfinished warm start: <partial>/checkpoints/step=<k> with the
    largest k (a kill between writing a new one and removing the old leaves two), or None."""
    found = sorted((partial / SFT_CHECKPOINTS).glob("step=*"), key=lambda p: int(p.name.partition("=")[2]))
    return found[-1] if found else None


def _save_sft_checkpoint(partial: Path, step: int, model, tokenizer, optimizer, seconds: float) -> None:
    """<partial>/checkpoints/step=<step>: weights and tokenizer (save_pretrained), the optimizer state
    (safetensors + JSON) and the SFT seconds spent so far, written in a temporary sibling and renamed
    into place, so a kill leaves either the previous checkpoint or this one, complete."""
    root = partial / SFT_CHECKPOINTS
    tmp = root / f".step={step}.tmp-{uuid.uuid4().hex[:8]}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_optimizer(optimizer, tmp)
    (tmp / SFT_PROGRESS).write_text(json.dumps({"step": step, "seconds": seconds}))
    final = root / f"step={step}"
    tmp.rename(final)
    for older in root.glob("step=*"):
        if older != final:
            shutil.rmtree(older)
    crash_point("sft")


def warm_started(cfg: PipelineConfig) -> bool:
    """Whether RL starts from an SFT warm start (else from `model.policy` as given: `sft.steps: 0`, or a
    real model on a data file, whose solutions may be bare answers)."""
    return cfg.sft.steps > 0 and (cfg.model.policy == TINY or cfg.data.prompt_set in BUILT_IN)


def start_label(cfg: PipelineConfig) -> str:
    """What run summaries call the policy RL started from."""
    return "SFT policy" if warm_started(cfg) else "start policy"


def initial_policy(cfg: PipelineConfig, progress=None) -> Path | str:
    """The policy RL starts from.

    `model.policy == "tiny"`: build the offline tiny model and SFT warm-start it on the train split
    (cached under artifacts/sft/<hash of model, data and sft config>/, so a demo re-run skips it).
    Otherwise the hub id or path is returned as is, SFT'd first only when `sft.steps > 0` and the
    task is the built-in one (a real model is expected to arrive already instruction-tuned).

    The warm start trains in `<that folder>.partial`, checkpointing every `sft.checkpoint_every`
    steps there; a killed one resumes from its last checkpoint and ends with the same weights, to
    the bit, as one never stopped. The folder gets its final name only once complete.
    """
    if not warm_started(cfg) and cfg.model.policy != TINY:
        return cfg.model.policy
    out = _sft_dir(cfg)
    if (out / "sft.json").exists():
        return out
    tmp = out.with_name(out.name + ".partial")
    checkpoint = _latest_sft_checkpoint(tmp)
    if checkpoint is not None:
        source = str(checkpoint)
        done = json.loads((checkpoint / SFT_PROGRESS).read_text())
        log.info("resuming the SFT warm start from %s", checkpoint)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        done = {"step": 0, "seconds": 0.0}
        if cfg.model.policy == TINY:
            save_tiny(tmp, VOCAB_WORDS, seed=cfg.model.seed, **cfg.model.tiny.model_dump(
                include={"hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"}))
            source = str(tmp)
        else:
            source = cfg.model.policy
    model, tok = load_policy(source, **cfg.model.load_kwargs())
    optimizer = sft_optimizer(model, cfg.sft.lr)
    if checkpoint is not None:
        load_optimizer(optimizer, checkpoint)
    examples = sft_examples(cfg, tok)
    t0 = time.perf_counter() - done["seconds"]

    def on_checkpoint(step: int, stepped_optimizer) -> None:
        _save_sft_checkpoint(tmp, step, model, tok, stepped_optimizer, time.perf_counter() - t0)

    with cfg.model.compute():
        losses = train_sft(model, examples, pad_id=tok.pad_token_id, steps=cfg.sft.steps,
                           batch_size=cfg.sft.batch_size, lr=cfg.sft.lr, warmup_steps=cfg.sft.warmup_steps,
                           seed=cfg.model.seed, optimizer=optimizer, start_step=done["step"],
                           checkpoint_every=cfg.sft.checkpoint_every, on_checkpoint=on_checkpoint,
                           on_step=progress)
    seconds = time.perf_counter() - t0
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(tmp / SFT_CHECKPOINTS, ignore_errors=True)
    (tmp / "sft.json").write_text(json.dumps({
        "source": cfg.model.policy, "steps": cfg.sft.steps, "final_loss": losses[-1] if losses else None,
        "seconds": round(seconds, 1)}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # complete or absent: a crash mid-SFT never leaves a model that looks finished
    return out


@torch.no_grad()
def greedy_accuracy(model, tokenizer, problems: list[dict], prompt_cfg, *, max_new_tokens: int, batch_size: int = 256,
                    last_number: bool = False) -> dict:
    """Held-out greedy accuracy (plus answer rate and mean length) of `model` on `problems`. A row stops at
    EOS or, for plain prompts, once its `####` answer line has ended (`problems.prompts.stop_marker`)."""
    was_training = model.training
    model.eval()
    _, prompts = encode_prompts(tokenizer, [p["question"] for p in problems], prompt_cfg)
    outs = generate(model, tokenizer, prompts, greedy=True, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    stop_marker=stop_marker(tokenizer, prompt_cfg))
    texts = tokenizer.batch_decode([o.token_ids for o in outs], skip_special_tokens=True)
    correct = [is_correct(t, p["answer"], last_number=last_number) for t, p in zip(texts, problems)]
    model.train(was_training)
    return {
        "accuracy": sum(correct) / len(problems),
        "answered": sum(extract_answer(t, last_number=last_number) is not None for t in texts) / len(problems),
        "mean_length": sum(len(o.token_ids) for o in outs) / len(problems),
        "n": len(problems),
    }


def continue_sft(cfg: PipelineConfig, start: str | Path, seconds: float, out: Path) -> Path:
    """The control for RL: continue SFT from `start` for `seconds` of this process's CPU time (RL's
    budget is measured the same way, so a busier machine in one phase does not favour either side).

    Same data, batch size and peak lr as the warm start; the cosine schedule is laid over the
    number of steps the warm start's measured speed fits into `seconds`, so the control anneals
    as a planned run of that length would. Written in `<out>.partial` and renamed to `out` once
    complete; an `out` already complete (a resumed run) is returned as it is, not trained again.
    """
    out = Path(out)
    if (out / "sft.json").exists():
        return out
    model, tok = load_policy(str(start), **cfg.model.load_kwargs())
    meta_path = Path(start) / "sft.json"
    rate = None
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        rate = meta["steps"] / meta["seconds"] if meta.get("seconds") else None
    # Without a measured speed (a model that had no warm start here) the schedule's horizon is never
    # reached: a constant rate until the time is spent.
    steps = max(1, int(seconds * rate)) if rate else 10**9
    if cfg.model.lora.enabled:  # the control trains what RL trains: adapters, merged at the end
        model = add_adapters(model, cfg.model.lora, seed=cfg.model.seed)
    with cfg.model.compute():
        losses = train_sft(model, sft_examples(cfg, tok), pad_id=tok.pad_token_id, steps=steps,
                           batch_size=cfg.sft.batch_size, lr=cfg.sft.lr, warmup_steps=0, seed=cfg.model.seed + 1,
                           max_seconds=seconds, clock=time.process_time)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (merged(model) if cfg.model.lora.enabled else model).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "sft.json").write_text(json.dumps({"source": str(start), "steps": len(losses), "seconds": seconds,
                                              "planned_steps": steps if rate else None}, indent=1))
    shutil.rmtree(out, ignore_errors=True)  # an `out` without sft.json is no result
    tmp.rename(out)
    crash_point("sft_control")
    return out
