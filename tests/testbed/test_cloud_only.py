"""The cloud-only baseline (hat.testbed.cloud_only): the whole-model server's tokens equal transformers' greedy
`generate` for concurrent prompts it batches together; its decoder raises nothing but ProtocolError on anything a
peer can send; garbage and bad requests get ERROR replies while a concurrent good request completes."""
from __future__ import annotations

import threading
import time

import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzzing import mutate
from hat.common.split import split_checkpoint
from hat.testbed.cloud_only import CloudOnlyConfig, CloudOnlyServer, WholeModel
from hat.testbed.cloud_only_protocol import (MAX_ERROR_BYTES, Error, ProtocolError, ProtocolLimits, Request, Token,
                                             decode, encode)

WAIT_S = 30.0  # longest wait for a reply in these tests


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    """(checkpoint dir, server) on a 6-layer model split 2 + 3 + 1, a small token budget so prompts are chunked."""
    model_dir = tiny_checkpoint("llama3")
    device_dir, cloud_dir = split_checkpoint(model_dir, 2, 1, tmp_path_factory.mktemp("cloud-only") / "bundle")
    server = CloudOnlyServer(WholeModel.load(device_dir, cloud_dir), CloudOnlyConfig(token_budget=24))
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop.is_set,), daemon=True)
    thread.start()
    yield model_dir, server
    stop.set()
    thread.join(WAIT_S)
    server.close()


@pytest.fixture(scope="module")
def oracle(served):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(served[0]).eval()

    def greedy(prompt: list[int], max_new: int) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=model.config.eos_token_id)
        return out[0, len(prompt):].tolist()

    return greedy


@pytest.fixture
def connect(served):
    context = zmq.Context()
    sockets = []

    def new() -> zmq.Socket:
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(f"tcp://127.0.0.1:{served[1].port}")
        sockets.append(socket)
        return socket

    yield new
    for socket in sockets:
        socket.close(linger=0)
    context.term()


def collect(sockets: list[zmq.Socket], streams: set, errors: dict | None = None) -> tuple[dict, dict]:
    """Replies until every (socket index, request id) in `streams` has ended (a final token or an ERROR) and
    `errors` ({key: count}) ERRORs have come: ({key: token ids}, {key: [ERROR texts]})."""
    poller = zmq.Poller()
    for socket in sockets:
        poller.register(socket, zmq.POLLIN)
    tokens: dict = {}
    texts: dict = {}
    deadline = time.monotonic() + WAIT_S

    def pending() -> bool:
        ended = {k for k, v in tokens.items() if v[-1][1]} | set(texts)
        return bool(streams - ended) or any(len(texts.get(k, ())) < n for k, n in (errors or {}).items())

    while pending():
        assert time.monotonic() < deadline, f"no reply in {WAIT_S} s; so far {tokens} {texts}"
        for socket, _ in poller.poll(100):
            frames = socket.recv_multipart()
            assert len(frames) == 1
            message = decode(frames[0])
            key = (sockets.index(socket), message.request_id)
            if isinstance(message, Error):
                texts.setdefault(key, []).append(message.message)
            else:
                got = tokens.setdefault(key, [])
                assert message.index == len(got) and not (got and got[-1][1])  # in order, nothing after final
                got.append((message.token_id, message.final))
    return {k: [t for t, _ in v] for k, v in tokens.items()}, texts


def test_concurrent_prompts_get_transformers_greedy_tokens_in_shared_batches(served, oracle, connect):
    g = torch.Generator().manual_seed(3)
    jobs = [(0, 11, 40, 8), (1, 7, 5, 12), (1, 9, 67, 6), (2, 5, 1, 10), (3, 2, 23, 9)]  # socket, id, prompt, new
    prompts = {(s, i): torch.randint(3, 384, (n,), generator=g).tolist() for s, i, n, _ in jobs}
    sockets = [connect() for _ in range(4)]
    before = served[1].stats.iterations
    for s, i, _, new in jobs:
        sockets[s].send(encode(Request(i, new, tuple(prompts[s, i]))))
    got, errors = collect(sockets, set(prompts))
    assert not errors
    for s, i, _, new in jobs:
        assert got[s, i] == oracle(prompts[s, i], new), (s, i)
    stats = served[1].stats
    assert stats.max_batch >= 3 and stats.iterations > before
    assert not served[1].active  # every request ended and was freed


def test_garbage_and_bad_requests_get_errors_while_a_good_request_completes(served, oracle, connect):
    good, bad = connect(), connect()
    prompt = list(range(40, 90))
    good.send(encode(Request(5, 10, tuple(prompt))))
    context = served[1].model.spec.max_context
    for frames in ([b"garbage"], [b"HATC\x01\x01short"], [encode(Request(1, 4, (5,))), b"extra frame"],  # no id: 0
                   [encode(Request(3, 4, (5,)))[:-1]], [encode(Token(4, 1, 0, True))], [encode(Request(5, 4, ()))],
                   [encode(Request(6, 4, (7,) * context))], [encode(Request(7, 0, (5,)))],
                   [encode(Request(8, 4, (5, 384)))]):
        bad.send_multipart(frames)
    got, errors = collect([good, bad], {(0, 5)}, {(1, 0): 3, **{(1, i): 1 for i in range(3, 9)}})
    assert got == {(0, 5): oracle(prompt, 10)}
    assert "magic" in errors[1, 0][0] and "shorter" in errors[1, 0][1] and "one frame" in errors[1, 0][2]
    assert "carries 3 bytes" in errors[1, 3][0] and "REQUEST" in errors[1, 4][0] and "empty" in errors[1, 5][0]
    assert f"at most {context - 1}" in errors[1, 6][0] and "max_new_tokens" in errors[1, 7][0]
    assert "outside the vocabulary" in errors[1, 8][0]
    assert all(len(v) == (3 if k == (1, 0) else 1) for k, v in errors.items())
    bad.send(encode(Request(9, 3, (5, 6, 7))))  # the server still serves this client
    assert collect([bad], {(0, 9)}) == ({(0, 9): oracle([5, 6, 7], 3)}, {})


LIMITS = ProtocolLimits(max_prompt_tokens=64, vocab_size=1000)
VALID = [encode(m) for m in (Request(1, 5, (1, 2, 3)), Request((1 << 64) - 1, 1, tuple(range(64))),
                             Token(7, 999, 3, False), Token(0, 0, 0, True), Error(3, "no"), Error(0, ""),
                             Error(9, "é" * 20))]


@st.composite
def mutated(draw):
    return (mutate(draw, [draw(st.sampled_from(VALID))]) or [b""])[0]


@st.composite
def truncated(draw):
    data = draw(st.sampled_from(VALID))
    return data[:draw(st.integers(0, len(data)))]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=300), truncated(), mutated()))
def test_decode_returns_a_message_that_reencodes_identically_or_raises_protocol_error(data):
    try:
        message = decode(data, LIMITS)
    except ProtocolError:
        return
    assert encode(message) == data


@settings(max_examples=200, deadline=None)
@given(st.one_of(
    st.builds(Request, st.integers(0, (1 << 64) - 1), st.integers(1, (1 << 32) - 1),
              st.lists(st.integers(0, 999), min_size=1, max_size=64).map(tuple)),
    st.builds(Token, st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 32) - 1), st.integers(0, (1 << 32) - 1),
              st.booleans()),
    st.builds(Error, st.integers(0, (1 << 64) - 1), st.text(max_size=200))))
def test_every_valid_message_round_trips(message):
    assert decode(encode(message), LIMITS) == message


def test_encode_refuses_out_of_range_fields_and_cuts_long_error_text():
    with pytest.raises(ProtocolError):
        encode(Request(-1, 1, (1,)))
    with pytest.raises(ProtocolError):
        encode(Token(1, 1 << 32, 0, False))
    assert len(decode(encode(Error(1, "x" * 10_000))).message) == MAX_ERROR_BYTES
