"""What the device puts on the wire: hidden states of the input part and small headers, never the
prompt's text or any token id, of the prompt or of the generated text.

Every frame the device's data-plane socket sends during a whole generation is recorded (a proxy in
front of CloudLink's DEALER) and searched for the text and the ids in the encodings they could take.
"""
from __future__ import annotations

import re
import string

import pytest
import torch
from google.protobuf.unknown_fields import UnknownFieldSet

from cluster import running_cloud
from hat.common import wire
from hat.common.proto import hat_pb2 as pb

PROMPT = "Zebulon Quixote-Marchetti wired 4817 florins to Vandermeer Hollowbrook on Thursday; passphrase saffron-kumquat"
NEW_TOKENS = 20
HEADER_LIMIT = 128  # bytes
ALLOWED_FIELDS = {"version", "kind", "session_id", "sequence", "start", "num_tokens", "dtype", "shape", "return_last",
                  "device_id", "append_only", "max_positions", "ttft_slo_ms", "tbt_slo_ms"}


class RecordingSocket:
    """Forwards everything to the real socket and keeps a copy of every multipart message sent."""

    def __init__(self, socket):
        self._socket = socket
        self.sent: list[list[bytes]] = []

    def send_multipart(self, frames, *args, **kwargs):
        self.sent.append([bytes(f.buffer if hasattr(f, "buffer") else f) for f in frames])
        return self._socket.send_multipart(frames, *args, **kwargs)

    def send(self, *args, **kwargs):  # CloudLink sends only with send_multipart: a bare send would go unrecorded
        raise AssertionError("unexpected single-frame send")

    def __getattr__(self, name):
        return getattr(self._socket, name)


def encodings(ids: list[int]) -> dict[str, bytes]:
    """The ways a sequence of token ids could be written out."""
    out = {}
    for bits in (16, 32, 64):
        if all(0 <= i < 2 ** bits for i in ids):
            for order in ("little", "big"):
                out[f"int{bits}-{order}"] = b"".join(i.to_bytes(bits // 8, order) for i in ids)
    if all(0 <= i < 256 for i in ids):
        out["bytes"] = bytes(ids)
    out["text"] = " ".join(map(str, ids)).encode()
    out["csv"] = ",".join(map(str, ids)).encode()
    return out


def windows(ids: list[int], width: int) -> list[list[int]]:
    return [ids[i:i + width] for i in range(max(len(ids) - width + 1, 1))]


@pytest.fixture(scope="module", params=[("llama3", 2, 1), ("qwen2", 1, 0)], ids=lambda p: f"{p[0]}-K{p[1]}-M{p[2]}")
def recorded(request, tiny_checkpoint, tmp_path_factory):
    """(generator, prompt ids, result, sent messages) of one whole greedy generation."""
    family, k, m = request.param
    with running_cloud(tiny_checkpoint(family), k, m, tmp_path_factory.mktemp(f"privacy-{family}")) as cluster:
        with cluster.generator() as gen:
            recorder = RecordingSocket(gen.link._socket)
            gen.link._socket = recorder
            up0 = gen.link.bytes_up
            result = gen.generate(PROMPT, NEW_TOKENS)
            bytes_up = gen.link.bytes_up - up0
            yield gen, gen.encode(PROMPT), result, recorder.sent, bytes_up


def parse(frame: bytes) -> pb.DataHeader:
    header = pb.DataHeader()
    header.ParseFromString(frame)
    return header


def test_everything_sent_was_recorded(recorded):
    gen, prompt_ids, result, sent, bytes_up = recorded
    assert len(prompt_ids) > 20 and result.token_ids
    assert sum(len(f) for message in sent for f in message) == bytes_up == result.bytes_up
    kinds = [parse(message[0]).kind for message in sent]
    prompt_forwards = len(result.chunks)
    assert prompt_forwards >= 1 and sum(result.chunks) == len(prompt_ids)
    assert kinds == [pb.OPEN] + [pb.FORWARD] * (prompt_forwards + len(result.token_ids) - 1) + [pb.CLOSE]


def test_no_frame_holds_the_prompt_text(recorded):
    gen, prompt_ids, result, sent, _ = recorded
    frames = [f for message in sent for f in message]
    stream = b"".join(frames)  # nor spread over frames
    words = {w for w in re.split(r"[^0-9A-Za-z]+", PROMPT) if len(w) > 4}
    assert len(words) >= 8
    needles = {PROMPT.encode(), PROMPT.encode("utf-16-le"), PROMPT.encode("utf-32-le")}
    for word in words:
        needles |= {word.encode(), word.lower().encode(), word.upper().encode(), word.encode("utf-16-le")}
    for needle in needles:
        assert needle not in stream, f"the device sent {needle!r}"
    # nor any run of 5 printable characters of the prompt
    for i in range(len(PROMPT) - 4):
        piece = PROMPT[i:i + 5]
        if all(c in string.ascii_letters for c in piece):
            assert piece.encode() not in stream, f"the device sent {piece!r}"
    generated_text = result.text.encode()
    if len(result.text.strip()) >= 8:
        assert generated_text not in stream


def test_no_frame_holds_token_ids(recorded):
    gen, prompt_ids, result, sent, _ = recorded
    stream = b"".join(f for message in sent for f in message)
    sequences = {"prompt": prompt_ids, "generated": result.token_ids, "all": prompt_ids + result.token_ids,
                 "prompt without <s>": prompt_ids[1:]}
    for name, ids in sequences.items():
        if len(ids) < 3:
            continue
        for encoding, needle in encodings(ids).items():
            assert needle not in stream, f"the device sent the {name} ids as {encoding}"
    # every 4 consecutive ids (the prompt's and the generated ones) as 32- and 64-bit integers
    for ids in (prompt_ids, result.token_ids, prompt_ids[-2:] + result.token_ids[:2]):
        for window in windows(ids, 4):
            if len(window) < 4:
                continue
            for encoding in ("int32-little", "int64-little", "int32-big", "int64-big"):
                needle = encodings(window)[encoding]
                assert needle not in stream, f"the device sent ids {window} as {encoding}"


def test_headers_are_small_and_hold_no_token_ids(recorded):
    gen, prompt_ids, result, sent, _ = recorded
    hidden = gen.model.spec.hidden_size
    needs_all = gen.model.output_part.num_layers > 0
    position, session = 0, None
    forwards = 0
    for number, message in enumerate(sent, start=1):
        frame = message[0]
        assert len(frame) < HEADER_LIMIT, f"header of {len(frame)} bytes"
        header = parse(frame)
        assert len(UnknownFieldSet(header)) == 0, "the header carries fields this schema does not know"
        header.DiscardUnknownFields()
        assert header.SerializeToString() == frame, "the header holds more than its fields"
        present = {field.name for field, _ in header.ListFields()}
        assert present <= ALLOWED_FIELDS, present - ALLOWED_FIELDS
        assert header.version == wire.WIRE_VERSION and header.sequence == number
        assert re.fullmatch(r"[0-9a-f]{8,64}", header.session_id), header.session_id  # random, not from the prompt
        session = session or header.session_id
        assert header.session_id == session
        if header.kind == pb.OPEN:
            assert present == {"version", "kind", "session_id", "sequence", "device_id", "max_positions"}
            assert header.device_id == gen.link.device_id and len(message) == 1
            assert header.max_positions == len(prompt_ids) + NEW_TOKENS  # lengths the hidden states show anyway
        elif header.kind == pb.CLOSE:
            assert present == {"version", "kind", "session_id", "sequence"} and len(message) == 1
        else:
            assert header.kind == pb.FORWARD and len(message) == 2
            prompt_chunk = forwards < len(result.chunks)
            count = result.chunks[forwards] if prompt_chunk else 1
            assert (header.start, header.num_tokens, list(header.shape)) == (position, count, [count, hidden])
            assert header.return_last == (0 if needs_all else 1)
            assert header.append_only == prompt_chunk
            dtype = wire.WIRE_TO_TORCH[header.dtype]
            assert dtype == gen.model.input_part.dtype
            assert len(message[1]) == header.num_tokens * hidden * dtype.itemsize
            position += count
            forwards += 1
    assert forwards == len(result.chunks) + len(result.token_ids) - 1


def test_tensors_are_hidden_states_not_embeddings(recorded):
    """K >= 1: what goes up has been through the input layers; no row is a token's embedding."""
    gen, prompt_ids, result, sent, _ = recorded
    part = gen.model.input_part
    with torch.inference_mode():
        table = part.embed(torch.arange(gen.model.spec.vocab_size)).float()
    for message in sent:
        if len(message) != 2:
            continue
        tensor = wire.decode(message).tensor.float()
        assert torch.isfinite(tensor).all()
        distance = torch.cdist(tensor, table)  # [rows, vocab]
        assert distance.min() > 1e-3, "an uplinked row equals a token embedding"
