"""Data-plane messages: a protobuf header frame plus an optional raw tensor frame.

`encode` returns frames for `send_multipart(..., copy=False)`: the tensor frame is a view of the
tensor's own memory, not a copy. `decode` checks everything a peer could get wrong or forge before
any of it is used, and raises WireError with the code to reply with.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from google.protobuf.message import DecodeError

from .proto import hat_pb2 as pb

WIRE_VERSION = 1
MAX_ID_CHARS = 128  # default limit on session and device ids
TORCH_TO_WIRE = {torch.float32: pb.FLOAT32, torch.float16: pb.FLOAT16, torch.bfloat16: pb.BFLOAT16}
WIRE_TO_TORCH = {v: k for k, v in TORCH_TO_WIRE.items()}
TENSOR_KINDS = frozenset((pb.FORWARD, pb.RESULT))
KNOWN_KINDS = frozenset(pb.MessageKind.values()) - {pb.KIND_UNSPECIFIED}
# torch.frombuffer warns on read-only buffers (ZeroMQ frames are); decoded tensors are never written in place
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


class WireError(ValueError):
    """A message that cannot be accepted; `code` is the ErrorCode to answer with."""

    def __init__(self, code: int, message: str, header: "pb.DataHeader | None" = None, retry_after_ms: int = 0):
        super().__init__(message)
        self.code = code
        self.header = header  # the parsed header when the fault lies past it, so a reply can echo its sequence
        self.retry_after_ms = retry_after_ms  # OVERLOADED: when a retry may succeed (0 = it will not)


@dataclass(frozen=True, slots=True)
class WireLimits:
    max_header_bytes: int = 4096  # a header larger than this is refused before parsing
    max_tensor_bytes: int = 256 << 20  # largest tensor frame accepted
    max_session_id_chars: int = MAX_ID_CHARS  # longest session or device id


@dataclass(slots=True)
class DataMessage:
    header: pb.DataHeader
    tensor: torch.Tensor | None = None  # [num_tokens, hidden] for FORWARD and RESULT, else None
    # set by a receiver that times its traffic (the device's link), never sent:
    request_sent_s: float = 0.0  # receiver's perf_counter when it sent the request this message answers
    received_s: float = 0.0  # receiver's perf_counter when it read this message from the socket
    punctual: bool = False  # the receiver was waiting when it came, so received_s is its arrival time


def make_header(kind: int, session_id: str, sequence: int = 0, **fields) -> pb.DataHeader:
    return pb.DataHeader(version=WIRE_VERSION, kind=kind, session_id=session_id, sequence=sequence, **fields)


def encode(header: pb.DataHeader, tensor: torch.Tensor | None = None) -> list:
    """Frames for one message. Fills the header's dtype, shape and num_tokens from the tensor."""
    if tensor is None:
        return [header.SerializeToString()]
    if tensor.dtype not in TORCH_TO_WIRE:
        raise TypeError(f"cannot send dtype {tensor.dtype}")
    tensor = tensor.detach().contiguous().cpu()
    header.dtype = TORCH_TO_WIRE[tensor.dtype]
    del header.shape[:]
    header.shape.extend(tensor.shape)
    header.num_tokens = tensor.shape[0]
    return [header.SerializeToString(), tensor.reshape(-1).view(torch.uint8).numpy()]  # a view: no copy


def frame_bytes(frames: list) -> int:
    """Bytes a list of frames puts on the wire (payloads, without ZeroMQ's few bytes of framing)."""
    return sum(len(f.buffer if hasattr(f, "buffer") else f) for f in frames)


def decode(frames: list, limits: WireLimits = WireLimits()) -> DataMessage:
    """Parse and check [header] or [header, tensor] frames (bytes, memoryviews or zmq.Frame)."""
    buffers = [f.buffer if hasattr(f, "buffer") else f for f in frames]
    if not buffers:
        raise WireError(pb.MALFORMED, "expected 1 or 2 frames, got 0")
    if len(buffers[0]) > limits.max_header_bytes:
        raise WireError(pb.MALFORMED, f"header of {len(buffers[0])} bytes exceeds {limits.max_header_bytes}")
    header = pb.DataHeader()
    try:
        header.ParseFromString(bytes(buffers[0]))
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise WireError(pb.MALFORMED, f"undecodable header: {exc}") from None
    try:
        return _check(header, buffers, limits)
    except WireError as exc:
        exc.header = header
        raise


def _check(header: pb.DataHeader, buffers: list, limits: WireLimits) -> DataMessage:
    if len(buffers) > 2:
        raise WireError(pb.MALFORMED, f"expected 1 or 2 frames, got {len(buffers)}")
    if header.version != WIRE_VERSION:
        raise WireError(pb.MALFORMED, f"wire version {header.version}, expected {WIRE_VERSION}")
    if header.kind not in KNOWN_KINDS:
        raise WireError(pb.MALFORMED, f"unknown message kind {header.kind}")
    if len(header.session_id) > limits.max_session_id_chars or len(header.device_id) > limits.max_session_id_chars:
        raise WireError(pb.MALFORMED, f"session or device id longer than {limits.max_session_id_chars} characters")
    if header.kind not in TENSOR_KINDS:
        if len(buffers) != 1:
            raise WireError(pb.MALFORMED, f"{pb.MessageKind.Name(header.kind)} carries no tensor")
        return DataMessage(header)
    if len(buffers) != 2:
        raise WireError(pb.MALFORMED, f"{pb.MessageKind.Name(header.kind)} needs a tensor frame")
    return DataMessage(header, _decode_tensor(header, buffers[1], limits))


def _decode_tensor(header: pb.DataHeader, buffer, limits: WireLimits) -> torch.Tensor:
    if header.dtype not in WIRE_TO_TORCH:
        raise WireError(pb.BAD_TENSOR, f"unknown dtype {header.dtype}")
    dtype = WIRE_TO_TORCH[header.dtype]
    shape = list(header.shape)
    if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
        raise WireError(pb.BAD_TENSOR, f"tensor shape must be [tokens > 0, hidden > 0], got {shape}")
    if shape[0] != header.num_tokens:
        raise WireError(pb.BAD_TENSOR, f"num_tokens {header.num_tokens} disagrees with shape {shape}")
    nbytes = shape[0] * shape[1] * dtype.itemsize
    if nbytes > limits.max_tensor_bytes:
        raise WireError(pb.BAD_TENSOR, f"tensor of {nbytes} bytes exceeds the limit of {limits.max_tensor_bytes}")
    if len(buffer) != nbytes:
        raise WireError(pb.BAD_TENSOR, f"tensor frame has {len(buffer)} bytes, shape {shape} of {dtype} needs {nbytes}")
    return torch.frombuffer(buffer, dtype=dtype).view(shape[0], shape[1])


def error_header(request: pb.DataHeader | None, code: int, message: str, retry_after_ms: int = 0) -> pb.DataHeader:
    """An ERROR reply echoing what can be echoed of the request."""
    session = request.session_id[:MAX_ID_CHARS] if request is not None else ""
    sequence = request.sequence if request is not None else 0
    return make_header(pb.ERROR, session, sequence, error_code=code, error_message=message[:1000],
                       retry_after_ms=retry_after_ms)
