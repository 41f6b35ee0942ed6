"""Llama-family decoder layer, with transformers' parameter names so checkpoints load strict.

Attention runs over a ragged batch: the tokens of many sequences are concatenated along one
axis for the projections and the MLP, and attention is computed per sequence against that
sequence's own KV cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import KVCache
from .model_spec import ModelSpec
from .rope import apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x * rsqrt(mean(x^2) + eps) in float32, cast back, times the weight (as transformers computes it;
        torch's fused rms_norm makes it one op instead of five)."""
        dtype = x.dtype
        normed = F.rms_norm(x if dtype == torch.float32 else x.to(torch.float32), (x.shape[-1],), eps=self.eps)
        return self.weight * (normed if dtype == torch.float32 else normed.to(dtype))


@dataclass(slots=True)
class SequenceSpan:
    """One sequence's share of a ragged batch: its cache and the absolute positions of its new tokens."""
    cache: KVCache  # this sequence's cache for the part being run
    start: int  # absolute position of the first new token
    count: int  # number of new tokens


@dataclass(slots=True)
class RaggedBatch:
    """The spans of a forward, their offsets in the flattened token axis, and their attention masks."""
    spans: list[SequenceSpan]
    offsets: list[int] = field(default_factory=list)  # token offset of each span in the flattened axis
    _masks: dict = field(default_factory=dict)

    def __post_init__(self):
        total = 0
        self.offsets = []
        for span in self.spans:
            self.offsets.append(total)
            total += span.count

    @property
    def num_tokens(self) -> int:
        return sum(s.count for s in self.spans)

    def positions(self) -> torch.Tensor:
        return torch.cat([torch.arange(s.start, s.start + s.count) for s in self.spans])

    def mask(self, index: int, window: int | None, device: torch.device) -> torch.Tensor | None:
        """Boolean [count, start+count] mask (True = attend) or None when every key is visible."""
        span = self.spans[index]
        end = span.start + span.count
        if span.count == 1 and (window is None or end <= window):
            return None
        key = (index, window)
        if key not in self._masks:
            q_pos = torch.arange(span.start, end, device=device)[:, None]
            k_pos = torch.arange(end, device=device)[None, :]
            allowed = k_pos <= q_pos
            if window is not None:
                allowed &= k_pos > q_pos - window
            self._masks[key] = allowed
        return self._masks[key]


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, window: int | None):
        super().__init__()
        self.spec = spec
        self.window = window
        self.q_proj = nn.Linear(spec.hidden_size, spec.q_width, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(spec.hidden_size, spec.kv_width, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(spec.hidden_size, spec.kv_width, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(spec.q_width, spec.hidden_size, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: RaggedBatch, slot: int) -> torch.Tensor:
        spec = self.spec
        total = x.shape[0]
        q = self.q_proj(x).view(total, spec.num_heads, spec.head_dim)
        k = self.k_proj(x).view(total, spec.num_kv_heads, spec.head_dim)
        v = self.v_proj(x).view(total, spec.num_kv_heads, spec.head_dim)
        if spec.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(0, 1), cos, sin)  # [heads, T, d]
        k = apply_rotary(k.transpose(0, 1), cos, sin)
        v = v.transpose(0, 1)
        outputs = []
        for i, (span, offset) in enumerate(zip(batch.spans, batch.offsets)):
            sl = slice(offset, offset + span.count)
            keys, values = span.cache.write(slot, span.start, k[:, sl], v[:, sl])
            # a leading batch axis: 4-D inputs reach torch's fused CPU kernels (3-D ones fall back to the math path,
            # 2.5-10x slower: scripts/bench_attention.py); a span from position 0 is plain causal: no mask needed
            causal = span.start == 0 and span.count > 1 and (self.window is None or span.count <= self.window)
            out = F.scaled_dot_product_attention(
                q[None, :, sl], keys[None], values[None], is_causal=causal,
                attn_mask=None if causal else batch.mask(i, self.window, x.device),
                scale=spec.head_dim ** -0.5, enable_gqa=spec.num_kv_heads != spec.num_heads)
            outputs.append(out[0])
        attn = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
        return self.o_proj(attn.transpose(0, 1).reshape(total, spec.q_width))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer_index: int):
        super().__init__()
        self.self_attn = Attention(spec, spec.sliding_windows[layer_index])
        self.mlp = MLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, x, cos, sin, batch: RaggedBatch, slot: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, slot)
        return x + self.mlp(self.post_attention_layernorm(x))
