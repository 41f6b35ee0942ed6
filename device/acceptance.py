"""Verification of a speculative draft against the target model: the lossless acceptance rules.

A cheap draft proposes tokens d_0..d_{n-1}; one target forward pass over them gives the target's logits
for every position they fill plus one more (the bonus position). Verification keeps a prefix of the
draft and adds exactly one token drawn from the target, so each pass yields 1..n+1 tokens.

Greedy (temperature 0): keep d_i while it equals the target's argmax; the first mismatch is replaced by
the argmax. The output is token for token what greedy decoding of the target alone produces.

Sampling (speculative sampling, Leviathan et al. 2023; Chen et al. 2023): with p_i the target's
distribution (temperature and top-p applied) and q_i the distribution d_i was drawn from, accept d_i
with probability min(1, p_i[d] / q_i[d]); on the first rejection draw from the residual
norm(max(0, p_i - q_i)) and stop; when all are accepted draw the bonus token from p_n. Lossless: the
probability of emitting x at position i is q(x) min(1, p(x)/q(x)) = min(p(x), q(x)) by acceptance, plus
(1 - sum_y min(p(y), q(y))) * max(0, p(x) - q(x)) / sum_y max(0, p(y) - q(y)) by rejection, and since
both sums equal 1 - sum_y min(p(y), q(y)) the total is min(p, q) + max(0, p - q) = p(x). Every emitted
token is therefore distributed exactly as sampling the target itself would draw it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hat.common.sampling import SamplingParams, token_distribution


@dataclass(slots=True)
class Verdict:
    accepted: int  # how many draft tokens were accepted (0..len(draft))
    next_token: int  # drawn from the target: the correction at the first rejection, or the bonus token


def _check_shapes(draft_tokens: list[int], draft_probs: torch.Tensor | None, target_logits: torch.Tensor) -> None:
    n = len(draft_tokens)
    if target_logits.dim() != 2 or target_logits.shape[0] != n + 1:
        raise ValueError(f"target_logits must be [len(draft)+1, vocab] = [{n + 1}, vocab], "
                         f"got {list(target_logits.shape)}")
    vocab = target_logits.shape[1]
    if draft_probs is not None and (draft_probs.dim() != 2 or draft_probs.shape[0] != n):
        raise ValueError(f"draft_probs must be [len(draft), vocab] = [{n}, vocab], got {list(draft_probs.shape)}")
    if draft_probs is not None and draft_probs.shape[1] != vocab:
        raise ValueError(f"draft_probs vocab width {draft_probs.shape[1]} != target_logits vocab width {vocab}")
    bad = [t for t in draft_tokens if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"draft tokens {bad} outside the vocabulary [0, {vocab})")


def verify_greedy(draft_tokens: list[int], target_logits: torch.Tensor) -> Verdict:
    """Accept the longest prefix that matches the target's argmax; next token = argmax after it."""
    _check_shapes(draft_tokens, None, target_logits)
    best = target_logits.argmax(dim=-1).tolist()
    accepted = 0
    while accepted < len(draft_tokens) and draft_tokens[accepted] == best[accepted]:
        accepted += 1
    return Verdict(accepted, best[accepted])


def verify_sampling(draft_tokens: list[int], draft_probs: torch.Tensor, target_logits: torch.Tensor,
                    params: SamplingParams, generator: torch.Generator) -> Verdict:
    """Speculative sampling: accept d_i with probability min(1, p_i[d_i] / q_i[d_i]), else draw the residual."""
    _check_shapes(draft_tokens, draft_probs, target_logits)
    if params.greedy:
        raise ValueError("verify_sampling needs temperature > 0; use verify_greedy")
    p = token_distribution(target_logits, params)
    q = draft_probs.float()
    for i, d in enumerate(draft_tokens):
        p_d, q_d = float(p[i, d]), float(q[i, d])
        u = float(torch.rand(1, generator=generator))
        if q_d > 0 and u < p_d / q_d:  # q_d == 0: the draft could not have produced d; reject
            continue
        residual = torch.clamp(p[i] - q[i].to(p.device), min=0.0)
        if not float(residual.sum()) > 0:  # p <= q everywhere (p == q up to rounding)
            residual = p[i]
        return Verdict(i, int(torch.multinomial(residual, 1, generator=generator)))
    n = len(draft_tokens)
    return Verdict(n, int(torch.multinomial(p[n], 1, generator=generator)))


def verify(draft_tokens: list[int], draft_probs: torch.Tensor | None, target_logits: torch.Tensor,
           params: SamplingParams, generator: torch.Generator | None) -> Verdict:
    """The rule params call for: greedy at temperature 0 (draft_probs may be None), else sampling."""
    if params.greedy:
        _check_shapes(draft_tokens, draft_probs, target_logits)
        return verify_greedy(draft_tokens, target_logits)
    if draft_probs is None or generator is None:
        raise ValueError("sampling verification needs draft_probs and a generator")
    return verify_sampling(draft_tokens, draft_probs, target_logits, params, generator)
