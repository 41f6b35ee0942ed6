"""An EAGLE-style cache of the frozen teacher's hidden states: the model's middle runs once per training token.

Distilling a draft adapter needs, per token, the input part's output h_K (the adapter's input) and the middle
part's output h_mid (its target). Computing them is nearly all of a training step's cost (the middle is most of
the model), so the cache computes them once, for consecutive windows of `seq_len` tokens of the training stream,
and training then runs epochs over it. A cache folder holds, as .npy files read through memory maps:

    ids.npy    [windows, seq_len]         int32    the tokens
    h_k.npy    [windows, seq_len, width]  float16  the input part's output
    h_mid.npy  [windows, seq_len, width]  float16  the middle part's output
    cache.json                                     CacheMeta; `filled` counts the windows written

float16 halves the bytes; its relative rounding (about 5e-4) is far below what the adapter is trained to. Filling
is resumable: an interrupted fill continues from `filled`. A cache belongs to one checkpoint, one split and one
token stream: opening it with another is refused with what differs. A run that asks for fewer tokens than a cache
holds uses (and fills) only its first windows: the same stream's beginning.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

CACHE_META = "cache.json"
CACHE_FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class CacheMeta:
    source_fingerprint: str  # sha256 of the checkpoint whose hidden states these are (hat.common.checkpoint)
    input_layers: int  # K: h_k is the output of layers [0, K)
    output_layers: int  # M: h_mid is the output of layers [0, N-M)
    width: int  # the model's hidden size
    seq_len: int  # tokens per window (attention sees only its own window)
    windows: int  # windows the cache holds when full
    stream: str  # what the token stream is (data, seed): another stream is another cache
    filled: int = 0  # windows written so far
    format_version: int = CACHE_FORMAT_VERSION  # on-disk layout version


def _arrays(folder: Path, meta: CacheMeta, mode: str) -> tuple[np.memmap, np.memmap, np.memmap]:
    """(ids, h_k, h_mid) memory maps of a cache folder: "w+" creates them, "r+" opens them."""
    shape = (meta.windows, meta.seq_len)
    return (np.lib.format.open_memmap(folder / "ids.npy", mode=mode, dtype=np.int32, shape=shape),
            *(np.lib.format.open_memmap(folder / name, mode=mode, dtype=np.float16, shape=shape + (meta.width,))
              for name in ("h_k.npy", "h_mid.npy")))


class CacheMismatchError(ValueError):
    """A cache folder made for another checkpoint, split or token stream."""


class HiddenStateCache:
    def __init__(self, folder: str | Path, meta: CacheMeta, used: int | None = None):
        """`used`: how many of its windows this run fills and trains on (default: all)."""
        self.folder, self.meta = Path(folder), meta
        self.used = meta.windows if used is None else min(used, meta.windows)
        self.ids, self.h_k, self.h_mid = _arrays(self.folder, meta, "r+")

    @classmethod
    def open(cls, folder: str | Path, wanted: CacheMeta) -> "HiddenStateCache":
        """The cache in `folder`, created empty if there is none; refused if made for something else."""
        folder = Path(folder)
        meta_path = folder / CACHE_META
        if meta_path.is_file():
            try:
                found = CacheMeta(**json.loads(meta_path.read_text()))
            except (TypeError, ValueError) as exc:
                raise CacheMismatchError(f"{meta_path} is not a valid hidden-state cache: {exc}") from None
            differs = [k for k, v in asdict(wanted).items() if k not in ("filled", "windows") and getattr(found, k) != v]
            if differs:
                raise CacheMismatchError(f"the hidden-state cache {folder} was made with other {', '.join(differs)}: "
                                         f"remove it or name another --cache folder")
            if found.windows < wanted.windows:
                raise CacheMismatchError(f"the hidden-state cache {folder} holds {found.windows} windows, fewer than "
                                         f"the {wanted.windows} asked for: remove it or ask for fewer tokens")
            return cls(folder, found, wanted.windows)  # the same stream's first windows serve a smaller request
        folder.mkdir(parents=True, exist_ok=True)
        _arrays(folder, wanted, "w+")
        cache = cls(folder, replace(wanted, filled=0))
        cache._write_meta()
        return cache

    @property
    def full(self) -> bool:
        """Are the windows this run uses all written?"""
        return self.meta.filled >= self.used

    @property
    def available(self) -> int:
        """Windows written and used by this run."""
        return min(self.meta.filled, self.used)

    def _write_meta(self) -> None:
        tmp = self.folder / (CACHE_META + ".tmp")
        tmp.write_text(json.dumps(asdict(self.meta), indent=1) + "\n")
        tmp.replace(self.folder / CACHE_META)

    @torch.no_grad()
    def fill(self, teacher, stream: np.ndarray, batch: int = 4) -> int:
        """Compute the windows not yet written: window i is stream[i*seq_len : (i+1)*seq_len]. Returns how many
        windows this call wrote (0: the cache was full)."""
        meta = self.meta
        before = meta.filled
        if len(stream) < self.used * meta.seq_len:
            raise ValueError(f"the token stream has {len(stream):,} tokens, the cache needs {self.used * meta.seq_len:,}")
        with tqdm(total=self.used, initial=self.available, desc="hidden-state cache", unit="window") as bar:
            while meta.filled < self.used:
                first, last = meta.filled, min(self.used, meta.filled + batch)
                ids = torch.from_numpy(stream[first * meta.seq_len:last * meta.seq_len].reshape(last - first, meta.seq_len))
                _, h_k, h_mid = teacher.hidden(ids)
                h_k, h_mid = (h.reshape(last - first, meta.seq_len, -1).numpy().astype(np.float16) for h in (h_k, h_mid))
                if not (np.isfinite(h_k).all() and np.isfinite(h_mid).all()):
                    raise ValueError(f"windows {first}..{last - 1}: a hidden state overflows float16")
                self.ids[first:last], self.h_k[first:last], self.h_mid[first:last] = ids.numpy(), h_k, h_mid
                for array in (self.ids, self.h_k, self.h_mid):
                    array.flush()
                meta = self.meta = replace(meta, filled=last)
                self._write_meta()
                bar.update(last - first)
        return meta.filled - before

    def batch(self, seed: int, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids [B, T], h_k [B*T, D], h_mid [B*T, D]) float32, windows drawn from the seed and step alone (a
        resumed run sees the same batches)."""
        if not self.available:
            raise ValueError(f"the hidden-state cache {self.folder} is empty")
        rows = np.sort(np.random.default_rng([seed, step]).integers(0, self.available, size=size))
        ids = torch.from_numpy(self.ids[rows].astype(np.int64))
        flat = (-1, self.meta.width)
        return (ids, torch.from_numpy(self.h_k[rows].astype(np.float32)).reshape(flat),
                torch.from_numpy(self.h_mid[rows].astype(np.float32)).reshape(flat))

    def token_counts(self, vocab_size: int) -> np.ndarray:
        """How often each token id occurs in the filled windows."""
        return np.bincount(self.ids[:self.available].reshape(-1), minlength=vocab_size)
