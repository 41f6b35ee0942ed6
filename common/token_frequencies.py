"""Token frequencies on training data, for a reduced-vocabulary draft head (FR-Spec, arXiv 2502.14856).

The draft computes logits only over the most frequent tokens; which those are is counted once on the adapter's
training data (ShareGPT conversations formatted with the model's chat template) and kept as a file next to the
adapter: ADAPTER/token_frequencies.json, with the vocabulary size and a fingerprint of the tokenizer's
vocabulary, so a table counted with another tokenizer is refused with a clear error instead of drafting
nonsense. Verification keeps the full vocabulary, so the table only changes speed and acceptance.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

FREQUENCY_TABLE = "token_frequencies.json"  # file name in an adapter folder
FREQUENCY_FORMAT_VERSION = 1


class FrequencyTableMismatchError(ValueError):
    """A frequency table counted for another vocabulary or tokenizer."""


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the tokenizer's (token, id) pairs: equal only for the same vocabulary and ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class FrequencyTable:
    vocab_size: int  # rows of the LM head the table was counted for
    tokenizer_fingerprint: str  # tokenizer_fingerprint() of the tokenizer that counted
    counts: tuple[int, ...]  # occurrences of each token id, [vocab_size]
    source: str = ""  # what was counted (data set, sample size), for people
    format_version: int = FREQUENCY_FORMAT_VERSION  # on-disk layout version

    def __post_init__(self):
        if len(self.counts) != self.vocab_size:
            raise ValueError(f"frequency table has {len(self.counts)} counts for a vocabulary of {self.vocab_size}")

    def top(self, size: int) -> list[int]:
        """The `size` most frequent token ids, in increasing id order (ties: lower id first)."""
        if not 0 < size <= self.vocab_size:
            raise ValueError(f"draft vocabulary size must lie in [1, {self.vocab_size}], got {size}")
        ranked = sorted(range(self.vocab_size), key=lambda i: (-self.counts[i], i))[:size]
        return sorted(ranked)

    def coverage(self, size: int) -> float:
        """Share of the counted tokens that the `size` most frequent ones make up."""
        total = sum(self.counts)
        return sum(self.counts[i] for i in self.top(size)) / total if total else 0.0

    def check_matches(self, vocab_size: int, fingerprint: str) -> None:
        if vocab_size != self.vocab_size:
            raise FrequencyTableMismatchError(f"the frequency table was counted for a vocabulary of {self.vocab_size} "
                                              f"tokens; this model's LM head has {vocab_size}: count it again for this "
                                              f"model (scripts/count_token_frequencies.py)")
        if fingerprint != self.tokenizer_fingerprint:
            raise FrequencyTableMismatchError(f"the frequency table was counted with tokenizer "
                                              f"{self.tokenizer_fingerprint[:12]}, not this model's {fingerprint[:12]}: "
                                              f"count it again for this model (scripts/count_token_frequencies.py)")

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / FREQUENCY_TABLE
        data = dict(format_version=self.format_version, vocab_size=self.vocab_size,
                    tokenizer_fingerprint=self.tokenizer_fingerprint, source=self.source, counts=list(self.counts))
        path.write_text(json.dumps(data) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "FrequencyTable":
        path = Path(folder) / FREQUENCY_TABLE
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {FREQUENCY_TABLE}: count one with scripts/count_token_frequencies.py")
        try:
            data = json.loads(path.read_text())
            if data.get("format_version") != FREQUENCY_FORMAT_VERSION:
                raise ValueError(f"format {data.get('format_version')}, this version reads {FREQUENCY_FORMAT_VERSION}")
            counts = data["counts"]
            if not all(isinstance(c, int) and c >= 0 for c in counts):
                raise ValueError("counts must be non-negative integers")
            return cls(int(data["vocab_size"]), str(data["tokenizer_fingerprint"]), tuple(counts),
                       str(data.get("source", "")))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a valid frequency table: {exc}") from None


def count_frequencies(tokenizer, vocab_size: int, conversations: Iterable[list[dict]], max_tokens: int,
                      source: str = "") -> FrequencyTable:
    """Count token ids over `conversations` (chat messages), each formatted with the tokenizer's chat template
    (as the model sees them), until `max_tokens` have been counted."""
    counts = [0] * vocab_size
    seen = total = 0
    for messages in conversations:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for token in ids:
            if not 0 <= token < vocab_size:
                raise ValueError(f"token id {token} outside the vocabulary of {vocab_size}")
            counts[token] += 1
        seen, total = seen + 1, total + len(ids)
        if total >= max_tokens:
            break
    if not total:
        raise ValueError("no tokens counted: the data has no conversations")
    return FrequencyTable(vocab_size, tokenizer_fingerprint(tokenizer), tuple(counts),
                          source or f"{seen} conversations, {total} tokens")
