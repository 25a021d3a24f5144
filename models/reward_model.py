"""Value-head reward models: a causal LM's backbone plus a Linear head read at chosen tokens.

- Outcome RM (`kind="outcome"`): one score per completion, read at its last token.
- Process RM (`kind="process"`): one score per step, read at each step-end token (the step ends
  of `models.advantages.step_ends_from_tokens`).

Both read the backbone's final hidden state (after its final norm) at completion-token indices of a
left-padded prompt+completion batch (`models.policy.pack`): completion token t of row i sits at
column `L - len_i + t`, so a position of -1 on an empty completion reads the prompt's last token.
The head gives a logit; the score is `sigmoid(logit)` ("probability") or the logit itself.

Plain torch + transformers, no file layout: `save_pretrained(dir)` writes the backbone with
`save_pretrained` (safetensors + config.json), the head as `value_head.safetensors` and a small
`reward_model.json` (kind, score mode, pad id). Nothing is pickled.
"""
from __future__ import annotations

import copy
import json
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn
from transformers import get_cosine_schedule_with_warmup

from models.advantages import step_ends_from_tokens
from models.policy import pack

KINDS = ("outcome", "process")
SCORE_MODES = ("probability", "logit")
HEAD_FILE = "value_head.safetensors"
META_FILE = "reward_model.json"

# (prompt_ids, completion_ids, positions, labels): positions are completion-token indices,
# labels one float in [0, 1] per position.
Example = tuple[Sequence[int], Sequence[int], Sequence[int], Sequence[float]]


def default_positions(kind: str, completion_ids: Sequence[int], delimiter_ids=frozenset()) -> list[int]:
    """Where a reward model of `kind` reads a completion: its last token (outcome; -1, the prompt's
    last token, when empty) or its step ends (process; none when empty)."""
    if kind == "outcome":
        return [len(completion_ids) - 1]
    if kind == "process":
        return step_ends_from_tokens(list(completion_ids), delimiter_ids)
    raise ValueError(f"unknown reward model kind {kind!r}; expected one of {KINDS}")


class ValueHeadRewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, kind: str, *, score_mode: str = "probability", pad_id: int = 0,
                 head: nn.Linear | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown reward model kind {kind!r}; expected one of {KINDS}")
        if score_mode not in SCORE_MODES:
            raise ValueError(f"unknown score mode {score_mode!r}; expected one of {SCORE_MODES}")
        self.backbone = backbone
        self.kind = kind
        self.score_mode = score_mode
        self.pad_id = int(pad_id)
        hidden = backbone.config.get_text_config().hidden_size
        if head is None:
            head = nn.Linear(hidden, 1)
            nn.init.zeros_(head.weight)  # starts at p = 0.5 everywhere: no prior from a random head
            nn.init.zeros_(head.bias)
        self.head = head.float().to(next(backbone.parameters()).device)

    # ---- construction / persistence -------------------------------------------------------
    @classmethod
    def from_policy(cls, policy, kind: str, *, score_mode: str = "probability", pad_id: int | None = None,
                    dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False):
        """A fresh head on a copy of a causal LM's backbone (`policy`: a loaded model, or a hub id /
        local path, loaded with `AutoModel`, which drops the LM head)."""
        if isinstance(policy, (str, Path)):
            from transformers import AutoModel

            from models.loading import DTYPES

            backbone = AutoModel.from_pretrained(str(policy), dtype=DTYPES[dtype],
                                                 trust_remote_code=trust_remote_code).to(device)
        else:
            if hasattr(policy, "peft_config"):  # a LoRA policy: its function, adapters merged into a copy
                from models.lora import merged

                policy = merged(copy.deepcopy(policy))
            backbone = copy.deepcopy(policy.base_model)
        if pad_id is None:
            pad_id = backbone.config.pad_token_id
            pad_id = 0 if pad_id is None else pad_id
        return cls(backbone, kind, score_mode=score_mode, pad_id=pad_id)

    def save_pretrained(self, out_dir: str | Path, tokenizer=None) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(out)  # safetensors
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.head.state_dict().items()},
                  out / HEAD_FILE)
        meta = {"kind": self.kind, "score_mode": self.score_mode, "pad_id": self.pad_id,
                "hidden_size": self.head.in_features, "format": 1}
        (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: str = "float32", device: str = "cpu",
                        score_mode: str | None = None, trust_remote_code: bool = False):
        from transformers import AutoModel

        from models.loading import DTYPES

        path = Path(path)
        meta = json.loads((path / META_FILE).read_text())
        backbone = AutoModel.from_pretrained(str(path), dtype=DTYPES[dtype],
                                             trust_remote_code=trust_remote_code).to(device)
        head = nn.Linear(meta["hidden_size"], 1)
        head.load_state_dict(load_file(path / HEAD_FILE))
        rm = cls(backbone, meta["kind"], score_mode=score_mode or meta["score_mode"], pad_id=meta["pad_id"],
                 head=head)
        rm.eval()
        return rm

    # ---- forward ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    def backbone_trainable(self) -> bool:
        return any(p.requires_grad for p in self.backbone.parameters())

    def logits_at(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                  positions: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """Head logits at the given completion-token positions of each row.

        Returns (logits [N] float32, row [N] long), N = total number of positions, in row order
        then position order.
        """
        if not (len(prompt_ids) == len(completion_ids) == len(positions)):
            raise ValueError("prompt_ids, completion_ids and positions must have the same length")
        pb = pack(prompt_ids, completion_ids, self.pad_id, self.device)
        L = pb.input_ids.shape[1]
        rows, cols = [], []
        for i, (p, c, pos) in enumerate(zip(prompt_ids, completion_ids, positions)):
            for t in pos:
                if not -len(p) <= t < len(c):
                    raise ValueError(f"row {i}: position {t} outside the completion (length {len(c)}, "
                                     f"prompt {len(p)})")
                rows.append(i)
                cols.append(L - len(c) + t)
        row = torch.tensor(rows, dtype=torch.long, device=self.device)
        col = torch.tensor(cols, dtype=torch.long, device=self.device)
        if not rows:
            return torch.zeros(0, device=self.device), row
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.backbone_trainable()):
            hidden = self.backbone(input_ids=pb.input_ids, attention_mask=pb.attention_mask,
                                   position_ids=pb.position_ids).last_hidden_state
            picked = hidden[row, col]
        return self.head(picked.float()).squeeze(-1), row

    def to_score(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits) if self.score_mode == "probability" else logits

    @torch.no_grad()
    def score(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
              positions: Sequence[Sequence[int]] | None = None, *, delimiter_ids=frozenset(),
              batch_size: int = 64, score_mode: str | None = None) -> list[list[float]]:
        """Scores per row (one per position; default positions from the kind), in `score_mode`
        (default: the model's own)."""
        mode = score_mode or self.score_mode
        if mode not in SCORE_MODES:
            raise ValueError(f"unknown score mode {mode!r}; expected one of {SCORE_MODES}")
        if positions is None:
            positions = [default_positions(self.kind, c, delimiter_ids) for c in completion_ids]
        out: list[list[float]] = []
        for s in range(0, len(completion_ids), batch_size):
            logits, row = self.logits_at(prompt_ids[s:s + batch_size], completion_ids[s:s + batch_size],
                                         positions[s:s + batch_size])
            values = (torch.sigmoid(logits) if mode == "probability" else logits).tolist()
            per_row: list[list[float]] = [[] for _ in range(len(completion_ids[s:s + batch_size]))]
            for r, v in zip(row.tolist(), values):
                per_row[r].append(v)
            out.extend(per_row)
        return out


# ---- losses --------------------------------------------------------------------------------
def bce_loss(logits: Tensor, labels: Tensor | Sequence[float]) -> Tensor:
    """Mean binary cross-entropy over read positions: one per completion (outcome) or one per step
    (process). Labels may be soft (Math-Shepherd's fraction)."""
    labels = torch.as_tensor(labels, dtype=torch.float32, device=logits.device)
    if logits.shape != labels.shape:
        raise ValueError(f"{tuple(logits.shape)} logits vs {tuple(labels.shape)} labels")
    return nn.functional.binary_cross_entropy_with_logits(logits.float(), labels)


outcome_bce_loss = bce_loss
process_bce_loss = bce_loss


# ---- training ------------------------------------------------------------------------------
def train_value_model(rm: ValueHeadRewardModel, examples: Sequence[Example], *, epochs: int, batch_size: int,
                      lr: float, seed: int, freeze_backbone: bool = False, head_lr: float | None = None,
                      warmup_steps: int = 10, grad_clip: float = 1.0, weight_decay: float = 0.0,
                      on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train in place with BCE on the head's logits; returns the loss per optimiser step.

    AdamW, warm-up + cosine schedule, shuffled epochs from a seeded RNG (same seed, same run).
    With `freeze_backbone` only the head learns (and the backbone runs without a graph).
    Examples without positions (empty completions for a process RM) are skipped.
    """
    examples = [e for e in examples if len(e[2])]
    if not examples:
        raise ValueError("reward model training needs at least one example with a position")
    for p in rm.backbone.parameters():
        p.requires_grad_(not freeze_backbone)
    groups = [{"params": list(rm.head.parameters()), "lr": head_lr or lr}]
    if not freeze_backbone:
        groups.append({"params": list(rm.backbone.parameters()), "lr": lr})
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(examples) / batch_size)
    sched = get_cosine_schedule_with_warmup(opt, warmup_steps, steps)
    rng = random.Random(seed)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    losses: list[float] = []
    rm.train()
    try:
        for _ in range(epochs):
            order = list(range(len(examples)))
            rng.shuffle(order)
            for s in range(0, len(order), batch_size):
                batch = [examples[i] for i in order[s:s + batch_size]]
                logits, _ = rm.logits_at([b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch])
                loss = bce_loss(logits, [float(x) for b in batch for x in b[3]])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], grad_clip)
                opt.step()
                sched.step()
                losses.append(loss.item())
                if on_step is not None:
                    on_step(len(losses) - 1, losses[-1])
    finally:
        rm.eval()
        torch.random.set_rng_state(gen_state)
        for p in rm.backbone.parameters():
            p.requires_grad_(True)
    return losses


@torch.no_grad()
def predict_logits(rm: ValueHeadRewardModel, examples: Sequence[Example], *, batch_size: int = 128) -> Tensor:
    """Logits at every example's positions, flattened in order ([sum of positions])."""
    out = []
    for s in range(0, len(examples), batch_size):
        batch = examples[s:s + batch_size]
        logits, _ = rm.logits_at([b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch])
        out.append(logits.cpu())
    return torch.cat(out) if out else torch.zeros(0)


# ---- metrics (pure) ------------------------------------------------------------------------
def roc_auc(scores: Sequence[float] | Tensor, labels: Sequence[float] | Tensor) -> float:
    """Area under the ROC curve (ties count half); labels >= 0.5 are positives.
    NaN when only one class is present (or none), where the area is undefined."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    y = torch.as_tensor(labels, dtype=torch.float64).flatten() >= 0.5
    if y.all() or not y.any():  # roc_auc_score raises there; a held-out set may hold one class
        return float("nan")
    return float(roc_auc_score(y.numpy(), s.numpy()))


def accuracy(logits: Sequence[float] | Tensor, labels: Sequence[float] | Tensor) -> float:
    """Fraction where (logit > 0) == (label >= 0.5); NaN when empty."""
    z = torch.as_tensor(logits, dtype=torch.float64).flatten()
    y = torch.as_tensor(labels, dtype=torch.float64).flatten() >= 0.5
    return float(((z > 0) == y).double().mean()) if len(z) else float("nan")


def majority_accuracy(labels: Sequence[float] | Tensor) -> float:
    """Accuracy of always predicting the more frequent class: the baseline an accuracy must beat."""
    y = torch.as_tensor(labels, dtype=torch.float64).flatten() >= 0.5
    if not len(y):
        return float("nan")
    p = float(y.double().mean())
    return max(p, 1 - p)


def classification_metrics(logits: Sequence[float] | Tensor, labels: Sequence[float] | Tensor) -> dict[str, float]:
    z = torch.as_tensor(logits, dtype=torch.float32).flatten()
    y = torch.as_tensor(labels, dtype=torch.float32).flatten()
    return {
        "auc": roc_auc(z, y),
        "accuracy": accuracy(z, y),
        "majority_accuracy": majority_accuracy(y),
        "positive_rate": float((y >= 0.5).float().mean()) if len(y) else float("nan"),
        "bce": float(nn.functional.binary_cross_entropy_with_logits(z, y)) if len(y) else float("nan"),
        "n": float(len(y)),
    }


def evaluate_value_model(rm: ValueHeadRewardModel, examples: Sequence[Example], *,
                         batch_size: int = 128) -> dict[str, float]:
    """Held-out quality: AUC / accuracy / majority baseline over completions (outcome) or steps (process)."""
    examples = [e for e in examples if len(e[2])]
    logits = predict_logits(rm, examples, batch_size=batch_size)
    labels = [float(x) for e in examples for x in e[3]]
    return classification_metrics(logits, labels)
