"""LoRA policies through `peft`: only the adapters train, the base stays frozen and doubles as the reference.

    policy    = base + (alpha / r) * B @ A on the target linear layers   (B starts at 0: policy == base)
    reference = the same module with its adapters disabled               (no second copy of the base)

The paper refreshes pi_ref to pi_theta at each iteration; with LoRA that is a merge: at an iteration's
end the adapters are folded into the base weights (`merged`), that full model is the iteration's export
and the next iteration's base, and a fresh adapter starts on it.

An adapter checkpoint is peft's folder (`adapter_config.json`, `adapter_model.safetensors`) whose
`base_model_name_or_path` is the base folder *relative to the adapter folder*, so a run folder that is
moved or copied still loads (`base_of`).
"""
from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_checkpoint(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def base_of(adapter_dir: str | Path) -> str:
    """The base model folder an adapter checkpoint was trained on."""
    base = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    return base if os.path.isabs(base) else os.path.normpath(Path(adapter_dir) / base)


def add_adapters(model, lora_cfg, seed: int):
    """`model` wrapped with fresh LoRA adapters (`lora_cfg`: a `configs.schema.LoraConfig`); the base's
    own weights are frozen. Seeded: A's random init is the same for the same seed."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=lora_cfg.target_modules, task_type="CAUSAL_LM")
    with torch.random.fork_rng(), _peft_reads_deprecated_property():
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def load_adapters(base_model, adapter_dir: str | Path):
    """A trainable LoRA policy: `base_model` (already loaded from `base_of(adapter_dir)`) + saved adapters."""
    from peft import PeftModel

    with _peft_reads_deprecated_property():
        return PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=True)


@contextmanager
def _peft_reads_deprecated_property():
    """peft 0.21 reads `model.is_gradient_checkpointing`, which transformers 5.2x deprecates with a FutureWarning
    on every wrap, whatever the caller passes: silenced there alone (nothing of ours reads it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def point_at_base(peft_model, base_dir: str | Path, adapter_dir: str | Path) -> None:
    """Record `base_dir` relative to where the adapters are about to be saved (see the module doc)."""
    rel = os.path.relpath(Path(base_dir).resolve(), Path(adapter_dir).resolve())
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = rel


def merged(peft_model):
    """The plain model with the adapters folded into its weights (in place: `peft_model` is spent)."""
    return peft_model.merge_and_unload()


class AdaptersOff(torch.nn.Module):
    """The reference of a LoRA policy: the policy's forward with its adapters disabled. Holds no weights of
    its own (the policy is kept outside the module tree, so nothing counts or saves the base twice)."""

    def __init__(self, peft_model):
        super().__init__()
        self._policy = (peft_model,)

    def parameters(self, recurse: bool = True):
        return self._policy[0].parameters(recurse)

    def forward(self, **kwargs):
        policy = self._policy[0]
        with policy.disable_adapter():
            return policy(**kwargs)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """What the optimizer updates: every parameter that takes a gradient (the adapters under LoRA)."""
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The merged weights under the base model's own names, without touching `peft_model` (merging in
    place and unmerging again would leave rounding in the base, which is the reference): what a sampler
    engine that knows nothing of adapters (vLLM) is sent after each update."""
    from peft.tuners.lora import LoraLayer

    model = peft_model.get_base_model()
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for pname, value in module.base_layer.named_parameters(recurse=False):
                full = f"{name}.{pname}"
                state[full] = value + module.get_delta_weight("default") if pname == "weight" else value
    for name, value in model.state_dict().items():
        if "lora_" not in name and ".base_layer." not in name:
            state.setdefault(name, value)
    return state
