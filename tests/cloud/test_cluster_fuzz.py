"""Fuzzing every network-facing decoder of a disaggregated cloud.

Offline: `decode_cluster_header` and `decode_kv_layer` take arbitrary bytes, forged protobufs and
mutated valid messages and raise nothing but ClusterError; a KV layer encoded from a real KVCache
round-trips bit-exactly. Live (a router with one prefill and one decode worker, in this process):
garbage on the router's device-facing data socket is answered with an ERROR to its sender; garbage,
refused registrations, cluster messages the router does not take and replies to nothing on its worker
socket are dropped without registering anyone; garbage on a worker's KV socket is dropped. After each,
the cloud keeps serving a real device exactly (transformers' greedy tokens, KV handed off through the
same decode worker's KV socket).
"""
from __future__ import annotations

import random
import re
import time

import pytest
import torch
import zmq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from checkpoints import TOKENIZER_TEXT
from cluster import running_disaggregated
from hat.cloud.cluster_protocol import (MAX_CLUSTER_HEADER_BYTES, ClusterError, cluster_header,
                                        decode_cluster_header, decode_kv_layer, encode_cluster, encode_kv_layer)
from hat.common import wire
from hat.common.kv_cache import KVCache
from hat.common.proto import hat_pb2 as pb
from hat.common.wire import TORCH_TO_WIRE, WIRE_TO_TORCH, WIRE_VERSION
from hat.device.device_model import DeviceModel
from eight_devices import FAMILY, K, M, reference_tokens, registered_link
from fuzzing import mutate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
LAYOUT = (3, 2, 4)  # (num_layers, kv_heads, head_dim) of the offline KV caches
MAX_LENGTH = 12
REPLY_TIMEOUT_S = 5.0
NEW_TOKENS = 8

FUZZ = settings(max_examples=300, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
LIVE_FUZZ = settings(max_examples=120, deadline=None, database=None, derandomize=True,
                     suppress_health_check=list(HealthCheck))

# --------------------------------------------------------------------------------------- strategies

uint32 = st.integers(0, 2**32 - 1)
uint64 = st.integers(0, 2**64 - 1)
small = st.integers(0, 6)
floats = st.floats(allow_nan=True, allow_infinity=True)
metas = st.builds(pb.SessionMeta, session_id=st.one_of(st.just(""), st.text(max_size=20)),
                  device_id=st.text(max_size=12), owner=st.binary(max_size=8),
                  max_positions=st.one_of(small, uint32), ttft_slo_ms=uint32, tbt_slo_ms=uint32)
latencies = st.builds(pb.LatencyReply, base_us=floats, per_token_us=floats, per_token_context_ns=floats,
                      queue_us=floats, samples=uint32)
cluster_headers = st.builds(
    pb.ClusterHeader,
    version=st.one_of(st.just(WIRE_VERSION), uint32),
    kind=st.one_of(st.sampled_from(list(pb.ClusterKind.values())), st.integers(-2**31, 2**31 - 1)),
    worker_id=st.text(max_size=12), role=st.one_of(st.sampled_from(["prefill", "decode", "all", "router", ""]),
                                                   st.text(max_size=8)),
    kv_address=st.text(max_size=20), fingerprint=st.text(max_size=64),
    first_layer=st.one_of(small, uint32), last_layer=st.one_of(small, uint32), reason=st.text(max_size=20),
    session=metas, layer=st.one_of(small, uint32), num_layers=st.one_of(small, uint32),
    length=st.one_of(st.integers(0, MAX_LENGTH), uint32),
    dtype=st.one_of(st.sampled_from(list(pb.DType.values())), st.integers(-2**31, 2**31 - 1)),
    shape=st.one_of(st.lists(small, max_size=4), st.lists(uint32, max_size=4)),
    sessions=uint32, pending_tokens=uint64, kv_free_positions=uint64, latency=latencies, ok=st.booleans(),
    kv_bytes=uint64,
)




def filled_cache(dtype: torch.dtype, length: int, seed: int = 0, layout: tuple = LAYOUT,
                 max_length: int = MAX_LENGTH) -> KVCache:
    """A KVCache of `length` valid positions: random values plus signed zeros, infinities, NaN and subnormals."""
    num_layers, kv_heads, head_dim = layout
    cache = KVCache(num_layers, kv_heads, head_dim, dtype, max_length)
    g = torch.Generator().manual_seed(seed)
    cache.begin_write(0, length)
    for tensor in (cache.keys, cache.values):
        tensor.copy_((torch.randn(tensor.shape, generator=g) * 50).to(dtype))
        info = torch.finfo(dtype)
        specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), info.tiny / 4, info.max],
                                dtype=torch.float64).to(dtype)
        flat = tensor.view(-1)
        flat[: min(len(specials), flat.numel())] = specials[: flat.numel()]
    cache.commit(length)
    return cache


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def as_bytes(frames: list) -> list[bytes]:
    return [bytes(f) for f in frames]


def kv_message(dtype: torch.dtype, length: int, layer: int, session_id: str = "kv-session",
               layout: tuple = LAYOUT, max_length: int = MAX_LENGTH) -> list[bytes]:
    meta = pb.SessionMeta(session_id=session_id, device_id="dev", owner=b"\x00owner", max_positions=max_length)
    return as_bytes(encode_kv_layer(meta, filled_cache(dtype, length, layout=layout, max_length=max_length), layer))


VALID_HEADERS = [
    cluster_header(pb.WORKER_REGISTER, worker_id="decode-1", role="decode", kv_address="tcp://127.0.0.1:4000",
                   fingerprint="ab" * 32, first_layer=2, last_layer=5, kv_free_positions=4096,
                   latency=pb.LatencyReply(base_us=100.0, per_token_us=3.5, samples=4)),
    cluster_header(pb.HEARTBEAT, worker_id="prefill-1", role="prefill", sessions=3, pending_tokens=17),
    cluster_header(pb.WORKER_ACCEPTED),
    cluster_header(pb.WORKER_REFUSED, reason="wrong model"),
    cluster_header(pb.ADOPT, session=pb.SessionMeta(session_id="s", device_id="d", owner=b"o", max_positions=64)),
    cluster_header(pb.HANDOFF, session=pb.SessionMeta(session_id="s"), kv_address="tcp://127.0.0.1:4001"),
    cluster_header(pb.ADOPTED, session=pb.SessionMeta(session_id="s"), ok=True, kv_bytes=4096, length=9),
    cluster_header(pb.DROP, session=pb.SessionMeta(session_id="s")),
    cluster_header(pb.KV_LAYER, session=pb.SessionMeta(session_id="s"), layer=1, num_layers=3, length=5,
                   dtype=pb.FLOAT16, shape=[2, 5, 4]),
]
VALID_KV = {dtype: [kv_message(dtype, length, layer) for length in (0, 1, 7) for layer in (0, 2)] for dtype in DTYPES}


@st.composite
def header_bytes(draw) -> bytes:
    """Raw bytes, a forged ClusterHeader, or a mutated valid one."""
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return draw(st.binary(max_size=200))
    if choice == 1:
        return draw(cluster_headers).SerializeToString()
    if choice == 2:
        return (mutate(draw, [draw(st.sampled_from(VALID_HEADERS)).SerializeToString()]) or [b""])[0]
    return draw(st.binary(min_size=MAX_CLUSTER_HEADER_BYTES - 4, max_size=MAX_CLUSTER_HEADER_BYTES + 4))


@st.composite
def _forged_kv(draw, layout: tuple, dtype: torch.dtype) -> list:
    """A forged header (often right up to one field) with tensor frames sized for what it declares, or not."""
    header = draw(cluster_headers)
    if draw(st.booleans()):  # mostly right, so the checks past the header are reached
        header.version, header.kind = WIRE_VERSION, pb.KV_LAYER
        header.num_layers = draw(st.sampled_from([layout[0], header.num_layers]))
        header.dtype = TORCH_TO_WIRE[dtype] if draw(st.integers(0, 3)) else header.dtype
        if draw(st.booleans()):
            del header.shape[:]
            header.shape.extend([layout[1], header.length, layout[2]])
            header.layer = draw(st.sampled_from([0, layout[0] - 1, header.layer]))
            header.session.session_id = header.session.session_id or "forged"
    frames = [header.SerializeToString()]
    declared = draw(st.sampled_from([1, 2, 4]))  # bytes per element
    for dim in header.shape:
        declared *= dim
    for _ in range(draw(st.sampled_from([2, 2, 2, 0, 1, 3]))):
        size = draw(st.one_of(st.just(declared), st.integers(0, 64))) if declared <= 1 << 16 else draw(
            st.integers(0, 64))
        frames.append(bytes(size) if draw(st.booleans()) else draw(st.binary(min_size=size, max_size=size)))
    return frames


RETOUCHABLE = {
    "version": uint32, "kind": st.integers(-2**31, 2**31 - 1), "layer": st.one_of(small, uint32),
    "num_layers": st.one_of(small, uint32), "length": st.one_of(st.integers(0, 70), uint32),
    "dtype": st.integers(-2**31, 2**31 - 1), "shape": st.lists(st.one_of(small, uint32), max_size=4),
    "session_id": st.one_of(st.just(""), st.text(max_size=8)),
}


@st.composite
def _retouched_kv(draw, valid: list) -> list:
    """A valid layer with one to three header fields set to any value and tensor frames sized for what the header
    then declares (mostly): what a peer that gets exactly one thing wrong sends."""
    frames = draw(st.sampled_from(valid))
    header = pb.ClusterHeader.FromString(frames[0])
    for name in draw(st.permutations(sorted(RETOUCHABLE)))[:draw(st.integers(1, 3))]:
        value = draw(RETOUCHABLE[name])
        if name == "shape":
            del header.shape[:]
            header.shape.extend(value)
        elif name == "session_id":
            header.session.session_id = value
        else:
            setattr(header, name, value)
    declared = WIRE_TO_TORCH[header.dtype].itemsize if header.dtype in WIRE_TO_TORCH else 4
    for dim in header.shape:
        declared *= dim
    sizes = [declared if declared <= 1 << 14 and draw(st.integers(0, 3)) else draw(st.integers(0, 64))
             for _ in range(2)]
    filler = random.Random(draw(st.integers(0, 2**32 - 1)))  # bytes of any size without exhausting hypothesis' data
    return [header.SerializeToString(), *(filler.randbytes(n) for n in sizes)]


@st.composite
def _any_bits(draw, valid: list) -> list:
    """A valid layer carrying any bit patterns."""
    header, keys, _ = draw(st.sampled_from(valid))
    return [header, draw(st.binary(min_size=len(keys), max_size=len(keys))),
            draw(st.binary(min_size=len(keys), max_size=len(keys)))]


@st.composite
def _mutated_kv(draw, valid: list) -> list:
    return mutate(draw, draw(st.sampled_from(valid)), max_edits=3)


def kv_frames(layout: tuple = LAYOUT, dtype: torch.dtype = torch.float32, valid: list | None = None):
    """Frame lists aimed at decode_kv_layer: valid layers with any bits, valid layers with a few header fields
    retouched, mutated valid layers, forged headers with rightly or wrongly sized tensor frames, random frames."""
    valid = valid if valid is not None else VALID_KV[dtype]
    return st.one_of(_any_bits(valid), _retouched_kv(valid), _mutated_kv(valid), _forged_kv(layout, dtype),
                     st.lists(st.binary(max_size=300), max_size=5))


# --------------------------------------------------------------------------------------- offline: cluster header


def refusal(exc: ClusterError) -> str:
    """The kind of a refusal, for hypothesis' statistics (--hypothesis-show-statistics)."""
    return "refused: " + re.sub(r"\d+", "N", " ".join(str(exc).split()[:3]))


def header_never_crashes(frame) -> pb.ClusterHeader | None:
    try:
        header = decode_cluster_header(frame)
    except ClusterError as exc:
        assert str(exc)
        event(refusal(exc))
        return None
    event("decoded")
    assert header.version == WIRE_VERSION
    assert header.kind in pb.ClusterKind.values() and header.kind != pb.CLUSTER_UNSPECIFIED
    return header


@FUZZ
@given(header_bytes())
def test_fuzz_decode_cluster_header_raises_only_cluster_error(raw):
    """Any bytes (as bytes, memoryview or a zmq.Frame): a checked ClusterHeader or ClusterError, nothing else."""
    results = [header_never_crashes(frame) for frame in (raw, memoryview(raw), zmq.Frame(raw))]
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("header", VALID_HEADERS, ids=lambda h: pb.ClusterKind.Name(h.kind))
def test_valid_cluster_headers_round_trip(header):
    frames = encode_cluster(header)
    assert frames[0] == b""
    assert decode_cluster_header(frames[1]) == header


@pytest.mark.parametrize("raw, fragment", [
    (b"\xff" * 3, "undecodable"),
    (b"\xff" * (MAX_CLUSTER_HEADER_BYTES + 1), "exceeds"),
    (b"", "cluster wire version 0"),
    (pb.ClusterHeader(version=WIRE_VERSION + 1, kind=pb.HEARTBEAT).SerializeToString(), "wire version"),
    (pb.ClusterHeader(version=WIRE_VERSION).SerializeToString(), "unknown cluster message kind 0"),
    (pb.ClusterHeader(version=WIRE_VERSION, kind=99).SerializeToString(), "unknown cluster message kind 99"),
    # field 3 (worker_id, a string) holding bytes that are not UTF-8
    (pb.ClusterHeader(version=WIRE_VERSION, kind=pb.HEARTBEAT).SerializeToString() + b"\x1a\x02\xc3\x28",
     "undecodable"),
], ids=["garbage", "oversize", "empty", "version", "unspecified", "unknown-kind", "bad-utf8"])
def test_cluster_header_refusals(raw, fragment):
    with pytest.raises(ClusterError, match=fragment):
        decode_cluster_header(raw)


# --------------------------------------------------------------------------------------- offline: KV layers


def kv_never_crashes(frames: list, expect: tuple, dtype: torch.dtype) -> None:
    try:
        header, keys, values = decode_kv_layer(frames, expect, dtype)
    except ClusterError as exc:
        assert str(exc)
        event(refusal(exc))
        return
    event("decoded")
    num_layers, kv_heads, head_dim = expect
    assert header.kind == pb.KV_LAYER and header.num_layers == num_layers and header.layer < num_layers
    assert header.session.session_id
    for tensor in (keys, values):
        assert tensor.dtype == dtype and tuple(tensor.shape) == (kv_heads, header.length, head_dim)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("length", [0, 1, 7, MAX_LENGTH])
def test_kv_layer_round_trips_exactly(dtype, length):
    """Every layer of a real cache, sent as encode_kv_layer makes it (numpy views) and as received (bytes, zmq
    frames): the header says where it belongs, keys and values are bit-identical to the cache's valid positions."""
    cache = filled_cache(dtype, length, seed=length)
    meta = pb.SessionMeta(session_id="sess", device_id="dev", owner=b"\x00\x01", max_positions=MAX_LENGTH,
                          ttft_slo_ms=100, tbt_slo_ms=20)
    for layer in range(cache.num_layers):
        sent = encode_kv_layer(meta, cache, layer)
        for frames in (sent, as_bytes(sent), [zmq.Frame(bytes(f)) for f in sent], [memoryview(bytes(f)) for f in sent]):
            header, keys, values = decode_kv_layer(frames, LAYOUT, dtype)
            assert (header.kind, header.layer, header.num_layers, header.length) == (pb.KV_LAYER, layer, 3, length)
            assert header.session == meta
            assert keys.shape == values.shape == (LAYOUT[1], length, LAYOUT[2])
            assert torch.equal(bits(keys), bits(cache.keys[layer, :, :length]))
            assert torch.equal(bits(values), bits(cache.values[layer, :, :length]))


@st.composite
def kv_cases(draw) -> tuple[list, tuple, torch.dtype]:
    """(frames, layout, dtype) to decode: mostly for the layout and dtype the frames were made for."""
    dtype = draw(st.sampled_from(DTYPES))
    frames = draw(kv_frames(dtype=dtype))
    if draw(st.integers(0, 3)):
        return frames, LAYOUT, dtype
    return frames, draw(st.sampled_from([(3, 2, 8), (2, 2, 4), (3, 1, 4), (0, 0, 0)])), draw(st.sampled_from(DTYPES))


@FUZZ
@given(kv_cases())
def test_fuzz_decode_kv_layer_raises_only_cluster_error(case):
    """Random frame lists, forged headers with rightly or wrongly sized tensors, mutated valid layers, decoded for
    the right or a wrong layout and dtype: a consistent (header, keys, values) or ClusterError."""
    frames, expect, dtype = case
    kv_never_crashes(frames, expect, dtype)
    kv_never_crashes([memoryview(f) for f in frames], expect, dtype)


def consistent_kv(frames: list[bytes], expect: tuple, dtype: torch.dtype) -> bool:
    """What decode_kv_layer must accept, written out independently: a well-formed header naming a session and
    this part's layer count, a layer below it, this dtype and [kv_heads, length, head_dim], with two tensor frames
    of exactly that many bytes."""
    header = pb.ClusterHeader.FromString(frames[0])
    num_layers, kv_heads, head_dim = expect
    nbytes = kv_heads * header.length * head_dim * dtype.itemsize
    return (len(frames) == 3 and header.version == WIRE_VERSION and header.kind == pb.KV_LAYER
            and header.num_layers == num_layers and header.layer < num_layers and header.dtype in WIRE_TO_TORCH
            and WIRE_TO_TORCH[header.dtype] == dtype and list(header.shape) == [kv_heads, header.length, head_dim]
            and header.session.session_id != "" and all(len(f) == nbytes for f in frames[1:]))


@FUZZ
@given(st.sampled_from(DTYPES).flatmap(lambda dtype: st.tuples(st.just(dtype), _retouched_kv(VALID_KV[dtype]))))
def test_fuzz_kv_layer_is_accepted_exactly_when_consistent(case):
    """Valid layers with one to three header fields set to any value, tensor frames sized for what the header then
    declares: decoded exactly when consistent_kv says so (each check is there, and none too many), the tensors
    being the frames' bytes."""
    dtype, frames = case
    try:
        header, keys, values = decode_kv_layer(frames, LAYOUT, dtype)
    except ClusterError as exc:
        event(refusal(exc))
        assert not consistent_kv(frames, LAYOUT, dtype), f"refused a consistent layer: {exc}"
        return
    event("decoded")
    assert consistent_kv(frames, LAYOUT, dtype), f"accepted {header}"
    assert bytes(keys.contiguous().view(torch.uint8).reshape(-1).numpy()) == frames[1]
    assert bytes(values.contiguous().view(torch.uint8).reshape(-1).numpy()) == frames[2]


def test_kv_layer_refusals():
    frames = kv_message(torch.float32, 5, 1)
    cases = [
        (frames[:2], "3 frames"),
        ([*frames, b""], "3 frames"),
        ([cluster_header(pb.ADOPT).SerializeToString(), *frames[1:]], "expected KV_LAYER"),
        (frames, "layer 1 of 3; this part has 2"),  # decoded for a 2-layer part
        ([frames[0], frames[1][:-1], frames[2]], "needs 160"),
        ([frames[0], frames[1], frames[2] + b"\0"], "needs 160"),
    ]
    for i, (bad, fragment) in enumerate(cases):
        with pytest.raises(ClusterError, match=fragment):
            decode_kv_layer(bad, (2, 2, 4) if i == 3 else LAYOUT, torch.float32)
    with pytest.raises(ClusterError, match="KV dtype"):
        decode_kv_layer(frames, LAYOUT, torch.float16)
    with pytest.raises(ClusterError, match="KV shape"):
        decode_kv_layer(frames, (3, 2, 2), torch.float32)
    header = decode_cluster_header(frames[0])
    header.session.session_id = ""
    with pytest.raises(ClusterError, match="named session"):
        decode_kv_layer([header.SerializeToString(), *frames[1:]], LAYOUT, torch.float32)
    header.session.session_id, header.layer = "s", 3
    with pytest.raises(ClusterError, match="layer 3 of 3"):
        decode_kv_layer([header.SerializeToString(), *frames[1:]], LAYOUT, torch.float32)


# --------------------------------------------------------------------------------------- live cloud


@pytest.fixture(scope="module")
def cloud(tiny_checkpoint, tmp_path_factory, one_torch_thread):
    """A router ("always": every session's KV moves to the decode worker at its first round) with one prefill and
    one decode worker, and a prompt with transformers' greedy continuation."""
    model_dir = tiny_checkpoint(FAMILY)
    with running_disaggregated(model_dir, K, M, tmp_path_factory.mktemp("cluster-fuzz"), prefill=1, decode=1,
                               router_overrides={"disaggregation": "always"}, profile_on_start=False,
                               handoff_timeout_s=1.0) as cluster:
        prompt = DeviceModel.load(cluster.device_dir).tokenizer(TOKENIZER_TEXT)["input_ids"][3:20]
        cluster.prompt = prompt
        cluster.reference = reference_tokens(model_dir, [prompt], NEW_TOKENS)[0]
        hidden_size = cluster.workers[0].worker.part.spec.hidden_size
        cluster.probe_hidden = torch.randn(5, hidden_size, generator=torch.Generator().manual_seed(3))
        cluster.probe_want = probe_forward(cluster, "probe-baseline")
        yield cluster


def probe_forward(cluster, session_id: str) -> torch.Tensor:
    """Open a session on a freshly registered link, forward the probe hidden states, close: the result."""
    with registered_link((cluster.data_port, cluster.control_port), cluster.device_dir, f"dev-{session_id}") as link:
        assert link.open_session(session_id, 32).header.kind == pb.OPENED
        result = link.forward(session_id, 0, cluster.probe_hidden).tensor.clone()
        assert link.close_session(session_id).header.kind == pb.CLOSED
    return result


def assert_still_serving(cluster, tag: str) -> None:
    """The router and every worker alive; a new session computes what it did before the garbage, and a whole
    generation (prefill on one worker, KV over the decode worker's KV socket, decode there) is exact."""
    router = cluster.server
    assert router._thread.is_alive()
    assert all(w._thread.is_alive() for w in cluster.workers)
    handoffs, failures = router.counters.handoffs, router.counters.handoff_failures
    assert torch.equal(probe_forward(cluster, f"probe-{tag}"), cluster.probe_want)
    with cluster.generator(device_id=f"gen-{tag}") as gen:
        gen.speculation = None
        result = gen.generate_ids(cluster.prompt, NEW_TOKENS)
    assert result.token_ids == cluster.reference and result.recoveries == 0
    # both sessions' KV went through the decode worker's KV socket at their first round
    assert router.counters.handoffs == handoffs + 2 and router.counters.handoff_failures == failures


class RawPeer:
    """A raw ZeroMQ socket of `kind` connected to `address`; every receive is bounded."""

    def __init__(self, kind: int, address: str, routing_id: bytes | None = None):
        self.context = zmq.Context()
        self.socket = self.context.socket(kind)
        self.socket.setsockopt(zmq.LINGER, 0)
        if routing_id is not None:
            self.socket.setsockopt(zmq.ROUTING_ID, routing_id)
        self.socket.connect(address)

    def send(self, frames: list) -> None:
        self.socket.send_multipart([bytes(f) for f in frames])

    def recv(self, timeout_s: float) -> list[bytes] | None:
        if not self.socket.poll(timeout_s * 1000, zmq.POLLIN):
            return None
        return self.socket.recv_multipart()

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


def device_messages():
    """What a device-facing socket may get: random frames, forged data headers (with random tensor frames) and
    mutated valid requests. None of it names a registered device or an open session of its sender."""
    def valid() -> list[list[bytes]]:
        hidden = torch.randn(2, 8)
        return [as_bytes(wire.encode(wire.make_header(pb.OPEN, "fz", 1, device_id="unregistered", max_positions=8))),
                as_bytes(wire.encode(wire.make_header(pb.CLOSE, "fz", 2))),
                as_bytes(wire.encode(wire.make_header(pb.FORWARD, "fz", 3, start=0), hidden)),
                as_bytes(wire.encode(wire.make_header(pb.RESULT, "fz", 4), hidden))]

    forged_headers = st.builds(
        pb.DataHeader, version=st.one_of(st.just(WIRE_VERSION), uint32),
        kind=st.one_of(st.sampled_from(list(pb.MessageKind.values())), st.integers(0, 2**31 - 1)),
        session_id=st.text(max_size=20), sequence=uint64, start=uint64, num_tokens=st.one_of(small, uint32),
        dtype=st.one_of(st.sampled_from(list(pb.DType.values())), st.integers(0, 2**31 - 1)),
        shape=st.one_of(st.lists(small, max_size=3), st.lists(uint32, max_size=3)),
        device_id=st.text(max_size=12), append_only=st.booleans(), max_positions=uint32)

    @st.composite
    def forged(draw):
        frames = [draw(forged_headers).SerializeToString()]
        frames += draw(st.lists(st.binary(max_size=128), max_size=2))
        return frames

    @st.composite
    def mutated(draw):
        return mutate(draw, draw(st.sampled_from(valid()))) or [b""]

    return st.one_of(st.lists(st.binary(max_size=300), min_size=1, max_size=4), forged(), mutated(),
                     st.just([b""]), st.just([b"", b""]))


def test_router_answers_garbage_on_its_data_socket_with_errors(cloud):
    """Garbage from a raw DEALER on the router's data socket: every message gets one ERROR reply (with a code),
    counted; the router keeps serving real devices exactly."""
    router = cloud.server
    errors = router.counters.errors
    peer = RawPeer(zmq.DEALER, f"tcp://127.0.0.1:{cloud.data_port}")
    sent = []
    try:
        @LIVE_FUZZ
        @given(device_messages())
        def send_garbage(frames):
            peer.send(frames)
            sent.append(frames)
            reply = peer.recv(REPLY_TIMEOUT_S)
            assert reply is not None, f"no reply to {frames!r}"
            message = wire.decode(reply)
            assert message.header.kind == pb.ERROR, message.header
            assert message.header.error_code != pb.ERROR_UNSPECIFIED and message.header.error_message
            event(pb.ErrorCode.Name(message.header.error_code))
            assert peer.recv(0) is None  # one reply per message

        send_garbage()
    finally:
        peer.close()
    assert router.counters.errors == errors + len(sent)
    assert_still_serving(cloud, "after-data-garbage")


def worker_announcement(router, kind: int = pb.WORKER_REGISTER, **fields) -> bytes:
    """A REGISTER or HEARTBEAT as a worker serving the router's own bundle would send it (then `fields`)."""
    m = router.manifest
    values = dict(worker_id="impostor", role="decode", kv_address="tcp://127.0.0.1:9", fingerprint=m.source_fingerprint,
                  first_layer=m.middle_layers[0], last_layer=m.middle_layers[1], kv_free_positions=0)
    return cluster_header(kind, **{**values, **fields}).SerializeToString()


def workers_of(router) -> set[bytes]:
    return set(list(router.table.workers))


def test_router_drops_garbage_on_its_worker_socket(cloud):
    """A raw DEALER pretending to be a worker: garbage, registrations and heartbeats of another checkpoint, layer
    range or role (answered WORKER_REFUSED) or wire version, cluster messages the router does not take, ADOPTED for
    unknown sessions and data replies from an unregistered worker never crash the router nor register anyone. A
    valid registration is accepted; replies for unknown sequences from it are dropped; once silent it is
    forgotten."""
    router = cloud.server
    real = workers_of(router)
    assert len(real) == 2
    impostor_id = b"fuzz-impostor"
    peer = RawPeer(zmq.DEALER, router.worker_address, routing_id=impostor_id)
    sessions = pb.SessionMeta(session_id="no-such-session", device_id="d", owner=b"o")
    data_reply = wire.make_header(pb.RESULT, "", 987654, start=0)
    try:
        def expect_refused(frames, fragment: str) -> None:
            peer.send(frames)
            reply = peer.recv(REPLY_TIMEOUT_S)
            assert reply is not None and reply[0] == b"", reply
            header = decode_cluster_header(reply[1])
            assert header.kind == pb.WORKER_REFUSED and fragment in header.reason, header
            assert workers_of(router) == real

        expect_refused([b"", worker_announcement(router, pb.HEARTBEAT, fingerprint="0" * 64)], "checkpoint 000000000000")
        expect_refused([b"", worker_announcement(router, first_layer=0, last_layer=99)], "layers [0, 99)")
        expect_refused([b"", worker_announcement(router, role="all")], "role 'all'")
        expect_refused([b"", worker_announcement(router, role="")], "role ''")

        dropped = [
            [b"", b"garbage"],
            [b"", b"\xff" * (MAX_CLUSTER_HEADER_BYTES + 1)],
            [b""],
            [b"", b""],
            [b"", worker_announcement(router), b"extra"],  # a valid REGISTER in a 3-frame cluster message
            [b"", pb.ClusterHeader(version=WIRE_VERSION + 1, kind=pb.WORKER_REGISTER).SerializeToString()],
            [b"", pb.ClusterHeader(version=WIRE_VERSION, kind=77, role="decode").SerializeToString()],
            [b"", cluster_header(pb.ADOPTED, session=sessions, ok=True, kv_bytes=10, length=3).SerializeToString()],
            [b"", cluster_header(pb.ADOPTED, session=sessions, ok=False, reason="x").SerializeToString()],
            *([b"", cluster_header(kind, session=sessions, kv_address="tcp://127.0.0.1:9").SerializeToString()]
              for kind in (pb.ADOPT, pb.HANDOFF, pb.DROP, pb.WORKER_ACCEPTED, pb.WORKER_REFUSED, pb.KV_LAYER)),
            # data replies from a worker that is not registered
            [b"some-device", data_reply.SerializeToString(), b"\0" * 16],
            [b"some-device", b"\xff\xff"],
            [b"some-device"],
        ]
        for frames in dropped:
            peer.send(frames)
        errors_before = router.counters.errors

        @LIVE_FUZZ
        @given(st.one_of(st.lists(st.binary(max_size=200), min_size=1, max_size=4),
                         st.builds(lambda h: [b"", h.SerializeToString()], cluster_headers),
                         st.builds(lambda raw: [b"", raw], header_bytes())))
        def send_garbage(frames):
            peer.send(frames)
            try:  # a REGISTER or HEARTBEAT of a worker the router does not know is answered, the rest dropped
                refused = len(frames) == 2 and frames[0] == b"" and decode_cluster_header(frames[1]).kind in (
                    pb.WORKER_REGISTER, pb.HEARTBEAT)
            except ClusterError:
                refused = False
            event("refused" if refused else "dropped")
            if refused:
                reply = peer.recv(REPLY_TIMEOUT_S)
                assert reply is not None and decode_cluster_header(reply[1]).kind == pb.WORKER_REFUSED
            assert workers_of(router) == real

        send_garbage()
        # a REGISTER with a wrong fingerprint after all that: still answered (the router read everything in order)
        expect_refused([b"", worker_announcement(router, fingerprint="f" * 64)], "checkpoint ffffffffffff")
        assert peer.recv(0.2) is None  # garbage is dropped without a word
        assert router._thread.is_alive()
        assert router.counters.errors == errors_before  # no ERROR went to devices for a worker's garbage
        assert_still_serving(cloud, "after-worker-garbage")

        # a valid registration (no KV room, so no session goes to it) is accepted; what it sends then is dropped
        peer.send([b"", worker_announcement(router)])
        reply = peer.recv(REPLY_TIMEOUT_S)
        assert reply is not None and decode_cluster_header(reply[1]).kind == pb.WORKER_ACCEPTED
        assert workers_of(router) == real | {impostor_id}
        assert router.table.workers[impostor_id].role == "decode"
        for frames in ([b"some-device", data_reply.SerializeToString(), b"\0" * 16],  # a reply to nothing
                       [b"some-device", wire.error_header(data_reply, pb.BAD_TENSOR, "x").SerializeToString()],
                       [b"some-device", b"\xff\xff\xff"],  # undecodable
                       [b"some-device"],
                       [b"", cluster_header(pb.ADOPTED, session=sessions, ok=True, kv_bytes=99).SerializeToString()],
                       [b"", b"garbage"]):
            peer.send(frames)
        assert_still_serving(cloud, "with-impostor")  # (counting only the real handoffs: the forged ADOPTED is ignored)
        assert router.counters.handoff_bytes % cloud.workers[0].worker.part.kv_bytes_per_position == 0
        # silent from now on: taken for dead after the router's worker timeout, the real workers stay
        deadline = time.monotonic() + 10
        while impostor_id in workers_of(router) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert workers_of(router) == real
    finally:
        peer.close()


def test_worker_drops_garbage_on_its_kv_socket(cloud):
    """A raw PUSH on the decode worker's KV socket: each message that is not a KV layer for this part is dropped
    (counted as an error), a well-formed layer for a session nobody adopts waits and is given up after the handoff
    timeout; the worker keeps adopting real handoffs exactly."""
    decode = cloud.workers[1]
    layout, dtype = decode.agent._kv_layout, decode.store.part.dtype
    valid = [kv_message(dtype, length, layer, session_id=f"stray-{length}-{layer}", layout=layout, max_length=64)
             for length in (0, 3, 9) for layer in range(layout[0])]
    errors = decode.stats.errors
    expected_errors, strays = 0, set()
    peer = RawPeer(zmq.PUSH, decode.kv_address)
    try:
        @LIVE_FUZZ
        @given(st.one_of(kv_frames(layout=layout, dtype=dtype, valid=valid), st.sampled_from(valid)))
        def send_garbage(frames):
            nonlocal expected_errors
            if not frames:
                return  # ZeroMQ sends no message of no frames
            try:
                header, _, _ = decode_kv_layer(frames, layout, dtype)
                strays.add(header.session.session_id)
                event("a well-formed layer")
            except ClusterError as exc:
                expected_errors += 1
                event(refusal(exc))
            peer.send(frames)

        send_garbage()
        deadline = time.monotonic() + 10
        while decode.stats.errors < errors + expected_errors and time.monotonic() < deadline:
            time.sleep(0.02)
        assert expected_errors > 0 and strays
        assert decode.stats.errors == errors + expected_errors
        assert decode._thread.is_alive()
        # layers of sessions nobody adopts are given up after the handoff timeout (1 s here)
        deadline = time.monotonic() + 10
        while set(decode.agent.incoming) & strays and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not set(decode.agent.incoming) & strays
        assert len(decode.store) == 0 and decode.budget.used_blocks == 0
    finally:
        peer.close()
    assert_still_serving(cloud, "after-kv-garbage")
