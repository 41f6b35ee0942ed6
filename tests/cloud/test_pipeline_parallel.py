"""The middle part cut over several processes (PipelinedPart) computes exactly what one ModelPart does.

Oracles: a single ModelPart over the same layers (torch.equal: float32 on CPU, same ops in the same
order, so bitwise equal) and transformers' hidden states at the middle part's last layer (atol 1e-4).
Starting a stage process costs a few seconds (it imports torch and transformers), so the 2- and
3-stage pipelines are built once per module, concurrently; the last test breaks the 3-stage one.
"""
from __future__ import annotations

import gc
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM

from hat.cloud.kv_budget import KVBudget
from hat.cloud.latency_model import CloudLatencyModel
from hat.cloud.middle_worker import ForwardJob, MiddleWorker, load_middle_part
from hat.cloud.pipeline_stages import PipelineCache, PipelineConfig, PipelinedPart, load_pipelined_middle_part
from hat.cloud.session_store import SessionStore
from hat.common.checkpoint import load_tensors
from hat.common.kv_cache import CachePositionError
from hat.common.layers import SequenceSpan
from hat.common.model_part import ModelPart
from hat.common.model_spec import load_model_spec
from hat.common.proto import hat_pb2 as pb
from hat.common.split import split_checkpoint
from hat.common.wire import make_header

FAMILY = "mistral"  # its sliding window (12) is shorter than the prompts: each stage must keep its layers' windows
K, M = 1, 1  # of the tiny checkpoints' 6 layers: middle layers [1, 5)


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory):
    model_dir = tiny_checkpoint(FAMILY)
    _, cloud_dir = split_checkpoint(model_dir, K, M, tmp_path_factory.mktemp("pipeline") / "bundle")
    return model_dir, cloud_dir


@pytest.fixture(scope="module")
def single(bundle) -> ModelPart:
    return load_middle_part(bundle[1])[0]


@pytest.fixture(scope="module")
def pipes(bundle):
    """{2: a 2-stage PipelinedPart, 3: a 3-stage one} (layers split 2+2 and 1+1+2)."""
    with ThreadPoolExecutor(2) as pool:
        futures = {s: pool.submit(load_pipelined_middle_part, bundle[1], "cpu", s, PipelineConfig(timeout_s=30))
                   for s in (2, 3)}
    parts = {s: f.result()[0] for s, f in futures.items()}
    yield parts
    for part in parts.values():
        part.close()


def _hidden(single: ModelPart, n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, single.spec.hidden_size, generator=torch.Generator().manual_seed(seed))


def _twin_forward(pipe, single, hidden, spans):
    """Run the same batch through both; spans: (pipelined cache, single cache, start, count)."""
    got = pipe.forward_layers(hidden, [SequenceSpan(p, start, n) for p, _, start, n in spans])
    want = single.forward_layers(hidden, [SequenceSpan(s, start, n) for _, s, start, n in spans])
    assert torch.equal(got, want)
    assert all(p.length == s.length for p, s, _, _ in spans)
    return got


@pytest.mark.parametrize("stages", [2, 3])
@torch.no_grad()
def test_ragged_batch_matches_single_part_and_transformers(stages, pipes, single, bundle):
    model_dir, _ = bundle
    pipe = pipes[stages]
    assert (pipe.first, pipe.last, pipe.num_layers, pipe.stages) == (single.first, single.last, 4, stages)
    input_part = ModelPart.from_tensors(load_model_spec(model_dir), 0, K, load_tensors(model_dir, lambda n: True),
                                        embedding=True)
    torch.manual_seed(0)
    prompts = [torch.randint(3, 300, (n,)) for n in (5, 17, 30)]
    first_counts = [4, 8, 0]  # phase 0 prefills these, phase 1 the rest: ragged batches of 4+8, then 1+9+30 tokens
    hiddens = [input_part.forward_layers(input_part.embed(ids), [SequenceSpan(input_part.new_cache(), 0, len(ids))])
               for ids in prompts]
    caches = [(pipe.new_cache(64, preallocate=True), single.new_cache(64, preallocate=True)) for _ in prompts]
    outputs = [[] for _ in prompts]
    for phase in range(2):
        spans, chunks, owners = [], [], []
        for i, (hidden, first) in enumerate(zip(hiddens, first_counts)):
            start, end = (0, first) if phase == 0 else (first, len(hidden))
            if end > start:
                spans.append((*caches[i], start, end - start))
                chunks.append(hidden[start:end])
                owners.append(i)
        out = _twin_forward(pipe, single, torch.cat(chunks), spans)
        for i, piece in zip(owners, out.split([s[3] for s in spans])):
            outputs[i].append(piece)
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for ids, out in zip(prompts, outputs):
        want = reference(ids[None], output_hidden_states=True).hidden_states[pipe.last][0]
        torch.testing.assert_close(torch.cat(out), want, atol=1e-4, rtol=0)


@torch.no_grad()
def test_rollback_and_rewrite_match_single_part(pipes, single):
    pipe = pipes[3]
    a, b = (pipe.new_cache(40), single.new_cache(40)), (pipe.new_cache(40), single.new_cache(40))
    _twin_forward(pipe, single, _hidden(single, 20 + 6, 1), [(*a, 0, 20), (*b, 0, 6)])
    _twin_forward(pipe, single, _hidden(single, 4 + 1, 2), [(*a, 20, 4), (*b, 6, 1)])  # a draft of 4, a decode step
    _twin_forward(pipe, single, _hidden(single, 3 + 2, 3), [(*a, 22, 3), (*b, 3, 2)])  # roll back into both
    _twin_forward(pipe, single, _hidden(single, 5, 4), [(*a, 0, 5)])  # rewrite from the start
    assert (a[0].length, b[0].length) == (5, 5)


@torch.no_grad()
def test_release_frees_the_later_stages_caches(pipes, single):
    pipe = pipes[2]
    gc.collect()
    base = pipe.remote_cache_count()
    pairs = [(pipe.new_cache(32), single.new_cache(32)) for _ in range(3)]
    unused = pipe.new_cache(32)  # never sent: the later stages never hear of it
    _twin_forward(pipe, single, _hidden(single, 9, 5), [(*pair, 0, 3) for pair in pairs])
    assert pipe.remote_cache_count() == [base[0] + 3]
    del unused
    dropped = pairs.pop(0)
    del dropped
    gc.collect()
    assert pipe.remote_cache_count() == [base[0] + 2]
    released = pairs.pop(0)
    pipe.release(released[0])
    assert pipe.remote_cache_count() == [base[0] + 1]
    with pytest.raises(ValueError, match="released"):
        pipe.forward_layers(_hidden(single, 1, 6), [SequenceSpan(released[0], 3, 1)])
    _twin_forward(pipe, single, _hidden(single, 2, 7), [(*pairs[0], 3, 2)])  # the survivor is intact


@torch.no_grad()
def test_bad_span_raises_in_the_caller_and_the_pipeline_goes_on(pipes, single):
    pipe = pipes[3]
    gc.collect()
    base = pipe.remote_cache_count()
    a, b = (pipe.new_cache(16), single.new_cache(16)), (pipe.new_cache(16), single.new_cache(16))
    _twin_forward(pipe, single, _hidden(single, 10, 8), [(*a, 0, 10)])
    for part, (bad, good) in ((pipe, (a[0], b[0])), (single, (a[1], b[1]))):  # the same errors as from a ModelPart
        with pytest.raises(CachePositionError):  # a gap after the cached positions
            part.forward_layers(_hidden(single, 2, 9), [SequenceSpan(bad, 11, 2)])
        with pytest.raises(CachePositionError):  # past the cache's max_length, after a good span
            part.forward_layers(_hidden(single, 3 + 8, 9), [SequenceSpan(good, 0, 3), SequenceSpan(bad, 10, 8)])
    for spans in ([SequenceSpan(a[0], 10, 2)], []):
        with pytest.raises(ValueError, match="tokens"):
            pipe.forward_layers(_hidden(single, 3, 9), spans)
    with pytest.raises(ValueError, match="new_cache"):
        pipe.forward_layers(_hidden(single, 2, 9), [SequenceSpan(single.new_cache(16), 0, 2)])
    assert pipe.remote_cache_count() == [base[0] + 1, base[1] + 1]  # nothing bad reached the later stages
    _twin_forward(pipe, single, _hidden(single, 5 + 4, 10), [(*a, 10, 5), (*b, 0, 4)])


@torch.no_grad()
def test_a_later_stage_failure_fails_only_its_batch(pipes, single):
    pipe = pipes[3]
    c = (pipe.new_cache(32), single.new_cache(32))
    _twin_forward(pipe, single, _hidden(single, 4, 17), [(*c, 0, 4)])
    c[0].commit(8)  # stage 0 now claims positions the later stages never saw: they refuse a write at 8
    with pytest.raises(RuntimeError, match="batch failed on stage 1: CachePositionError"):
        pipe.forward_layers(_hidden(single, 2, 18), [SequenceSpan(c[0], 8, 2)])
    assert c[0].length == 8  # cut back to the batch's start, as a failed ModelPart forward leaves it
    c[0].truncate(4)
    _twin_forward(pipe, single, _hidden(single, 3, 19), [(*c, 4, 3)])


@torch.no_grad()
def test_submit_collect_keeps_batches_in_flight(pipes, single):
    pipe = pipes[2]
    a, b = (pipe.new_cache(32), single.new_cache(32)), (pipe.new_cache(32), single.new_cache(32))
    batches = [(_hidden(single, 8 + 3, 11), [(*a, 0, 8), (*b, 0, 3)]),  # the second extends the first's caches
               (_hidden(single, 2 + 1, 12), [(*a, 8, 2), (*b, 3, 1)])]
    for hidden, spans in batches:
        pipe.submit(hidden, [SequenceSpan(p, start, n) for p, _, start, n in spans])
    with pytest.raises(RuntimeError, match="in flight"):
        pipe.submit(*batches[0])
    with pytest.raises(RuntimeError, match="in flight"):
        pipe.forward_layers(*batches[0])
    for hidden, spans in batches:
        want = single.forward_layers(hidden, [SequenceSpan(s, start, n) for _, s, start, n in spans])
        assert torch.equal(pipe.collect(), want)
    assert (a[0].length, b[0].length) == (10, 4)


@torch.no_grad()
def test_serves_as_the_cloud_middle_part(pipes, single):
    """SessionStore, MiddleWorker and the latency profile use it as they use a ModelPart."""
    pipe = pipes[2]
    assert pipe.kv_bytes_per_position == single.kv_bytes_per_position  # the budget covers every stage's layers
    store = SessionStore(pipe, max_sessions=4, idle_timeout_s=60, budget=KVBudget(pipe.kv_bytes_per_position, 1 << 30))
    session = store.open("s", "dev", b"owner", max_positions=48)
    assert isinstance(session.cache, PipelineCache) and session.cache.capacity == 48
    assert session.cache.nbytes == single.new_cache(48, preallocate=True).nbytes
    gc.collect()
    base = pipe.remote_cache_count()
    hidden = _hidden(single, 7, 13)
    job = ForwardJob(b"owner", make_header(pb.FORWARD, "s", start=0, num_tokens=7), hidden, session)
    [out] = MiddleWorker(pipe).run([job])
    assert torch.equal(out, single.forward_layers(hidden, [SequenceSpan(single.new_cache(48), 0, 7)]))
    assert pipe.remote_cache_count() == [base[0] + 1]
    store.close("s", b"owner")
    del session, job
    gc.collect()
    assert pipe.remote_cache_count() == base
    CloudLatencyModel().profile(pipe, repeats=1)


def test_stage_counts_are_validated(bundle, single):
    for stages in (0, -1, 5):  # 4 middle layers
        with pytest.raises(ValueError, match="stages"):
            load_pipelined_middle_part(bundle[1], "cpu", stages)
    with pytest.raises(ValueError, match="2 or more"):
        PipelinedPart(bundle[1], "cpu", PipelineConfig(stages=1))
    part, manifest = load_pipelined_middle_part(bundle[1], "cpu", 1)
    assert isinstance(part, ModelPart) and (part.first, part.last) == manifest.middle_layers


@torch.no_grad()
def test_a_killed_stage_makes_forward_raise_quickly(pipes, single):
    """Last in this module: it breaks the shared 3-stage pipeline (a fresh one would cost seconds to start)."""
    pipe = pipes[3]
    cache = pipe.new_cache(32)
    pipe.forward_layers(_hidden(single, 4, 14), [SequenceSpan(cache, 0, 4)])
    middle = pipe.pids[0]  # stage 1 of 0, 1, 2: its death reaches stage 0 through stage 2
    os.kill(middle, signal.SIGSTOP)  # stalled with a batch on its way, then killed while stage 0 waits for it
    pipe.submit(_hidden(single, 2, 15), [SequenceSpan(cache, 4, 2)])
    threading.Timer(0.3, os.kill, (middle, signal.SIGKILL)).start()
    began = time.monotonic()
    with pytest.raises(RuntimeError, match="unusable"):
        pipe.collect()
    assert time.monotonic() - began < 5
    with pytest.raises(RuntimeError, match="unusable"):
        pipe.forward_layers(_hidden(single, 1, 16), [SequenceSpan(cache, 6, 1)])
    began = time.monotonic()
    pipe.close()
    assert time.monotonic() - began < 2
    assert not any(proc.is_alive() for proc in pipe._procs)
    with pytest.raises(RuntimeError, match="unusable"):
        pipe.remote_cache_count()
