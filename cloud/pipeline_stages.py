"""Pipeline parallelism of the cloud's middle part: its decoder layers cut into stages, one process each.

`PipelinedPart` stands in for a `ModelPart` where the cloud uses one (MiddleWorker, SessionStore,
CloudLatencyModel). Layers [first, last) are cut into `stages` contiguous, near-equal slices: stage 0
runs in the calling process, stages 1..S-1 in spawned processes that load only their own slice. They
form a ring in a private torch.distributed process group (gloo; NCCL for CUDA) over a TCPStore that
stage 0 hosts on a free port. A batch goes round the ring: stage 0 runs its slice first (so a bad
span raises in the caller, as from a ModelPart, before anything is sent), then sends a header, int64
metadata (per span: cache id, max_length, initial capacity, start, count; the ids of caches released
since; a cache-count slot per stage) and the hidden states on; the last stage sends the result back.
A later stage keeps a KVCache per id, made on first sight and updated by the same `begin_write`
rule, so it always holds at least stage 0's positions. Stage 0's caches are `PipelineCache`s; when
one is collected (weakref.finalize) or passed to `release`, its id rides on the next batch. An error
on a later stage fails its batch with a RuntimeError (stage 0 cuts the batch's caches back to their
starts); a dead stage, a lost connection or a timeout breaks the pipeline: every call then raises
RuntimeError. `submit`/`collect` keep up to `stages` batches in flight; forward_layers = both.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
import sys
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hat.common.bundle import BundleManifest, load_manifest
from hat.common.checkpoint import load_tensors
from hat.common.kv_cache import KVCache
from hat.common.layers import SequenceSpan
from hat.common.model_part import ModelPart, layer_index
from hat.common.model_spec import load_model_spec

log = logging.getLogger("hat.cloud")
FORWARD, SHUTDOWN = 1, 2  # header ops
HEADER = 6  # header fields: op, spans, released ids, tokens, failed stage (-1: none), error text bytes
SPAN = 5  # metadata fields per span: cache id, max_length, initial capacity, start, count
TAG_HEADER, TAG_META, TAG_DATA = 0, 1, 2


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    stages: int = 2  # processes the middle layers are cut over (stage 0 is the calling process)
    backend: str | None = None  # torch.distributed backend; None: "nccl" for a CUDA device, else "gloo"
    host: str = "127.0.0.1"  # address the stages' store and connections listen on
    start_timeout_s: float = 120.0  # longest wait for the stage processes to start, load and connect
    timeout_s: float = 60.0  # longest wait for a batch's result or for one transfer
    idle_timeout_s: float = 30 * 86400.0  # longest a later stage waits for its next batch before exiting
    shutdown_timeout_s: float = 5.0  # how long close() waits for the stages to exit before killing them
    threads: int | None = None  # torch intra-op threads of each stage process; None: torch's default


@dataclass(frozen=True, slots=True)
class StageConfig:
    bundle_dir: str  # the cloud bundle
    rank: int  # this stage's place in the ring
    bounds: tuple[int, ...]  # layer boundaries: stage k runs [bounds[k], bounds[k + 1])
    device: str  # where this stage's weights and caches live
    backend: str  # torch.distributed backend of the ring
    port: int  # stage 0's TCPStore port
    pipeline: PipelineConfig  # the settings the pipeline was made with


def stage_bounds(first: int, last: int, stages: int) -> tuple[int, ...]:
    """Near-equal contiguous slices of [first, last); refuses stage counts the layers cannot fill."""
    if not 1 <= stages <= last - first:
        raise ValueError(f"stages must be between 1 and the {last - first} middle layers, got {stages}")
    return tuple(first + k * (last - first) // stages for k in range(stages + 1))


def _load_slice(bundle_dir: str | Path, first: int, last: int, device: str) -> ModelPart:
    wanted = lambda name: (i := layer_index(name)) is not None and first <= i < last  # noqa: E731
    return ModelPart.from_tensors(load_model_spec(bundle_dir), first, last, load_tensors(bundle_dir, wanted), device=device)


def _placement(config: PipelineConfig, device: str) -> tuple[str, list[str]]:
    """The backend and each stage's device: CPU: all on the CPU; CUDA: stage k on the k-th GPU from `device`
    (NCCL needs a GPU per stage; gloo lets stages share one and sends through host memory)."""
    dev = torch.device(device)
    backend = config.backend or ("nccl" if dev.type == "cuda" else "gloo")
    if dev.type != "cuda":
        return backend, [str(dev)] * config.stages
    count = torch.cuda.device_count()
    if backend == "nccl" and config.stages > count:
        raise ValueError(f"nccl needs one GPU per stage: {config.stages} stages, {count} GPUs (use backend='gloo')")
    return backend, [f"cuda:{((dev.index or 0) + k) % count}" for k in range(config.stages)]


class _Ring:
    """One process's end of the ring: the process group, sends to the next stage, receives from the previous."""

    def __init__(self, config: StageConfig, store: dist.Store):
        self.rank, self.size = config.rank, len(config.bounds) - 1
        self.timeout = timedelta(seconds=config.pipeline.timeout_s)
        self.wire = torch.device(config.device if config.backend == "nccl" else "cpu")  # where tensors travel from
        self.store = dist.PrefixStore("ring", store)
        if config.backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = self.timeout
            self.group = dist.ProcessGroupNCCL(self.store, self.rank, self.size, options)
        else:
            options = dist.ProcessGroupGloo._Options()
            options._timeout = self.timeout
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=config.pipeline.host)]
            self.group = dist.ProcessGroupGloo(self.store, self.rank, self.size, options)

    def send(self, header: list[int], meta: torch.Tensor | None, data: torch.Tensor | None) -> list:
        """Post a message's parts; the returned (work, tensor) pairs must live until the transfer is done."""
        works = []
        for tensor, tag in ((torch.tensor(header, dtype=torch.int64), TAG_HEADER), (meta, TAG_META), (data, TAG_DATA)):
            if tensor is not None and tensor.numel():
                tensor = tensor.to(self.wire).contiguous()
                works.append((self.group.send([tensor], (self.rank + 1) % self.size, tag), tensor))
        return works

    def recv(self, shape, dtype: torch.dtype, tag: int, timeout: timedelta | None = None) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype, device=self.wire)
        if tensor.numel():
            self.group.recv([tensor], (self.rank - 1) % self.size, tag).wait(timeout or self.timeout)
        return tensor.cpu() if dtype in (torch.int64, torch.uint8) else tensor


def _stage_main(config: StageConfig) -> None:
    """A later stage's process: load its slice, join the ring, serve batches until SHUTDOWN or a lost connection."""
    pipe = config.pipeline
    start = timedelta(seconds=pipe.start_timeout_s)
    store = dist.TCPStore(pipe.host, config.port, len(config.bounds) - 1, False, start)
    try:
        if pipe.threads:
            torch.set_num_threads(pipe.threads)
        part = _load_slice(config.bundle_dir, config.bounds[config.rank], config.bounds[config.rank + 1], config.device)
        if part.device.type == "cuda":
            torch.cuda.set_device(part.device)
        store.set(f"ready{config.rank}", "1")
        store.wait([f"ready{k}" for k in range(len(config.bounds) - 1)], start)  # then all connect at once
        ring = _Ring(config, store)
    except BaseException:
        store.set(f"error{config.rank}", traceback.format_exc())
        raise
    code = 0
    try:
        _serve(part, ring, timedelta(seconds=pipe.idle_timeout_s))
    except Exception as error:  # the ring is gone (a stage died or timed out): nothing left to serve
        log.error("pipeline stage %d exits: %s", config.rank, error)
        code = 1
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)  # nothing to clean up; skips the ~0.7 s of unloading torch and transformers


def _serve(part: ModelPart, ring: _Ring, idle: timedelta) -> None:
    caches: dict[int, KVCache] = {}
    while True:
        op, n_spans, n_released, n_tokens, failed, n_text = ring.recv(HEADER, torch.int64, TAG_HEADER, idle).tolist()
        if op == SHUTDOWN:
            for work, _ in ring.send([op, 0, 0, 0, -1, 0], None, None) if ring.rank + 1 < ring.size else []:
                work.wait(ring.timeout)
            return
        meta = ring.recv(SPAN * n_spans + n_released + ring.size, torch.int64, TAG_META)
        if failed >= 0:
            data = ring.recv(n_text, torch.uint8, TAG_DATA)
        else:
            data = ring.recv((n_tokens, part.spec.hidden_size), part.dtype, TAG_DATA)
        for cache_id in meta[SPAN * n_spans: SPAN * n_spans + n_released].tolist():
            caches.pop(cache_id, None)
        if failed < 0 and n_spans:
            try:
                spans = []
                for cache_id, max_length, capacity, start, count in meta[:SPAN * n_spans].view(-1, SPAN).tolist():
                    if cache_id not in caches:
                        caches[cache_id] = KVCache(part.num_layers, part.spec.num_kv_heads, part.spec.head_dim,
                                                   part.dtype, max_length, part.device, initial_capacity=capacity)
                    spans.append(SequenceSpan(caches[cache_id], start, count))
                with torch.inference_mode():
                    data = part.forward_layers(data, spans)
            except Exception as error:  # fails this batch only: reported to stage 0 in its place
                text = f"stage {ring.rank}: {type(error).__name__}: {error}".encode()
                failed, data, n_text = ring.rank, torch.frombuffer(bytearray(text), dtype=torch.uint8), len(text)
        meta[ring.rank - ring.size] = len(caches)
        for work, _ in ring.send([op, n_spans, n_released, n_tokens, failed, n_text], meta, data):
            work.wait(idle)  # the last stage waits here until stage 0 collects (stage 0 times out hung stages)


class PipelineCache(KVCache):
    """Stage 0's cache of one session; the later stages keep theirs under the same `id`."""

    def __init__(self, cache_id: int, released: collections.deque, total_layers: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.id, self.pipeline, self.total_layers = cache_id, released, total_layers
        self.release = weakref.finalize(self, released.append, cache_id)  # runs once: on release() or when collected
        self.release.atexit = False

    @property
    def nbytes(self) -> int:
        """Bytes of this session over all stages (every stage grows its caches by the same rule)."""
        return KVCache.nbytes.fget(self) // self.num_layers * self.total_layers


def _shutdown(procs: list, ring: list, state: dict, inflight: collections.deque, timeout_s: float) -> None:
    """Ask the stages to exit and join them, killing those that do not (close(), collection, interpreter exit);
    the stages of a broken pipeline, or of one with batches in flight, are killed at once."""
    graceful = ring and not state["broken"] and not inflight and all(p.is_alive() for p in procs)
    state["broken"] = state["broken"] or "it is closed"
    try:
        for work, _ in ring[0].send([SHUTDOWN, 0, 0, 0, -1, 0], None, None) if graceful else []:
            work.wait(timedelta(seconds=timeout_s))
    except Exception:
        graceful = False
    deadline = time.monotonic() + (timeout_s if graceful else 0.0)
    for proc in procs:
        if proc.pid is not None:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout_s)
    ring.clear()


class PipelinedPart:
    """The middle layers of a cloud bundle run as a pipeline of `config.stages` processes (see the module doc)."""

    def __init__(self, bundle_dir: str | Path, device: str = "cpu", config: PipelineConfig = PipelineConfig()):
        self.first, self.last = load_manifest(bundle_dir, part="cloud").middle_layers
        self.bounds = stage_bounds(self.first, self.last, config.stages)
        if config.stages < 2:
            raise ValueError("a pipeline needs 2 or more stages (load_pipelined_middle_part serves 1 with a ModelPart)")
        self.stages, self.config = config.stages, config
        backend, devices = _placement(config, device)
        self._released: collections.deque = collections.deque()  # ids of released caches not yet sent on
        self._ids = itertools.count(1)
        self._inflight: collections.deque = collections.deque()  # per batch in flight: its send works and spans
        self._lock = threading.RLock()
        self._ring: list[_Ring] = []  # stage 0's end, once connected (a list the finalizer can clear)
        self._state = {"broken": None}  # why the pipeline can no longer be used, or None
        self._counts = [0] * (config.stages - 1)  # caches held by stages 1..S-1 as of the last batch
        store = dist.TCPStore(config.host, 0, config.stages, True, timedelta(seconds=config.start_timeout_s),
                              wait_for_workers=False)
        stage = lambda k: StageConfig(str(bundle_dir), k, self.bounds, devices[k], backend, store.port, config)  # noqa: E731
        context = mp.get_context("spawn")
        self._procs = [context.Process(target=_stage_main, args=(stage(k),), name=f"hat-stage-{k}", daemon=True)
                       for k in range(1, config.stages)]
        self._close = weakref.finalize(self, _shutdown, self._procs, self._ring, self._state, self._inflight,
                                       config.shutdown_timeout_s)
        try:
            for proc in self._procs:
                proc.start()
            self._part = _load_slice(bundle_dir, self.bounds[0], self.bounds[1], devices[0])
            store.set("ready0", "1")
            self._await_stages(store)
            self._ring.append(_Ring(stage(0), store))
        except BaseException:
            self._close()
            raise
        self.spec, self.dtype, self.device = self._part.spec, self._part.dtype, self._part.device
        self.pids = [proc.pid for proc in self._procs]  # of stages 1..S-1

    def _await_stages(self, store: dist.Store) -> None:
        deadline = time.monotonic() + self.config.start_timeout_s
        while not store.check([f"ready{k}" for k in range(1, self.stages)]):
            for k, proc in enumerate(self._procs, 1):
                if store.check([f"error{k}"]):
                    raise RuntimeError(f"pipeline stage {k} failed to start:\n{store.get(f'error{k}').decode()}")
                if not proc.is_alive():
                    raise RuntimeError(f"pipeline stage {k} exited with code {proc.exitcode} while starting")
            if time.monotonic() > deadline:
                raise RuntimeError(f"pipeline stages not ready within {self.config.start_timeout_s} s")
            time.sleep(0.02)

    @property
    def num_layers(self) -> int:
        return self.last - self.first

    @property
    def kv_bytes_per_position(self) -> int:
        """KV bytes per position over all stages' layers: the budget is for the whole middle part."""
        return self._part.kv_bytes_per_position // self._part.num_layers * self.num_layers

    def new_cache(self, max_length: int | None = None, preallocate: bool = False) -> PipelineCache:
        max_length = self.spec.max_context if max_length is None else max_length
        return PipelineCache(next(self._ids), self._released, self.num_layers, self._part.num_layers,
                             self.spec.num_kv_heads, self.spec.head_dim, self.dtype, max_length, device=self.device,
                             initial_capacity=max_length if preallocate else 64)

    def release(self, cache: PipelineCache) -> None:
        """Free `cache` on every stage (its id rides on the next batch); using it afterwards raises ValueError."""
        cache.release()

    def _fail(self, why: str, error: Exception | None = None):
        self._state["broken"] = self._state["broken"] or why
        raise RuntimeError(f"pipeline is unusable: {self._state['broken']}") from error

    def _check(self) -> None:
        if self._state["broken"]:
            self._fail("")
        for k, proc in enumerate(self._procs, 1):
            if not proc.is_alive():
                self._fail(f"stage {k} exited with code {proc.exitcode}")

    def submit(self, hidden: torch.Tensor, spans: list[SequenceSpan]) -> None:
        """Run stage 0's slice on a batch and send it on; collect() returns the results in submission order."""
        with self._lock:
            self._check()
            if len(self._inflight) >= self.stages:
                raise RuntimeError(f"{self.stages} batches already in flight: collect() first")
            for span in spans:
                if not isinstance(span.cache, PipelineCache) or span.cache.pipeline is not self._released:
                    raise ValueError("a span's cache was not made by this PipelinedPart's new_cache")
                if not span.cache.release.alive:
                    raise ValueError(f"cache {span.cache.id} was released")
            if not spans and hidden.shape[0]:
                raise ValueError(f"hidden has {hidden.shape[0]} tokens, spans say 0")
            with torch.inference_mode():
                out = self._part.forward_layers(hidden, spans) if spans else None  # a bad span raises here
            released = [self._released.popleft() for _ in range(len(self._released))]
            meta = torch.tensor([v for s in spans for v in (s.cache.id, s.cache.max_length, s.cache.capacity, s.start,
                                                            s.count)] + released + [0] * self.stages, dtype=torch.int64)
            try:
                header = [FORWARD, len(spans), len(released), 0 if out is None else out.shape[0], -1, 0]
                works = self._ring[0].send(header, meta, out)
            except Exception as error:
                self._fail(f"sending to stage 1 failed: {error}", error)
            self._inflight.append((works, [(s.cache, s.start) for s in spans]))

    def collect(self) -> torch.Tensor:
        """The final hidden states of the oldest batch in flight."""
        with self._lock:
            if not self._inflight:
                raise RuntimeError("no batch in flight")
            self._check()
            works, starts = self._inflight.popleft()
            ring = self._ring[0]
            try:
                _, _, n_released, n_tokens, failed, n_text = ring.recv(HEADER, torch.int64, TAG_HEADER).tolist()
                meta = ring.recv(SPAN * len(starts) + n_released + self.stages, torch.int64, TAG_META)
                if failed >= 0:
                    text = bytes(ring.recv(n_text, torch.uint8, TAG_DATA).tolist()).decode(errors="replace")
                else:
                    out = ring.recv((n_tokens, self.spec.hidden_size), self.dtype, TAG_DATA)
                for work, _ in works:
                    work.wait(ring.timeout)
            except Exception as error:
                dead = [k for k, proc in enumerate(self._procs, 1) if not proc.is_alive()]
                self._fail(f"lost the ring (stages exited: {dead or 'none yet'}): {error}", error)
            self._counts = meta[1 - self.stages:].tolist()
            if failed >= 0:  # as after a failed ModelPart forward: the batch's caches end at their starts
                for cache, start in starts:
                    cache.truncate(min(start, cache.length))
                raise RuntimeError(f"pipeline batch failed on {text}")
            return out.to(self.device)

    def forward_layers(self, hidden: torch.Tensor, spans: list[SequenceSpan]) -> torch.Tensor:
        """As ModelPart.forward_layers over all the middle layers (with no other batch in flight)."""
        with self._lock:
            if self._inflight:
                raise RuntimeError("forward_layers with batches in flight: collect() them first")
            self.submit(hidden, spans)
            return self.collect()

    def remote_cache_count(self) -> list[int]:
        """Caches held by stages 1..S-1 once pending releases are sent (a debugging aid; sends an empty batch)."""
        self.forward_layers(torch.empty(0, self.spec.hidden_size, dtype=self.dtype, device=self.device), [])
        return list(self._counts)

    def close(self) -> None:
        """Collect what is in flight and stop the stage processes; idempotent (also run at interpreter exit)."""
        with self._lock:
            while self._inflight and not self._state["broken"]:
                try:
                    self.collect()
                except RuntimeError:
                    pass
            self._close()

    def __enter__(self) -> "PipelinedPart":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_pipelined_middle_part(bundle_dir: str | Path, device: str = "cpu", stages: int = 2,
                               config: PipelineConfig | None = None) -> tuple[PipelinedPart | ModelPart, BundleManifest]:
    """As middle_worker.load_middle_part, with the layers cut over `stages` processes (1: a plain ModelPart)."""
    manifest = load_manifest(bundle_dir, part="cloud")
    stage_bounds(*manifest.middle_layers, stages)
    if stages == 1:
        from .middle_worker import load_middle_part  # imports the data plane: not needed by stage processes
        return load_middle_part(bundle_dir, device)
    return PipelinedPart(bundle_dir, device, dataclasses.replace(config or PipelineConfig(), stages=stages)), manifest
