"""A KV cache that does not copy itself every decoding step.

transformers' `DynamicLayer` appends each step's keys and values with `torch.cat`, which copies the whole
cache: at 16 rows x 30 layers x 190 positions that was ~15% of a SmolLM2 decoding step on this CPU.
`PreallocatedLayer` allocates its buffer once, at the first update (prompt + every new token), writes each
step's positions in place and hands attention views of the filled part, so attention still runs over the
filled positions only (a StaticCache would attend over the whole buffer every step).

    cache = preallocated_cache(model.config, capacity=prompt_width + max_new_tokens)
    model.generate(..., past_key_values=cache)
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        if self.key_buffer is None:
            self.device = key_states.device
            b, h, _, d = key_states.shape
            size = max(self.capacity, n)
            self.key_buffer = key_states.new_empty((b, h, size, d))
            self.value_buffer = value_states.new_empty((b, h, size, value_states.shape[-1]))
            self.is_initialized = True
        if self.length + n > self.key_buffer.shape[-2]:  # more than promised: grow (once, by a copy)
            self._resize(self.length + n)
        self.key_buffer[:, :, self.length:self.length + n] = key_states
        self.value_buffer[:, :, self.length:self.length + n] = value_states
        self.length += n
        self._views()
        return self.keys, self.values

    def _views(self) -> None:
        self.keys = self.key_buffer[:, :, :self.length]
        self.values = self.value_buffer[:, :, :self.length]

    def _resize(self, size: int) -> None:
        def grown(buf):
            out = buf.new_empty((*buf.shape[:2], size, buf.shape[-1]))
            out[:, :, :self.length] = buf[:, :, :self.length]
            return out
        self.key_buffer, self.value_buffer = grown(self.key_buffer), grown(self.value_buffer)

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length = 0
        self.key_buffer = self.value_buffer = None
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0 and self.key_buffer is not None:
            self.length = max(0, self.length + tokens_to_remove)
            self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.key_buffer is not None:
            self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
            self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
            self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.key_buffer is not None:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self._views()


class PreallocatedCache(DynamicCache):
    """A DynamicCache (what generate and the models expect) of `PreallocatedLayer`s."""

    def __init__(self, num_layers: int, capacity: int):
        Cache.__init__(self, layers=[PreallocatedLayer(capacity) for _ in range(num_layers)])


def preallocated_cache(config, capacity: int) -> DynamicCache | None:
    """A `PreallocatedCache` for a model of `config` holding `capacity` positions; None for a model whose
    layers are not all full attention (sliding windows, linear attention: transformers' own cache then)."""
    text = config.get_text_config(decoder=True)
    types = getattr(text, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return None
    return PreallocatedCache(text.num_hidden_layers, capacity)
