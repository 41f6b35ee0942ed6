"""Rotary position embedding tables for the rope types ModelSpec accepts."""
from __future__ import annotations

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .model_spec import ModelSpec, rope_parameters


class RotaryTable:
    """cos/sin for any absolute positions; frequencies computed once, in float32."""

    def __init__(self, spec: ModelSpec):
        with torch.device("cpu"):  # real tensors even when the part is being built on the meta device
            self._build(spec)
            self._extend(256)

    def _build(self, spec: ModelSpec) -> None:
        params = rope_parameters(spec.hf_config)
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            dim = spec.head_dim
            exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
            self.inv_freq = 1.0 / (params["rope_theta"] ** exponent)
            self.attention_scaling = 1.0
        else:  # transformers' own frequency formulas (linear, llama3, yarn): only the table, not its layers
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](spec.hf_config, torch.device("cpu"))
            self.inv_freq = inv_freq.float()
            self.attention_scaling = float(scaling)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] int64 -> (cos, sin), each [T, head_dim] in `dtype`, looked up in tables that grow
        (by doubling) to the largest position asked for: one gather per call instead of five ops."""
        needed = int(positions.max()) + 1
        if needed > self._cos.shape[0]:
            self._extend(max(needed, 2 * self._cos.shape[0]))
        cos, sin = self._cos[positions], self._sin[positions]
        return (cos, sin) if dtype == torch.float32 else (cos.to(dtype), sin.to(dtype))

    def _extend(self, length: int) -> None:
        freqs = torch.arange(length, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos, self._sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [heads, T, head_dim]; cos/sin: [T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
