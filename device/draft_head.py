"""The draft's LM head: the output part's final norm and LM head, optionally over a reduced vocabulary (FR-Spec).

A reduced head keeps only the LM head rows of the most frequent tokens (gathered once, when it is built), so a
draft step computes size x width instead of vocab x width products. Drafts then only ever propose tokens of the
subset, and their sampling distribution q is zero outside it: verification (always over the full vocabulary)
with min(1, p/q) acceptance and the residual max(0, p - q) keeps the target's distribution exactly.
"""
from __future__ import annotations

import torch

from hat.common.token_frequencies import FrequencyTable, tokenizer_fingerprint


class DraftHead:
    def __init__(self, output_part, token_ids: list[int] | None = None):
        """`token_ids`: the subset's ids (None: the full vocabulary, the output part's own head)."""
        self.part = output_part
        self.ids: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None
        if token_ids is not None:
            head = getattr(output_part, "lm_head", None)
            if head is None:
                raise ValueError("a reduced draft vocabulary needs the torch backend (its LM head's rows are gathered)")
            vocab = head.weight.shape[0]
            if not token_ids or min(token_ids) < 0 or max(token_ids) >= vocab or len(set(token_ids)) != len(token_ids):
                raise ValueError(f"draft vocabulary must be distinct ids in [0, {vocab})")
            self.ids = torch.tensor(token_ids, dtype=torch.long, device=head.weight.device)
            self.weight = head.weight.detach()[self.ids].contiguous()

    @property
    def size(self) -> int | None:
        """Tokens the head scores (None: the full vocabulary)."""
        return None if self.ids is None else len(self.ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and the (reduced) head: float32 logits [..., size], index i standing for token_id(i)."""
        if self.weight is None:
            return self.part.logits(hidden.to(self.part.dtype))
        normed = self.part.model.norm(hidden.to(self.part.dtype))
        return torch.nn.functional.linear(normed, self.weight).float()

    def token_id(self, index: int) -> int:
        return index if self.ids is None else int(self.ids[index])

    def full_probs(self, probs: torch.Tensor, vocab: int) -> torch.Tensor:
        """A distribution over the head's tokens, as one over the full vocabulary (zero outside the subset)."""
        if self.ids is None:
            return probs
        return torch.zeros(vocab, dtype=probs.dtype, device=probs.device).scatter(0, self.ids.to(probs.device), probs)


def reduced_head(model, size: int) -> DraftHead:
    """The draft head over the `size` most frequent tokens of the adapter's frequency table (0: the full head).
    Raises when the bundle has no table, or its table was counted for another vocabulary or tokenizer."""
    if size == 0:
        return DraftHead(model.output_part)
    table: FrequencyTable | None = getattr(model, "token_frequencies", None)
    if table is None:
        raise ValueError("a reduced draft vocabulary needs the adapter's token frequency table "
                         "(scripts/count_token_frequencies.py writes it into the adapter folder)")
    vocab = model.spec.vocab_size
    table.check_matches(vocab, tokenizer_fingerprint(model.tokenizer))
    if size >= vocab:
        return DraftHead(model.output_part)
    return DraftHead(model.output_part, table.top(size))
