"""Roofline latency of transformer forwards on hardware this machine does not have, for the simulator.

One forward of a model part costs overhead + max(compute time, memory time): FLOPs over the
accelerator's dense FP16 tensor rate, bytes (weights read once, KV cache read and written,
activations) over its DRAM bandwidth, each scaled by an efficiency. These are spec-sheet figures
with assumed efficiencies and overheads, NOT measurements; replace them with a real device's
timings when one is at hand (a device's start-up profile, hat.device.device_profile, fits them).

Figures (peak dense FP16 tensor FLOP/s, DRAM bandwidth, capacity):
- RTX A6000: 154.8 TFLOP/s (NVIDIA Ampere GA102 whitepaper: 84 SMs x 1024 FP16 FLOP/clk x 1.8 GHz;
  309.7 is the 2:4-sparsity figure), 768 GB/s, 48 GB (RTX A6000 datasheet).
- A100 40GB: 312 TFLOP/s (624 sparse), 1555 GB/s, 40 GB (NVIDIA A100 datasheet, GA100 whitepaper).
- Jetson AGX Orin 64GB: 42.5 TFLOP/s, derived from the datasheet's GPU figure of 170 sparse INT8 TOPS
  (halved for dense, halved again for FP16; = 16 SMs x 2048 FLOP/clk x 1.3 GHz), 204.8 GB/s, 64 GB
  (Jetson AGX Orin series datasheet / technical brief).
- Jetson AGX Xavier 32GB: 11 TFLOP/s FP16 for its Volta GPU (64 tensor cores x 128 FLOP/clk x
  1.377 GHz; NVIDIA's Xavier announcement: 11 TFLOPS FP16, 22 TOPS INT8), 136.5 GB/s, 32 GB
  (Jetson AGX Xavier datasheet).
Assumed, not sourced: efficiencies (GPUs 0.65-0.7 of peak FLOP/s, 0.8 of bandwidth; Jetsons less, as
their eager PyTorch kernels reach a smaller share of peak), fixed per-forward and per-layer overheads (eager PyTorch launches: ~0.1 ms a
layer on a server GPU, 0.3-0.4 ms on a Jetson's slower CPU), and the
tensor-parallel all-reduce model (PCIe 4.0 x16 at ~25 GB/s effective plus a fixed latency per layer).
Biases (absent in Llama) and rotary embeddings are ignored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hat.common.cost_fit import PROFILE_SHAPES, CostFit, LinearCost, attended

ALLREDUCE_BYTES_PER_S = 25e9  # effective all-reduce rate between tensor-parallel GPUs: PCIe 4.0 x16, assumed
ALLREDUCE_LATENCY_S = 30e-6  # fixed cost of a layer's two all-reduces (launch and synchronisation), assumed


@dataclass(frozen=True, slots=True)
class Accelerator:
    name: str  # key in ACCELERATORS
    peak_flops: float  # dense FP16 tensor FLOP/s
    memory_bytes_per_s: float  # DRAM bandwidth
    memory_bytes: float  # DRAM capacity
    compute_efficiency: float  # fraction of peak_flops a large GEMM reaches (assumed)
    memory_efficiency: float  # fraction of bandwidth a streaming read reaches (assumed)
    overhead_s: float  # fixed cost per forward (framework, synchronisation), seconds (assumed)
    per_layer_s: float  # kernel launches per decoder layer (and for the head) in eager PyTorch, seconds (assumed)
    source: str  # where the figures come from (spec sheet names), one line


ACCELERATORS: dict[str, Accelerator] = {a.name: a for a in (
    Accelerator("a6000", 154.8e12, 768e9, 48e9, 0.65, 0.8, 0.3e-3, 0.1e-3,
                "NVIDIA RTX A6000 datasheet + Ampere GA102 whitepaper (dense FP16 tensor, FP32 accumulate)"),
    Accelerator("a100-40g", 312e12, 1555e9, 40e9, 0.7, 0.8, 0.3e-3, 0.1e-3,
                "NVIDIA A100 Tensor Core GPU datasheet (40GB) + GA100 whitepaper (dense FP16 tensor)"),
    Accelerator("jetson-agx-orin", 42.5e12, 204.8e9, 64e9, 0.45, 0.75, 0.5e-3, 0.3e-3,
                "NVIDIA Jetson AGX Orin series datasheet/technical brief (64GB: 170 sparse INT8 TOPS GPU -> dense FP16)"),
    Accelerator("jetson-agx-xavier", 11e12, 136.5e9, 32e9, 0.35, 0.7, 0.7e-3, 0.4e-3,
                "NVIDIA Jetson AGX Xavier datasheet (32GB) + Xavier launch figures (Volta GPU 11 TFLOPS FP16)"),
)}


def describe(accelerator: Accelerator) -> str:
    """One line for a report."""
    a = accelerator
    return (f"{a.name}: {a.peak_flops / 1e12:.1f} TFLOP/s FP16 x{a.compute_efficiency:g}, "
            f"{a.memory_bytes_per_s / 1e9:.1f} GB/s x{a.memory_efficiency:g}, spec sheet figures")


_DTYPE_BYTES = {"float32": 4.0, "float": 4.0, "bfloat16": 2.0, "float16": 2.0, "half": 2.0}


@dataclass(frozen=True, slots=True)
class ModelShape:
    name: str  # preset name or the checkpoint folder's name
    hidden: int  # hidden width
    layers: int  # decoder layers of the whole model
    intermediate: int  # gated MLP width
    heads: int  # attention (query) heads
    kv_heads: int  # key/value heads (grouped-query attention)
    vocab: int  # vocabulary size (embedding and lm_head rows)
    bytes_per_param: float = 2.0  # weight (and activation) bytes: fp16
    kv_bytes_per_value: float = 2.0  # KV cache bytes per stored value
    head_dim: int = 0  # width of one head; 0 means hidden // heads

    def __post_init__(self):
        if min(self.hidden, self.layers, self.intermediate, self.heads, self.kv_heads, self.vocab) < 1:
            raise ValueError(f"{self.name}: every size must be positive")
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.name}: {self.heads} heads do not split into {self.kv_heads} KV groups")
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    def layer_params(self) -> int:
        """One decoder layer: q, o (heads) and k, v (kv_heads) projections, gated MLP, two RMSNorms."""
        attention = 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def head_params(self) -> int:
        """The lm_head (the final norm's `hidden` weights are counted apart)."""
        return self.vocab * self.hidden

    def total_params(self) -> int:
        return self.layers * self.layer_params() + self.embedding_params() + self.head_params() + self.hidden

    def kv_bytes_per_position(self) -> float:
        """KV cache bytes one position takes in one layer."""
        return 2 * self.kv_heads * self.head_dim * self.kv_bytes_per_value

    @classmethod
    def from_config(cls, path) -> "ModelShape":
        """A Hugging Face config.json (LlamaConfig keys), or the folder holding one."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        data = json.loads(file.read_text())
        dtype = str(data.get("torch_dtype") or data.get("dtype") or "float16").removeprefix("torch.")
        if dtype not in _DTYPE_BYTES:
            raise ValueError(f"{file}: unsupported dtype {dtype!r} (one of {', '.join(_DTYPE_BYTES)})")
        try:
            heads = data["num_attention_heads"]
            return cls(file.parent.name, data["hidden_size"], data["num_hidden_layers"], data["intermediate_size"],
                       heads, data.get("num_key_value_heads") or heads, data["vocab_size"],
                       _DTYPE_BYTES[dtype], _DTYPE_BYTES[dtype], data.get("head_dim") or 0)
        except KeyError as exc:
            raise ValueError(f"{file} is not a Llama-style config: no {exc.args[0]}") from None


_7B = dict(hidden=4096, layers=32, intermediate=11008, heads=32, kv_heads=32, vocab=32000)
_13B = dict(hidden=5120, layers=40, intermediate=13824, heads=40, kv_heads=40, vocab=32000)
MODEL_SHAPES: dict[str, ModelShape] = {name: ModelShape(name, **dims) for name, dims in (
    ("llama-7b", _7B), ("vicuna-7b", _7B), ("llama-13b", _13B), ("vicuna-13b", _13B))}


def model_shape(name_or_path: str) -> ModelShape:
    """A preset by name, or the shape of a checkpoint folder or config.json."""
    if name_or_path in MODEL_SHAPES:
        return MODEL_SHAPES[name_or_path]
    path = Path(name_or_path)
    if path.is_file() or (path / "config.json").is_file():
        return ModelShape.from_config(path)
    raise ValueError(f"unknown model {name_or_path!r}: not a preset ({', '.join(MODEL_SHAPES)}) "
                     "nor a folder or config.json")


class RooflineCost:
    """Latency of one forward of a model part: max(compute time, memory time) + overhead."""

    def __init__(self, shape: ModelShape, accelerator: Accelerator, layers: int, embedding: bool = False,
                 head: bool = False, extra_params: int = 0, parallel: int = 1):
        if layers < 0 or extra_params < 0 or parallel < 1:
            raise ValueError("layers and extra_params must be >= 0 and parallel >= 1")
        self.shape, self.accelerator = shape, accelerator
        self.layers, self.embedding, self.head = layers, embedding, head
        self.extra_params, self.parallel = extra_params, parallel

    def params(self) -> int:
        """Weights read and multiplied per token (the embedding table is only looked up, not counted)."""
        s = self.shape
        return self.layers * s.layer_params() + (s.head_params() + s.hidden if self.head else 0) + self.extra_params

    def weight_bytes(self) -> float:
        return self.params() * self.shape.bytes_per_param

    def kv_bytes_per_position(self) -> float:
        return self.layers * self.shape.kv_bytes_per_position()

    def flops(self, spans: list[tuple[int, int]]) -> float:
        """2 per weight per token, plus QK^T and PV: 4 * head_dim * heads per attended pair per layer."""
        s = self.shape
        pairs = sum(attended(n, start) for n, start in spans)
        tokens = sum(n for n, _ in spans)
        return 2 * self.params() * tokens + self.layers * 4 * s.head_dim * s.heads * pairs

    def bytes_moved(self, spans: list[tuple[int, int]]) -> float:
        """Weights once, each sequence's KV read (s + n positions) and written (n), activations."""
        s, tokens = self.shape, sum(n for n, _ in spans)
        kv = self.kv_bytes_per_position() * sum((start + n) + n for n, start in spans)
        # activations, rough: each layer writes and reads back two residual updates and its MLP intermediate
        values = self.layers * 2 * (2 * s.hidden + s.intermediate) * tokens
        values += (s.hidden if self.embedding else 0) * tokens + (s.vocab if self.head else 0) * tokens
        return self.weight_bytes() + kv + values * s.bytes_per_param

    def allreduce_s(self, tokens: int) -> float:
        """Tensor parallelism's all-reduces (rough): per layer 2 * tokens * hidden values over the
        interconnect plus a fixed latency; zero on one GPU."""
        if self.parallel == 1:
            return 0.0
        per_layer = 2 * tokens * self.shape.hidden * self.shape.bytes_per_param / ALLREDUCE_BYTES_PER_S
        return self.layers * (per_layer + ALLREDUCE_LATENCY_S)

    def fixed_s(self) -> float:
        """The per-forward overhead: framework, plus kernel launches per layer (the head counts as one)."""
        a = self.accelerator
        return a.overhead_s + a.per_layer_s * (self.layers + (1 if self.head else 0))

    def compute_s(self, spans: list[tuple[int, int]]) -> float:
        a = self.accelerator
        return self.flops(spans) / (a.peak_flops * a.compute_efficiency * self.parallel)

    def memory_s(self, spans: list[tuple[int, int]]) -> float:
        a = self.accelerator
        return self.bytes_moved(spans) / (a.memory_bytes_per_s * a.memory_efficiency * self.parallel)

    def spans(self, spans: list[tuple[int, int]]) -> float:
        """One batched forward over sequences given as (new tokens, cached positions before them);
        0.0 when there is no token to run."""
        spans = [(int(n), int(start)) for n, start in spans]
        if any(n < 0 or start < 0 for n, start in spans):
            raise ValueError(f"spans need non-negative tokens and starts, got {spans}")
        spans = [(n, start) for n, start in spans if n]
        if not spans:
            return 0.0
        tokens = sum(n for n, _ in spans)
        return (self.fixed_s() + max(self.compute_s(spans), self.memory_s(spans))
                + self.allreduce_s(tokens))

    def predict(self, tokens: int, start: int = 0) -> float:
        return self.spans([(tokens, start)])


def fit_linear(cost: RooflineCost, shapes=PROFILE_SHAPES) -> LinearCost:
    """The LinearCost a device's start-up profile would fit from these roofline timings."""
    fit = CostFit(window=max(3, len(shapes)), follow_changes=False)
    for tokens, start in shapes:
        fit.add(tokens, attended(tokens, start), cost.predict(tokens, start))
    return fit.cost
