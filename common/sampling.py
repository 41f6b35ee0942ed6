"""Next-token choice from logits: greedy at temperature 0, else temperature and nucleus (top-p) sampling."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax); > 0 scales logits before sampling
    top_p: float = 1.0  # nucleus: sample only from the smallest set of tokens whose probability reaches top_p
    seed: int | None = None  # seed of the sampling generator; None = nondeterministic

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generator(self) -> torch.Generator:
        gen = torch.Generator()
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


def token_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The probabilities sampling draws from, for logits [..., vocab] (float32). Not for greedy."""
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token id from logits [vocab]."""
    if params.greedy:
        return int(torch.argmax(logits))
    return int(torch.multinomial(token_distribution(logits, params), 1, generator=generator))
