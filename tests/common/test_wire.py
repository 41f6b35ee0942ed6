"""The data-plane codec (hat.common.wire): bit-exact round trips, every refusal with its ErrorCode,
and a fuzz test that nothing a peer can send makes `decode` raise anything but WireError."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzzing import mutate
from hat.common import wire
from hat.common.proto import hat_pb2 as pb
from hat.common.wire import WIRE_VERSION, WireError, WireLimits

HIDDEN = 8
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

# --------------------------------------------------------------------------------------- helpers


def special_tensor(dtype: torch.dtype, rows: int = 5, seed: int = 0) -> torch.Tensor:
    """Random values plus the ones a lossy codec would get wrong: signed zeros, inf, nan, subnormals, extremes."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(rows, HIDDEN, generator=g) * 100).to(dtype)
    info = torch.finfo(dtype)
    specials = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), info.tiny, info.tiny / 4, info.max, info.min,
                info.eps, -info.tiny / 2, 1.0, -1.0]
    flat = t.view(-1)
    flat[: len(specials)] = torch.tensor(specials, dtype=torch.float64).to(dtype)
    return t


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def as_bytes(frames: list) -> list[bytes]:
    return [bytes(f) for f in frames]


def forward_frames(rows: int = 3, hidden: int = HIDDEN, dtype: torch.dtype = torch.float32, **fields) -> list[bytes]:
    header = wire.make_header(pb.FORWARD, "sess", 7, start=0, **fields)
    return as_bytes(wire.encode(header, torch.ones(rows, hidden, dtype=dtype)))


def retouch(frames: list[bytes], **fields) -> list[bytes]:
    """Frames with header fields overwritten after encoding (what a forger could send)."""
    header = pb.DataHeader()
    header.ParseFromString(frames[0])
    for name, value in fields.items():
        if name == "shape":
            del header.shape[:]
            header.shape.extend(value)
        else:
            setattr(header, name, value)
    return [header.SerializeToString(), *frames[1:]]


def refused(frames: list, code: int, fragment: str, limits: WireLimits = WireLimits()) -> WireError:
    with pytest.raises(WireError) as info:
        wire.decode(frames, limits)
    assert info.value.code == code, f"{pb.ErrorCode.Name(info.value.code)} ({info.value}), expected {pb.ErrorCode.Name(code)}"
    assert fragment in str(info.value), str(info.value)
    return info.value


# --------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_bit_exact(dtype):
    tensor = special_tensor(dtype)
    header = wire.make_header(pb.FORWARD, "session-1", 42, start=17, return_last=1)
    frames = wire.encode(header, tensor)
    assert len(frames) == 2
    assert len(frames[1]) == tensor.numel() * tensor.element_size()
    for frames_in in (frames, as_bytes(frames)):  # memoryviews as sent, bytes as received
        message = wire.decode(frames_in)
        h = message.header
        assert (h.version, h.kind, h.session_id, h.sequence, h.start, h.return_last) == (
            WIRE_VERSION, pb.FORWARD, "session-1", 42, 17, 1)
        assert h.dtype == wire.TORCH_TO_WIRE[dtype] and list(h.shape) == [5, HIDDEN] and h.num_tokens == 5
        assert message.tensor.dtype == dtype and message.tensor.shape == (5, HIDDEN)
        assert torch.equal(bits(message.tensor), bits(tensor))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_of_a_non_contiguous_tensor(dtype):
    tensor = special_tensor(dtype, rows=HIDDEN).t()  # transposed view: encode must make it contiguous
    message = wire.decode(as_bytes(wire.encode(wire.make_header(pb.RESULT, "s"), tensor)))
    assert torch.equal(bits(message.tensor), bits(tensor))


def test_round_trip_without_tensor():
    header = wire.make_header(pb.OPEN, "s" * 128, 3, device_id="d" * 128)
    frames = wire.encode(header)
    assert len(frames) == 1
    message = wire.decode(frames)
    assert message.tensor is None and message.header == header


def test_encode_refuses_other_dtypes():
    with pytest.raises(TypeError):
        wire.encode(wire.make_header(pb.FORWARD, "s"), torch.ones(2, 2, dtype=torch.float64))


def test_error_header_echoes_the_request():
    request = wire.make_header(pb.FORWARD, "abc", 9)
    header = wire.error_header(request, pb.BAD_POSITION, "x" * 5000)
    assert (header.kind, header.session_id, header.sequence, header.error_code) == (pb.ERROR, "abc", 9, pb.BAD_POSITION)
    assert len(header.error_message) <= 1000
    anonymous = wire.error_header(None, pb.MALFORMED, "bad")
    assert (anonymous.session_id, anonymous.sequence) == ("", 0)
    assert wire.decode(wire.encode(header)).header == header


# --------------------------------------------------------------------------------------- refusals


def test_too_few_and_too_many_frames():
    frames = forward_frames()
    refused([], pb.MALFORMED, "expected 1 or 2 frames, got 0")
    refused([*frames, b"extra"], pb.MALFORMED, "expected 1 or 2 frames, got 3")


def test_oversize_header_is_refused_before_parsing():
    limits = WireLimits(max_header_bytes=64)
    header = wire.make_header(pb.OPEN, "s" * 100, device_id="d")
    refused([header.SerializeToString()], pb.MALFORMED, "exceeds 64", limits)
    refused([b"\xff" * 5000], pb.MALFORMED, "exceeds 4096")  # garbage too large to be worth parsing


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff", b"garbage!", b"\x08", b"\x12\x05ab"], ids=repr)
def test_garbage_header_bytes(garbage):
    refused([garbage], pb.MALFORMED, "undecodable header")


def test_invalid_utf8_session_id_is_undecodable():
    # field 3 (session_id, string) holding bytes that are not UTF-8
    raw = pb.DataHeader(version=WIRE_VERSION, kind=pb.OPEN).SerializeToString() + b"\x1a\x02\xc3\x28"
    refused([raw], pb.MALFORMED, "undecodable header")


@pytest.mark.parametrize("version", [0, WIRE_VERSION + 1, 2**32 - 1])
def test_wrong_version(version):
    refused(retouch(forward_frames(), version=version), pb.MALFORMED, f"wire version {version}")


@pytest.mark.parametrize("kind", [pb.KIND_UNSPECIFIED, 8, 99, 2**31 - 1])
def test_unknown_kind(kind):
    refused([pb.DataHeader(version=WIRE_VERSION, kind=kind, session_id="s").SerializeToString()], pb.MALFORMED,
            f"unknown message kind {kind}")


@pytest.mark.parametrize("kind", [pb.FORWARD, pb.RESULT])
def test_tensor_kind_without_tensor(kind):
    header = wire.make_header(kind, "s", num_tokens=1, dtype=pb.FLOAT32, shape=[1, HIDDEN])
    refused([header.SerializeToString()], pb.MALFORMED, "needs a tensor frame")


@pytest.mark.parametrize("kind", [pb.OPEN, pb.CLOSE, pb.OPENED, pb.ERROR, pb.CLOSED])
def test_non_tensor_kind_with_tensor(kind):
    header = wire.make_header(kind, "s")
    refused([header.SerializeToString(), b"\0" * 4 * HIDDEN], pb.MALFORMED, "carries no tensor")
    refused([header.SerializeToString(), b""], pb.MALFORMED, "carries no tensor")


@pytest.mark.parametrize("dtype", [pb.DTYPE_UNSPECIFIED, 4, 77])
def test_unknown_dtype(dtype):
    refused(retouch(forward_frames(), dtype=dtype), pb.BAD_TENSOR, f"unknown dtype {dtype}")


@pytest.mark.parametrize("shape", [[], [3 * HIDDEN], [3, HIDDEN, 1], [1, 3, HIDDEN]], ids=str)
def test_shape_rank_must_be_two(shape):
    refused(retouch(forward_frames(), shape=shape), pb.BAD_TENSOR, "tensor shape must be")


@pytest.mark.parametrize("shape", [[0, HIDDEN], [3, 0], [0, 0]], ids=str)
def test_zero_dims(shape):
    refused(retouch(forward_frames(), shape=shape, num_tokens=shape[0]), pb.BAD_TENSOR, "tensor shape must be")
    refused(retouch(forward_frames(), shape=shape, num_tokens=shape[0])[:1] + [b""], pb.BAD_TENSOR,
            "tensor shape must be")


@pytest.mark.parametrize("num_tokens", [0, 2, 4, 2**32 - 1])
def test_num_tokens_disagrees_with_shape(num_tokens):
    refused(retouch(forward_frames(rows=3), num_tokens=num_tokens), pb.BAD_TENSOR,
            f"num_tokens {num_tokens} disagrees with shape")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_byte_count_mismatch(dtype):
    frames = forward_frames(rows=3, dtype=dtype)
    needs = 3 * HIDDEN * dtype.itemsize
    refused([frames[0], frames[1][:-1]], pb.BAD_TENSOR, f"has {needs - 1} bytes")
    refused([frames[0], frames[1] + b"\0"], pb.BAD_TENSOR, f"has {needs + 1} bytes")
    refused([frames[0], b""], pb.BAD_TENSOR, "has 0 bytes")
    other = {torch.float32: pb.FLOAT16, torch.float16: pb.FLOAT32, torch.bfloat16: pb.FLOAT32}[dtype]
    refused(retouch(frames, dtype=other), pb.BAD_TENSOR, "needs")  # right bytes for the wrong dtype


def test_over_max_tensor_bytes():
    limits = WireLimits(max_tensor_bytes=3 * HIDDEN * 4 - 1)
    refused(forward_frames(rows=3), pb.BAD_TENSOR, "exceeds the limit", limits)
    assert wire.decode(forward_frames(rows=3), WireLimits(max_tensor_bytes=3 * HIDDEN * 4)).tensor.shape == (3, HIDDEN)
    # a huge declared shape is refused on the declaration, without a frame of that size
    huge = retouch(forward_frames(rows=3), shape=[2**32 - 1, 2**32 - 1], num_tokens=2**32 - 1)
    refused(huge, pb.BAD_TENSOR, "exceeds the limit")


@pytest.mark.parametrize("field", ["session_id", "device_id"])
def test_overlong_ids(field):
    limits = WireLimits()
    def header(value: str) -> pb.DataHeader:
        fields = {"session_id": "s", "device_id": "d", field: value}
        return pb.DataHeader(version=WIRE_VERSION, kind=pb.OPEN, **fields)

    ok = header("x" * limits.max_session_id_chars)
    assert wire.decode([ok.SerializeToString()]).header == ok
    long = header("x" * (limits.max_session_id_chars + 1))
    refused([long.SerializeToString()], pb.MALFORMED, "longer than 128 characters")
    # counted in characters, not bytes: 128 four-byte characters pass
    wide = header("\U0001F600" * limits.max_session_id_chars)
    assert wire.decode([wide.SerializeToString()]).header == wide


def test_decode_accepts_zmq_frames():
    zmq = pytest.importorskip("zmq")
    frames = [zmq.Frame(bytes(f)) for f in wire.encode(wire.make_header(pb.FORWARD, "s"), special_tensor(torch.float16))]
    assert torch.equal(bits(wire.decode(frames).tensor), bits(special_tensor(torch.float16)))


# --------------------------------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=2000, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
SMALL_LIMITS = WireLimits(max_header_bytes=512, max_tensor_bytes=4096, max_session_id_chars=16)


def decode_never_crashes(frames: list, limits: WireLimits = WireLimits()) -> None:
    try:
        message = wire.decode(frames, limits)
    except WireError as exc:
        assert exc.code in pb.ErrorCode.values() and exc.code != pb.ERROR_UNSPECIFIED
        assert str(exc)
        return
    assert isinstance(message, wire.DataMessage)
    if message.header.kind in wire.TENSOR_KINDS:
        assert message.tensor is not None and message.tensor.dim() == 2
        assert message.tensor.shape[0] == message.header.num_tokens
    else:
        assert message.tensor is None


uint32 = st.integers(0, 2**32 - 1)
uint64 = st.integers(0, 2**64 - 1)
headers = st.builds(
    pb.DataHeader,
    version=st.one_of(st.just(WIRE_VERSION), uint32),
    kind=st.one_of(st.sampled_from(list(pb.MessageKind.values())), st.integers(0, 2**31 - 1)),
    session_id=st.text(max_size=40), sequence=uint64, start=uint64,
    num_tokens=st.one_of(st.integers(0, 6), uint32),
    dtype=st.one_of(st.sampled_from(list(pb.DType.values())), st.integers(0, 2**31 - 1)),
    shape=st.one_of(st.lists(st.integers(0, 6), max_size=3), st.lists(uint32, max_size=3)),
    return_last=uint32, device_id=st.text(max_size=40),
    error_code=st.integers(0, 2**31 - 1), error_message=st.text(max_size=20),
)


@st.composite
def forged(draw):
    """Well-formed protobuf with any field values, with no, random or zero-filled tensor frames."""
    frames = [draw(headers).SerializeToString()]
    tensor = draw(st.one_of(st.none(), st.binary(max_size=200), st.integers(0, 200)))
    if isinstance(tensor, bytes):
        frames.append(tensor)
    elif isinstance(tensor, int):
        frames.append(bytes(tensor))
    return frames


def _valid_messages() -> list[list[bytes]]:
    out = [as_bytes(wire.encode(wire.make_header(kind, "session", 5, device_id="dev"))) for kind in
           (pb.OPEN, pb.CLOSE, pb.OPENED, pb.CLOSED)]
    out.append(as_bytes(wire.encode(wire.error_header(wire.make_header(pb.FORWARD, "s", 3), pb.BAD_TENSOR, "no"))))
    for dtype in DTYPES:
        for kind in wire.TENSOR_KINDS:
            out.append(as_bytes(wire.encode(wire.make_header(kind, "sess", 4, start=9, return_last=1),
                                            special_tensor(dtype, rows=2))))
    return out


VALID = _valid_messages()


@st.composite
def mutated(draw):
    return mutate(draw, draw(st.sampled_from(VALID)))


@FUZZ
@given(st.one_of(st.lists(st.binary(max_size=600), max_size=4), forged(), mutated()), st.booleans())
def test_fuzz_decode_raises_only_wire_error(frames, small):
    """Random frame lists, forged headers and mutated valid messages: a DataMessage or a WireError, nothing else."""
    decode_never_crashes(frames, SMALL_LIMITS if small else WireLimits())
    decode_never_crashes([memoryview(f) for f in frames])
