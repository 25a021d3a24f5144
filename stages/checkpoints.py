"""Checkpoints on disk: safetensors and JSON only, never pickle.

A checkpoint is a folder: the model and tokenizer (`save_pretrained`), plus the AdamW state
(`optimizer.safetensors` tensors, `optimizer.json` the rest) when it is one to resume training from.
Where each lives is `stages.run_layout.RunLayout`'s business. Every folder is written beside its
final name (`.<name>.tmp-<id>`) and renamed into place, so a crash leaves the previous checkpoint
intact rather than a half-written one; `RunLayout.remove_partial_writes` clears the temporaries.
"""
from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.lora import point_at_base
from stages.faults import crash_point

OPTIMIZER_FILES = ("optimizer.safetensors", "optimizer.json")


def _swap_into_place(tmp: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_optimizer(optimizer: torch.optim.Optimizer | dict, out: Path) -> None:
    """`optimizer`: an optimizer, or its full state dict (an FSDP2 trainer's, gathered: models/fsdp.py)."""
    state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in state["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{name}"] = value
    save_file(tensors, str(out / "optimizer.safetensors"))
    (out / "optimizer.json").write_text(json.dumps({"param_groups": state["param_groups"], "scalars": scalars}))


def read_optimizer_state(src: Path) -> dict:
    """The optimizer state dict saved in checkpoint folder `src` (torch's index-keyed layout)."""
    meta = json.loads((src / "optimizer.json").read_text())
    state: dict[int, dict] = {}
    for key, value in {**load_file(str(src / "optimizer.safetensors")), **meta["scalars"]}.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def load_optimizer(optimizer: torch.optim.Optimizer, src: Path) -> None:
    optimizer.load_state_dict(read_optimizer_state(src))


def save_checkpoint(model, tokenizer, out: str | Path, optimizer: torch.optim.Optimizer | dict | None = None, *,
                    adapter_base: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """save_pretrained (safetensors) + optional optimizer state, atomically replacing `out`. A LoRA
    policy (`adapter_base`: its base folder) saves its adapters only, pointing at the base. A sharded
    (FSDP2) model saves `state_dict`, its gathered full weights; `optimizer` is then its gathered state."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    if adapter_base is not None:
        point_at_base(model, adapter_base, tmp)
        # The embeddings are never adapted; without this peft looks for the base's config relative to the cwd.
        model.save_pretrained(tmp, save_embedding_layers=False)
    else:
        model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    if optimizer is not None:
        save_optimizer(optimizer, tmp)
    crash_point("checkpoint_write")
    _swap_into_place(tmp, out)
    return out


def copy_checkpoint(src: str | Path, out: str | Path, *, with_optimizer: bool = True) -> Path:
    """A copy of checkpoint `src` at `out` (without the optimizer state unless `with_optimizer`). `src` is a
    folder or a hub id, taken from the local Hugging Face cache (downloaded unless HF_HUB_OFFLINE=1)."""
    if not Path(src).is_dir():
        from huggingface_hub import snapshot_download

        src = snapshot_download(str(src), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    skip = () if with_optimizer else OPTIMIZER_FILES
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(*skip))
    _swap_into_place(tmp, out)
    return out


def folder_bytes(path: str | Path) -> int:
    """Bytes on disk of a checkpoint folder (what a run pays per kept checkpoint)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
