"""The cloud-only baseline's wire format (testbed/cloud_only.py): token ids up, token ids down.

Every message is one ZeroMQ frame, little-endian: a 6-byte header (magic b"HATC", version u8, kind u8) and a
body whose length is checked exactly:

  REQUEST  client -> server  request_id u64, max_new_tokens u32, count u32, then count prompt token ids (u32)
  TOKEN    server -> client  request_id u64, token_id u32, index u32 (0 = the first new token), final u8 (0 or 1)
  ERROR    server -> client  request_id u64, length u32, then `length` bytes of UTF-8 text (at most MAX_ERROR_BYTES)

`decode` is strict: whatever it accepts re-encodes to the same bytes, and everything else raises
ProtocolError (never another exception), with the request id when the message got that far. `request_tokens`
is a client's blocking call: one REQUEST out, its TOKEN stream (or ERROR) back.
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass

MAGIC = b"HATC"
VERSION = 1
REQUEST, TOKEN, ERROR = 1, 2, 3  # message kinds
MAX_ERROR_BYTES = 4096  # longest ERROR text
_HEADER = struct.Struct("<4sBB")
_REQUEST = struct.Struct("<QII")
_TOKEN = struct.Struct("<QIIB")
_ERROR = struct.Struct("<QI")
_U32 = 1 << 32


class ProtocolError(ValueError):
    """A message that is not a well-formed cloud-only message (or not one this peer accepts)."""

    def __init__(self, message: str, request_id: int = 0):
        super().__init__(message)
        self.request_id = request_id  # the offending request's id, 0 when the message did not name one


@dataclass(frozen=True, slots=True)
class ProtocolLimits:
    max_prompt_tokens: int = 1 << 20  # longest prompt accepted (the server: its model's context less one)
    vocab_size: int = _U32  # token ids must be below this (the server: its model's vocabulary)


@dataclass(frozen=True, slots=True)
class Request:
    request_id: int  # chosen by the client, unique among its active requests
    max_new_tokens: int  # generation budget, at least 1
    prompt: tuple[int, ...]  # prompt token ids, at least one


@dataclass(frozen=True, slots=True)
class Token:
    request_id: int
    token_id: int  # the generated token
    index: int  # its place in the generation (0, 1, ...)
    final: bool  # the generation's last token (a stop id, the budget or the context reached)


@dataclass(frozen=True, slots=True)
class Error:
    request_id: int  # the refused or failed request (0: a message that named none)
    message: str  # why


Message = Request | Token | Error


def encode(message: Message) -> bytes:
    """One frame for `message`; ProtocolError for a field out of range."""
    try:
        if isinstance(message, Request):
            ids = message.prompt
            fixed = _REQUEST.pack(message.request_id, message.max_new_tokens, len(ids))
            return _HEADER.pack(MAGIC, VERSION, REQUEST) + fixed + struct.pack(f"<{len(ids)}I", *ids)
        if isinstance(message, Token):
            return _HEADER.pack(MAGIC, VERSION, TOKEN) + _TOKEN.pack(message.request_id, message.token_id,
                                                                      message.index, int(bool(message.final)))
        if isinstance(message, Error):
            text = message.message.encode("utf-8", errors="replace")[:MAX_ERROR_BYTES].decode("utf-8", errors="ignore")
            text = text.encode("utf-8")
            return _HEADER.pack(MAGIC, VERSION, ERROR) + _ERROR.pack(message.request_id, len(text)) + text
    except struct.error as exc:
        raise ProtocolError(f"cannot encode {type(message).__name__}: {exc}",
                            getattr(message, "request_id", 0)) from None
    raise ProtocolError(f"not a cloud-only message: {type(message).__name__}")


def decode(data: bytes | bytearray | memoryview, limits: ProtocolLimits = ProtocolLimits()) -> Message:
    """The message in one frame; ProtocolError for anything malformed or beyond `limits`."""
    data = bytes(data)
    if len(data) < _HEADER.size:
        raise ProtocolError(f"a message of {len(data)} bytes is shorter than the {_HEADER.size}-byte header")
    magic, version, kind = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}, expected {MAGIC!r}: not a cloud-only message")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, this peer speaks {VERSION}")
    body = len(data) - _HEADER.size
    if kind == REQUEST:
        _at_least(body, _REQUEST.size, "REQUEST")
        request_id, max_new, count = _REQUEST.unpack_from(data, _HEADER.size)
        if body != _REQUEST.size + 4 * count:
            raise ProtocolError(f"REQUEST says {count} prompt tokens ({4 * count} bytes) but carries "
                                f"{body - _REQUEST.size} bytes", request_id)
        if count == 0:
            raise ProtocolError("empty prompt", request_id)
        if count > limits.max_prompt_tokens:
            raise ProtocolError(f"the prompt has {count} tokens, this model takes at most {limits.max_prompt_tokens} "
                                "(its context less one, to leave room to generate)", request_id)
        if max_new < 1:
            raise ProtocolError("max_new_tokens must be at least 1", request_id)
        prompt = struct.unpack_from(f"<{count}I", data, _HEADER.size + _REQUEST.size)
        if max(prompt) >= limits.vocab_size:
            raise ProtocolError(f"token id {max(prompt)} is outside the vocabulary of {limits.vocab_size}", request_id)
        return Request(request_id, max_new, prompt)
    if kind == TOKEN:
        if body != _TOKEN.size:
            raise ProtocolError(f"TOKEN body of {body} bytes, expected {_TOKEN.size}")
        request_id, token_id, index, final = _TOKEN.unpack_from(data, _HEADER.size)
        if final > 1:
            raise ProtocolError(f"TOKEN final flag {final}, expected 0 or 1", request_id)
        return Token(request_id, token_id, index, bool(final))
    if kind == ERROR:
        _at_least(body, _ERROR.size, "ERROR")
        request_id, length = _ERROR.unpack_from(data, _HEADER.size)
        if length > MAX_ERROR_BYTES or body != _ERROR.size + length:
            raise ProtocolError(f"ERROR says {length} bytes of text (at most {MAX_ERROR_BYTES}) but carries "
                                f"{body - _ERROR.size}", request_id)
        try:
            text = data[_HEADER.size + _ERROR.size:].decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("ERROR text is not UTF-8", request_id) from None
        return Error(request_id, text)
    raise ProtocolError(f"unknown message kind {kind}")


def request_tokens(socket, request_id: int, prompt: list[int], max_new_tokens: int,
                   timeout_s: float) -> tuple[list[int], list[float], int, int]:
    """One request over a connected ZeroMQ DEALER, blocking: (token ids, their arrival times (perf_counter), bytes
    up, bytes down: the frames' payload). RuntimeError for an ERROR reply, TimeoutError when no reply comes within
    `timeout_s` of the previous one, ProtocolError for a malformed one."""
    data = encode(Request(request_id, max_new_tokens, tuple(prompt)))
    socket.send(data)
    tokens, times, down = [], [], 0
    while True:
        if not socket.poll(timeout_s * 1000):
            raise TimeoutError(f"no reply from the cloud-only server within {timeout_s:g} s")
        frames = socket.recv_multipart()
        down += sum(len(f) for f in frames)
        message = decode(frames[0]) if len(frames) == 1 else None
        if message is None or isinstance(message, Request):
            raise ProtocolError("the server sent something other than a TOKEN or an ERROR")
        if message.request_id != request_id:
            continue  # a late reply to an earlier, failed request
        if isinstance(message, Error):
            raise RuntimeError(f"the cloud-only server refused request {request_id}: {message.message}")
        if message.index != len(tokens):
            raise ProtocolError(f"token {message.index} arrived after {len(tokens)} tokens", request_id)
        tokens.append(message.token_id)
        times.append(time.perf_counter())
        if message.final:
            return tokens, times, len(data), down


def _at_least(body: int, size: int, kind: str) -> None:
    if body < size:
        raise ProtocolError(f"{kind} body of {body} bytes, shorter than its {size}-byte fixed part")
