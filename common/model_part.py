"""A contiguous slice of a Llama-family model, the unit the split hands to device and cloud."""
from __future__ import annotations

import torch
from torch import nn

from .kv_cache import KVCache
from .layers import DecoderLayer, RaggedBatch, RMSNorm, SequenceSpan
from .model_spec import ModelSpec
from .rope import RotaryTable

EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


def layer_index(name: str) -> int | None:
    """The decoder layer a parameter name belongs to, or None for embedding, norm and head."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2])
    return None


def _weight_dtype(tensors, default: torch.dtype) -> torch.dtype:
    """The checkpoint's dominant floating dtype (some store norms in float32 beside bfloat16 weights)."""
    counts: dict[torch.dtype, int] = {}
    for t in tensors:
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else default


class ModelPart(nn.Module):
    """Optional embedding, decoder layers [first, last), optional final norm + LM head.

    Parameter names are transformers' (`model.layers.5.self_attn.q_proj.weight` keeps its global
    layer number), so a part loads strict from a subset of the checkpoint's tensors.
    """

    def __init__(self, spec: ModelSpec, first: int, last: int, embedding: bool = False, head: bool = False):
        super().__init__()
        if not 0 <= first <= last <= spec.num_layers:
            raise ValueError(f"layer range [{first}, {last}) is outside the model's {spec.num_layers} layers")
        self.spec, self.first, self.last = spec, first, last
        self.has_embedding, self.has_head = embedding, head
        self.model = nn.Module()
        if embedding:
            self.model.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.model.layers = nn.ModuleDict({str(i): DecoderLayer(spec, i) for i in range(first, last)})
        if head:
            self.model.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.rotary = RotaryTable(spec)
        self.dtype = torch.get_default_dtype()  # of the weights, and of this part's caches and hidden states
        self.device = torch.device("cpu")  # where the weights live

    @classmethod
    def from_tensors(cls, spec: ModelSpec, first: int, last: int, tensors: dict[str, torch.Tensor],
                     embedding: bool = False, head: bool = False, device: str | torch.device = "cpu") -> "ModelPart":
        """Build without random init and load `tensors` strict (extra tensors for other parts are ignored)."""
        with torch.device("meta"):
            part = cls(spec, first, last, embedding, head)
        own = set(part.state_dict().keys())
        state = {name: tensor for name, tensor in tensors.items() if name in own}
        if head and LM_HEAD not in tensors and spec.tie_word_embeddings and EMBED in tensors:
            state[LM_HEAD] = tensors[EMBED]
        missing = own - set(state)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors for layers [{first}, {last}), "
                             f"e.g. {sorted(missing)[:3]}")
        unused = [name for name in tensors if part.owns(name) and name not in own]
        if unused:  # a tensor of ours this runtime has no place for: loading on would compute wrong logits
            raise ValueError(f"checkpoint has {len(unused)} tensors this runtime does not use for "
                             f"{spec.model_type}, e.g. {sorted(unused)[:3]}: unsupported architecture variant")
        dtype = _weight_dtype(tensors.values(), part.dtype)
        part.load_state_dict({name: t.to(dtype) for name, t in state.items()}, strict=True, assign=True)
        part = part.to(device).eval()
        part.dtype, part.device = dtype, torch.device(device)
        return part

    def owns(self, name: str) -> bool:
        """Whether a checkpoint tensor name falls in this part (its layers, embedding, norm or head)."""
        layer = layer_index(name)
        if layer is not None:
            return self.first <= layer < self.last
        if name.startswith("model.embed_tokens."):
            return self.has_embedding
        return self.has_head and (name.startswith("model.norm.") or name.startswith("lm_head."))

    @property
    def num_layers(self) -> int:
        return self.last - self.first

    def new_cache(self, max_length: int | None = None, preallocate: bool = False) -> KVCache:
        """A cache for up to `max_length` positions (default: the context); `preallocate`: all of it now."""
        spec = self.spec
        max_length = spec.max_context if max_length is None else max_length
        return KVCache(self.num_layers, spec.num_kv_heads, spec.head_dim, self.dtype, max_length, device=self.device,
                       initial_capacity=max_length if preallocate else 64)

    @property
    def kv_bytes_per_position(self) -> int:
        spec = self.spec
        return self.num_layers * spec.num_kv_heads * spec.head_dim * 2 * self.dtype.itemsize

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(token_ids.to(self.device))

    def forward_tokens(self, token_ids: torch.Tensor, spans: list[SequenceSpan]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding, then the layers: token_ids [total tokens] for `spans` in order -> (hidden, embeddings)."""
        embeds = self.embed(token_ids)
        return self.forward_layers(embeds, spans), embeds

    def forward_layers(self, hidden: torch.Tensor, spans: list[SequenceSpan]) -> torch.Tensor:
        """hidden: [total tokens, hidden] for `spans` in order. Each span's cache is cut back to its
        start, extended by its tokens, and committed only when every layer has run (a part with no
        layers leaves its caches alone)."""
        batch = RaggedBatch(spans)
        if hidden.shape[0] != batch.num_tokens:
            raise ValueError(f"hidden has {hidden.shape[0]} tokens, spans say {batch.num_tokens}")
        hidden = hidden.to(device=self.device, dtype=self.dtype)
        if not self.num_layers:  # no layers, nothing cached: the hidden states pass through
            return hidden
        for span in spans:
            span.cache.begin_write(span.start, span.count)
        cos, sin = self.rotary.cos_sin(batch.positions(), self.dtype)
        cos, sin = cos.to(self.device), sin.to(self.device)
        for slot, layer in enumerate(self.model.layers.values()):
            hidden = layer(hidden, cos, sin, batch, slot)
        for span in spans:
            span.cache.commit(span.start + span.count)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head; float32 logits."""
        return self.lm_head(self.model.norm(hidden)).float()
