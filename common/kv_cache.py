"""A key/value cache for one sequence over one part's layers, with truncation to any position."""
from __future__ import annotations

import torch


class CachePositionError(ValueError):
    """A write or truncation names a position the cache cannot take (beyond its length or capacity)."""


class KVCache:
    """Keys and values of one sequence for `num_layers` consecutive decoder layers.

    Storage is [num_layers, num_kv_heads, capacity, head_dim], grown by doubling. `length` is the
    number of valid positions; everything at or beyond it is garbage. The one update rule is
    `begin_write(start)`: the cache is cut back to `start` before new positions are written, which
    gives rollback, retry and resume alike. A write that fails half-way leaves `length == start`.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 max_length: int, device: torch.device | str = "cpu", initial_capacity: int = 64):
        self.num_layers = num_layers
        self.max_length = max_length
        capacity = min(initial_capacity, max_length)
        shape = (num_layers, num_kv_heads, capacity, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2

    def truncate(self, position: int) -> None:
        if not 0 <= position <= self.length:
            raise CachePositionError(f"cannot truncate to position {position}: cache holds {self.length} positions")
        self.length = position

    def begin_write(self, start: int, count: int) -> None:
        """Cut back to `start` and make room for `count` positions after it."""
        end = start + count
        if end > self.max_length:
            raise CachePositionError(f"positions up to {end} exceed the context length {self.max_length}")
        self.truncate(start)
        if end > self.capacity:
            self._grow(end)

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store [kv_heads, n, head_dim] at positions start..start+n of `layer`; return that layer's keys/values up to the end."""
        end = start + keys.shape[1]
        self.keys[layer, :, start:end] = keys
        self.values[layer, :, start:end] = values
        return self.keys[layer, :, :end], self.values[layer, :, :end]

    def commit(self, end: int) -> None:
        self.length = end

    def _grow(self, needed: int) -> None:
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        capacity = min(capacity, self.max_length)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_empty((old.shape[0], old.shape[1], capacity, old.shape[3]))
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)
