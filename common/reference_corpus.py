"""The reference model's corpus and its held-out measure.

Corpus: every `*.py` file under the running interpreter's standard library,
`sysconfig.get_paths()["stdlib"]`, found recursively, skipping any path that has a `site-packages`
component, sorted by relative path (POSIX form, plain string order). A file's text is its bytes
decoded as UTF-8 with undecodable bytes replaced by U+FFFD; newlines are kept as they are on disk.

Held-out set: whole files whose relative path hashes low, `sha256(relpath.encode("utf-8"))[0] < 5`
(about 2% of the files). They are never trained on: neither the tokenizer nor the model sees them.

Held-out loss (`heldout_loss`): each file is tokenized with the model's tokenizer (which prepends
<s>), cut into windows of up to 513 tokens that overlap by one token (window k is tokens
[512k, 512k + 513)), and every token after the leading <s> is predicted exactly once from the tokens
before it in its window. The result is the mean cross-entropy in nats per predicted token over all
files together (a token-weighted mean, not a mean of per-file means).
"""
from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

HELDOUT_HASH_BELOW = 5  # a file is held out when the first byte of sha256(relpath) is below this
EVAL_WINDOW = 512  # tokens predicted per window in heldout_loss, the training sequence length


@dataclass(frozen=True, slots=True)
class CorpusFile:
    relpath: str  # POSIX path relative to the stdlib root: the file's identity in the corpus
    path: Path  # where it lies on this machine

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def heldout(self) -> bool:
        return is_heldout(self.relpath)

    def read(self) -> str:
        return read_text(self.path)

    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relpath: str) -> bool:
    return hashlib.sha256(relpath.encode("utf-8")).digest()[0] < HELDOUT_HASH_BELOW


def read_text(path: str | os.PathLike) -> str:
    """The file's bytes as UTF-8, undecodable bytes replaced by U+FFFD, newlines untouched."""
    return Path(path).read_bytes().decode("utf-8", errors="replace")


def corpus_files(root: str | os.PathLike | None = None) -> list[CorpusFile]:
    """Every corpus file (training and held-out), sorted by relative path."""
    root = Path(root) if root is not None else stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if "site-packages" in rel.parts or not path.is_file():
            continue
        files.append(CorpusFile(rel.as_posix(), path))
    return sorted(files, key=lambda f: f.relpath)


def split_corpus(files: Sequence[CorpusFile] | None = None) -> tuple[list[CorpusFile], list[CorpusFile]]:
    """(training files, held-out files), each in corpus order."""
    files = corpus_files() if files is None else files
    return [f for f in files if not f.heldout], [f for f in files if f.heldout]


def heldout_files(root: str | os.PathLike | None = None) -> list[CorpusFile]:
    return split_corpus(corpus_files(root))[1]


def corpus_fingerprint(files: Iterable[CorpusFile]) -> str:
    """sha256 over the relative paths and contents: equal only for the same files with the same bytes."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relpath.encode("utf-8") + b"\0" + bytes.fromhex(f.sha256()))
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class FileScore:
    relpath: str  # the file's relpath (or its path when it is not a CorpusFile)
    tokens: int  # tokens predicted (the file's token count, <s> included, minus one)
    nll: float  # summed cross-entropy over those tokens, nats

    @property
    def loss(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")


LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # token ids [T] (int64) -> logits [T, vocab]


@torch.no_grad()
def heldout_scores(logits_fn: LogitsFn, tokenizer, files: Sequence, max_files: int | None = None,
                   window: int = EVAL_WINDOW) -> list[FileScore]:
    """Per-file token count and summed cross-entropy, as defined in the module docstring.

    `logits_fn(ids)` takes one sequence of token ids [T] and returns logits [T, vocab] whose row t
    predicts token t + 1. `files` are CorpusFiles or paths; `max_files` keeps the first that many.
    """
    scores = []
    for f in list(files)[:max_files]:
        ids = torch.tensor(tokenizer(read_text(f))["input_ids"], dtype=torch.long)
        nll, count = 0.0, 0
        for start in range(0, max(len(ids) - 1, 0), window):
            chunk = ids[start:start + window + 1]
            logits = logits_fn(chunk[:-1]).float()
            nll += F.cross_entropy(logits, chunk[1:], reduction="sum").item()
            count += len(chunk) - 1
        scores.append(FileScore(getattr(f, "relpath", str(f)), count, nll))
    return scores


def mean_loss(scores: Iterable[FileScore]) -> float:
    scores = list(scores)
    tokens = sum(s.tokens for s in scores)
    return sum(s.nll for s in scores) / tokens if tokens else float("nan")


def heldout_loss(logits_fn: LogitsFn, tokenizer, files: Sequence, max_files: int | None = None) -> float:
    """Mean cross-entropy (nats/token) over `files` (the first `max_files`), as in the module docstring."""
    return mean_loss(heldout_scores(logits_fn, tokenizer, files, max_files))


def perplexity(loss: float) -> float:
    return math.exp(loss)


def hf_logits_fn(model) -> LogitsFn:
    """logits_fn for a transformers causal LM (float32 logits)."""
    def fn(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids[None].to(model.device)).logits[0].float()
    return fn


def runtime_logits_fn(model_dir: str | os.PathLike, cuts: tuple[int, ...] = ()) -> LogitsFn:
    """logits_fn through the project's runtime, the model cut into parts at the layer numbers `cuts`
    (float32 throughout; no cuts = one whole part)."""
    from .checkpoint import load_tensors
    from .layers import SequenceSpan
    from .model_part import ModelPart
    from .model_spec import load_model_spec

    spec = load_model_spec(model_dir)
    tensors = load_tensors(model_dir, lambda name: True, torch.float32)
    edges = [0, *cuts, spec.num_layers]
    parts = [ModelPart.from_tensors(spec, a, b, tensors, embedding=i == 0, head=i == len(edges) - 2)
             for i, (a, b) in enumerate(zip(edges, edges[1:]))]

    @torch.no_grad()
    def fn(ids: torch.Tensor) -> torch.Tensor:
        hidden = parts[0].embed(ids)
        for part in parts:
            hidden = part.forward_layers(hidden, [SequenceSpan(part.new_cache(len(ids)), 0, len(ids))])
        return parts[-1].logits(hidden)
    return fn
