"""The draft adapter: a light stand-in for the cloud's middle layers, run on the device to draft tokens.

EAGLE-style: at position t it fuses the input part's hidden state h_K(t) with the embedding of the
token at t (the token that was just appended, "the next token" of the sequence so far), runs
`depth` decoder layers of the model's own architecture over that (with its own KV cache), and
projects back to the model's width as a correction to h_K(t):

    estimate(t) = h_K(t) + project(layers(fuse([norm(h_K(t)); norm(embed(x_t))])))

`estimate(t)` stands for the middle part's output at t, which the device's output part turns into
draft logits. `project` starts at zero, so an untrained adapter passes h_K through.

Conditioning (AdapterConfig.conditioning). "input": the above, from the device's own input part alone.
"verified": EAGLE's conditioning on the target's features of the previous position; h_K(t) above (in the fused
input and the residual alike) is replaced by

    fc([h_K(t) ; norm(h_mid(t-1))])        fc starting as [identity | zeros]

where h_mid(t-1) is the middle part's output at t-1: the cloud's (verified) one where the device has it, the
adapter's own estimate(t-1) for a draft token after the first of a round, zeros before position 0. At the start
it is the input-only adapter.

On disk an adapter is a folder: adapter_config.json (AdapterConfig) and adapter.safetensors.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .kv_cache import KVCache
from .layers import RMSNorm, SequenceSpan
from .model_part import ModelPart
from .model_spec import ModelSpec

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_FORMAT_VERSION = 2  # the newest on-disk layout this version reads (and writes for a conditioned adapter)
CONDITIONINGS = ("input", "verified")  # AdapterConfig.conditioning's values


class AdapterMismatchError(ValueError):
    """An adapter trained for another checkpoint or another split."""


@dataclass(frozen=True, slots=True)
class AdapterConfig:
    input_layers: int  # K of the split it was distilled for: its input is the output of layers [0, K)
    output_layers: int  # M of that split: its output stands for the input of layers [N-M, N)
    width: int  # hidden width of the adapter's own decoder layers
    depth: int  # number of adapter decoder layers
    intermediate_size: int  # MLP width of those layers
    source_fingerprint: str  # sha256 of the checkpoint it was distilled from (hat.common.checkpoint.fingerprint)
    # drafting confidence = top probability of softmax(draft logits / this): fitted on held-out text so that it
    # estimates the chance that the target's greedy token equals the draft's (1.0 = the raw softmax)
    confidence_temperature: float = 1.0
    # what the adapter sees besides h_K(t) and the token: "input" nothing; "verified" the middle part's output of
    # the position before (the cloud's where verified, else its own estimate), EAGLE's conditioning
    conditioning: str = "input"
    # on-disk layout version: 1 has no `conditioning` key (an input-only adapter, as every adapter before it),
    # 2 has it; save() writes the lowest that holds the config, so input-only files stay readable by older versions
    format_version: int = 1

    def __post_init__(self):
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"adapter conditioning {self.conditioning!r}: choose one of {', '.join(CONDITIONINGS)}")

    @property
    def conditioned(self) -> bool:
        """Does the adapter take the previous position's middle output?"""
        return self.conditioning != "input"

    def save(self, folder: Path) -> None:
        data = asdict(self)
        if self.conditioned:
            data["format_version"] = 2
        else:
            del data["conditioning"]
            data["format_version"] = 1
        (Path(folder) / ADAPTER_CONFIG).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "AdapterConfig":
        path = Path(folder) / ADAPTER_CONFIG
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not an adapter: no {ADAPTER_CONFIG} (make one with `hat train-adapter`)")
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise ValueError(f"{path} is not a valid adapter config: {exc}") from None
        version = data.get("format_version") if isinstance(data, dict) else None
        if version not in (1, ADAPTER_FORMAT_VERSION):
            raise ValueError(f"{path}: adapter format {version}, this version reads 1 to {ADAPTER_FORMAT_VERSION}")
        if (version == 1) == ("conditioning" in data):  # version 1 never had the key, version 2 always has it
            raise ValueError(f"{path} is not a valid adapter config: format {version} "
                             f"{'has' if version == 1 else 'lacks'} the `conditioning` key")
        try:
            return cls(**data)
        except TypeError as exc:  # a key missing or unknown
            raise ValueError(f"{path} is not a valid adapter config: {exc}") from None

    def check_matches(self, fingerprint: str, input_layers: int, output_layers: int) -> None:
        if fingerprint != self.source_fingerprint:
            raise AdapterMismatchError(f"the adapter was distilled from checkpoint {self.source_fingerprint[:12]}, "
                                       f"not {fingerprint[:12]}: train one for this model with `hat train-adapter`")
        if (input_layers, output_layers) != (self.input_layers, self.output_layers):
            raise AdapterMismatchError(f"the adapter is for K={self.input_layers}, M={self.output_layers}; the split is "
                                       f"K={input_layers}, M={output_layers}")


def adapter_spec(spec: ModelSpec, config: AdapterConfig) -> ModelSpec:
    """The model's architecture at the adapter's width and depth: heads scaled with the width (at least one),
    the same head size and grouped-query ratio, the sliding window of the first middle layer."""
    if config.width < 1 or config.depth < 1 or config.intermediate_size < 1:
        raise ValueError(f"adapter width, depth and intermediate size must be positive, got {config.width}, "
                         f"{config.depth}, {config.intermediate_size}")
    heads = max(1, spec.num_heads * config.width // spec.hidden_size)
    kv_heads = max(1, heads * spec.num_kv_heads // spec.num_heads)
    if heads % kv_heads:
        kv_heads = heads
    window = spec.sliding_windows[config.input_layers]
    return replace(spec, hidden_size=config.width, intermediate_size=config.intermediate_size, num_layers=config.depth,
                   num_heads=heads, num_kv_heads=kv_heads, sliding_windows=(window,) * config.depth)


def check_previous(config: AdapterConfig, hidden: torch.Tensor, previous: torch.Tensor | None) -> None:
    """An adapter's `previous` argument (every backend's): given exactly when the adapter is conditioned, shaped as
    the hidden states."""
    if config.conditioned != (previous is not None):
        raise ValueError("a verified-conditioned adapter needs `previous`, the middle output of the position "
                         "before each token" if previous is None else
                         "an input-conditioned adapter takes no `previous` middle output")
    if previous is not None and previous.shape != hidden.shape:
        raise ValueError(f"`previous` has shape {tuple(previous.shape)}, the hidden states {tuple(hidden.shape)}")


class DraftAdapter(nn.Module):
    def __init__(self, spec: ModelSpec, config: AdapterConfig):
        super().__init__()
        self.config = config
        width, eps = spec.hidden_size, spec.rms_norm_eps
        if config.conditioned:  # fc([h_K(t) ; norm(h_mid(t-1))]), starting as [identity | zeros]
            self.previous_norm = RMSNorm(width, eps)
            self.condition = nn.Linear(2 * width, width, bias=False)
            with torch.no_grad():
                self.condition.weight.zero_()
                self.condition.weight[:, :width].copy_(torch.eye(width))
        self.hidden_norm = RMSNorm(width, eps)
        self.embed_norm = RMSNorm(width, eps)
        self.fuse = nn.Linear(2 * width, config.width, bias=False)
        self.body = ModelPart(adapter_spec(spec, config), 0, config.depth)
        self.project = nn.Linear(config.width, width, bias=False)
        nn.init.zeros_(self.project.weight)

    @property
    def dtype(self) -> torch.dtype:
        return self.body.dtype

    def to_runtime(self, dtype: torch.dtype, device: str | torch.device = "cpu") -> "DraftAdapter":
        """Cast and move, keeping the body's dtype/device attributes (they type its caches) in step."""
        self.to(device=device, dtype=dtype)
        self.body.dtype, self.body.device = dtype, torch.device(device)
        return self

    def new_cache(self, max_length: int | None = None) -> KVCache:
        return self.body.new_cache(max_length)

    @property
    def conditioned(self) -> bool:
        return self.config.conditioned

    def forward(self, hidden: torch.Tensor, embeds: torch.Tensor, spans: list[SequenceSpan],
                previous: torch.Tensor | None = None) -> torch.Tensor:
        """hidden: input-part output [T, width]; embeds: the same tokens' embeddings [T, width]; previous (a
        conditioned adapter only): the middle part's output of each token's predecessor [T, width] -> estimates."""
        check_previous(self.config, hidden, previous)
        hidden = hidden.to(self.dtype)
        if previous is not None:
            hidden = self.condition_input(hidden, previous.to(self.dtype))
        fused = self.fuse_input(hidden, embeds.to(self.dtype))
        return hidden + self.project(self.body.forward_layers(fused, spans))

    def condition_input(self, hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """A conditioned adapter's stand-in for h_K(t): fc([h_K(t) ; norm(h_mid(t-1))]) (shared with the ONNX graph)."""
        return self.condition(torch.cat([hidden, self.previous_norm(previous)], dim=-1))

    def fuse_input(self, hidden: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """The body's input: fuse([norm(h); norm(embed)]) (shared with the ONNX graph)."""
        return self.fuse(torch.cat([self.hidden_norm(hidden), self.embed_norm(embeds)], dim=-1))

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(folder / ADAPTER_WEIGHTS))

    @classmethod
    def load(cls, folder: str | Path, spec: ModelSpec, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu") -> "DraftAdapter":
        folder = Path(folder)
        config = AdapterConfig.load(folder)
        with torch.device("meta"):
            adapter = cls(spec, config)
        weights = folder / ADAPTER_WEIGHTS
        try:
            tensors = load_file(str(weights))
            stored = next(iter(tensors.values())).dtype
            adapter.load_state_dict(tensors, strict=True, assign=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"{folder} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}") from None
        except Exception as exc:  # safetensors' own errors, missing/unexpected keys, wrong shapes
            raise ValueError(f"{weights} is corrupt or does not hold the weights its {ADAPTER_CONFIG} describes "
                             f"({str(exc).splitlines()[0][:200]}): train or copy the adapter again") from None
        return adapter.to_runtime(dtype or stored, device).eval()
