"""The device's parts as export-friendly modules: dense [batch, sequence, width] tensors and explicit KV caches.

The runtime's own parts (hat.common.model_part) run ragged batches against KVCache objects, which no exporter can
trace. These wrappers reuse the same weights and compute the same functions over plain tensors:

    past_key_i, past_value_i: [batch, kv_heads, past, head_dim]           layer i's cache before this call
    new_keys, new_values:     [layers, batch, kv_heads, sequence, head_dim]  this call's positions only

Positions run from `past` (the cache length) to past + sequence - 1 for every row of the batch, so the rows of a
batch share their past and sequence lengths. The caller keeps the cache and appends the new positions (returning
only those saves copying the whole cache out of every call). Rotary tables, causal and sliding-window masks are
computed inside the graph from those lengths, so any past length up to the context works.

The past is one input per layer (a stacked [layers, ...] input cost onnxruntime a Split copying the whole past on
every call), and attention never concatenates past and new keys: the scores of the past and of the new positions
are computed apart and joined (a query row is far smaller than the keys), and the output is the sum of the two
halves' weighted values, so the past is read where it lies.
"""
from __future__ import annotations

import torch
from torch import nn

from hat.common.adapter import DraftAdapter
from hat.common.layers import DecoderLayer
from hat.common.model_part import ModelPart
from hat.common.rope import RotaryTable


def rotary(table: RotaryTable, past: torch.Tensor | int, count: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [count, head_dim] for positions past..past+count-1, by the formula RotaryTable tabulates."""
    positions = torch.arange(count, dtype=torch.float32) + past
    freqs = positions[:, None] * table.inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    scale = table.attention_scaling
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def additive_mask(past: torch.Tensor | int, count: int, window: int | None) -> torch.Tensor:
    """[count, past + count] float32: 0 where a query may attend a key, the float32 minimum elsewhere."""
    q_pos = torch.arange(count)[:, None] + past
    k_pos = torch.arange(count + past)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class DenseLayers(nn.Module):
    """A part's decoder layers over [batch, sequence, width] with a stacked past cache."""

    def __init__(self, part: ModelPart):
        super().__init__()
        self.spec = part.spec
        self.layers = nn.ModuleList(part.model.layers.values())
        self.rotary = part.rotary
        self.windows = [layer.self_attn.window for layer in self.layers]

    def forward(self, hidden: torch.Tensor, past: tuple[torch.Tensor, ...]):
        """`past`: (key_0, value_0, key_1, value_1, ...), each [batch, kv_heads, past, head_dim]."""
        count, past_length = hidden.shape[1], past[0].shape[2]
        cos, sin = rotary(self.rotary, past_length, count, hidden.dtype)
        masks = {w: additive_mask(past_length, count, w) for w in set(self.windows)}
        new_keys, new_values = [], []
        for slot, layer in enumerate(self.layers):
            attn_out, key, value = self._attention(layer, layer.input_layernorm(hidden), cos, sin,
                                                   past[2 * slot], past[2 * slot + 1], masks[self.windows[slot]])
            hidden = hidden + attn_out
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            new_keys.append(key)
            new_values.append(value)
        return hidden, torch.stack(new_keys), torch.stack(new_values)

    def _attention(self, layer: DecoderLayer, x, cos, sin, past_key, past_value, mask):
        spec, attn = self.spec, layer.self_attn
        batch, count = x.shape[0], x.shape[1]
        q = attn.q_proj(x).view(batch, count, spec.num_heads, spec.head_dim)
        k = attn.k_proj(x).view(batch, count, spec.num_kv_heads, spec.head_dim)
        v = attn.v_proj(x).view(batch, count, spec.num_kv_heads, spec.head_dim)
        if spec.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = rotate(q.transpose(1, 2), cos, sin)  # [batch, heads, count, head_dim]
        k = rotate(k.transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        # grouped-query attention without repeating keys: query head h reads kv head h // group
        group = spec.num_heads // spec.num_kv_heads
        q = q.reshape(batch, spec.num_kv_heads, group, count, spec.head_dim)
        # past and new positions apart (no [past + count] copy of the keys and values): scores joined, values summed
        scores = torch.cat((torch.matmul(q, past_key[:, :, None].transpose(-1, -2)),
                            torch.matmul(q, k[:, :, None].transpose(-1, -2))), dim=-1)
        probs = torch.softmax(scores.float() * spec.head_dim ** -0.5 + mask, dim=-1).to(x.dtype)
        past_probs, new_probs = torch.split(probs, [past_key.shape[2], count], dim=-1)
        out = torch.matmul(past_probs, past_value[:, :, None]) + torch.matmul(new_probs, v[:, :, None])
        out = out.reshape(batch, spec.num_heads, count, spec.head_dim)
        out = out.transpose(1, 2).reshape(batch, count, spec.q_width)
        return attn.o_proj(out), k, v


class InputPartGraph(nn.Module):
    """input_ids [batch, sequence] -> hidden, the tokens' embeddings (the adapter's second input), new keys/values."""

    def __init__(self, part: ModelPart):
        super().__init__()
        self.embed_tokens = part.model.embed_tokens
        self.layers = DenseLayers(part)

    def forward(self, input_ids, *past):
        embeds = self.embed_tokens(input_ids)
        hidden, new_keys, new_values = self.layers(embeds, past)
        return hidden, embeds, new_keys, new_values


class AdapterGraph(nn.Module):
    """hidden, embeds [batch, sequence, width] -> the adapter's estimate of the middle part's output, new keys/values
    (an input-only adapter; adapter_graph picks the graph of an adapter)."""

    def __init__(self, adapter: DraftAdapter):
        super().__init__()
        self.adapter = adapter
        self.layers = DenseLayers(adapter.body)

    def forward(self, hidden, embeds, *past):
        return self.estimate(hidden, embeds, past)

    def estimate(self, hidden, embeds, past):
        a = self.adapter
        body, new_keys, new_values = self.layers(a.fuse_input(hidden, embeds), past)
        return hidden + a.project(body), new_keys, new_values


class ConditionedAdapterGraph(AdapterGraph):
    """A verified-conditioned adapter's graph: a third input `previous` [batch, sequence, width], the middle output of
    each token's predecessor, before the past (DraftAdapter.forward's `previous`)."""

    def forward(self, hidden, embeds, previous, *past):
        return self.estimate(self.adapter.condition_input(hidden, previous), embeds, past)


def adapter_graph(adapter: DraftAdapter) -> AdapterGraph:
    """The export wrapper of `adapter`: with the `previous` input when it is conditioned."""
    return ConditionedAdapterGraph(adapter) if adapter.conditioned else AdapterGraph(adapter)


class OutputLayersGraph(nn.Module):
    """hidden [batch, sequence, width] from the cloud (or the adapter) -> the output part's last layer's output."""

    def __init__(self, part: ModelPart):
        super().__init__()
        self.layers = DenseLayers(part)

    def forward(self, hidden, *past):
        return self.layers(hidden, past)


class HeadGraph(nn.Module):
    """hidden [batch, sequence, width] -> float32 logits: final norm and LM head (kept apart from the output layers,
    which run over every position of a chunk while logits are wanted for its last one only)."""

    def __init__(self, part: ModelPart):
        super().__init__()
        self.norm, self.lm_head = part.model.norm, part.lm_head

    def forward(self, hidden):
        return self.lm_head(self.norm(hidden)).float()
