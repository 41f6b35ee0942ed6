"""KV memory accounted in blocks against a budget: admission control at OPEN.

KVBudget alone (blocks, reservations, refusals and their retry hints), the SessionStore that reserves
at OPEN and releases at CLOSE and expiry, and a running cloud whose budget holds exactly two sessions:
a third OPEN is refused OVERLOADED with a retry hint while the running sessions go on undisturbed, a
generator waits for memory and then produces the same tokens as an unhindered run, and gives up after
its admission timeout; a FORWARD past a session's reservation gets CONTEXT_EXCEEDED.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest
import torch

from cluster import running_cloud
from hat.cloud.kv_budget import KVBudget
from hat.cloud.middle_worker import load_middle_part
from hat.cloud.session_store import SessionStore
from hat.common.bundle import load_manifest
from hat.common.proto import hat_pb2 as pb
from hat.common.split import split_checkpoint
from hat.common.wire import WireError
from hat.device.cloud_link import CloudError, CloudLink

K, M = 2, 1
CONTEXT = 256  # tests/checkpoints.py
PROMPT = "The quick brown fox jumps over the lazy dog."
NEW_TOKENS = 20
SESSION_POSITIONS = 64  # what each held session reserves: 4 blocks of 16; the cloud's budget holds two
RETRY_MS = 250

# the cloud and its devices share this machine's two cores: one torch thread each (the unit tests do not mind)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# --------------------------------------------------------------------------------------- KVBudget alone


def test_blocks_for_rounds_up_to_whole_blocks():
    """blocks_for(positions) is ceil(positions / block_tokens); block bytes and total blocks follow the budget."""
    budget = KVBudget(bytes_per_position=10, budget_bytes=10 * 16 * 8 + 159, block_tokens=16)
    assert [budget.blocks_for(n) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]
    assert budget.block_bytes == 160 and budget.total_blocks == 8  # a partial block of budget is not a block
    assert KVBudget(10, 1000, block_tokens=1).blocks_for(7) == 7


def test_invalid_block_size_or_position_bytes_are_refused():
    """block_tokens and bytes_per_position must be positive."""
    with pytest.raises(ValueError):
        KVBudget(10, 1000, block_tokens=0)
    with pytest.raises(ValueError):
        KVBudget(0, 1000)


def test_reserve_and_release_track_used_blocks():
    """Reservations add up in used_blocks; release frees them; releasing an unknown session is harmless."""
    budget = KVBudget(1, 16 * 8, block_tokens=16)
    budget.reserve("a", 64)
    budget.reserve("b", 17)
    assert budget.used_blocks == 4 + 2
    budget.release("a")
    assert budget.used_blocks == 2
    budget.release("nobody")
    budget.release("a")
    assert budget.used_blocks == 2
    budget.release("b")
    assert budget.used_blocks == 0 and budget.refusals == 0


def test_re_reserving_a_session_replaces_its_blocks():
    """A second reserve for the same session replaces (not adds to) what it held, its own blocks counting as free."""
    budget = KVBudget(1, 16 * 8, block_tokens=16)
    budget.reserve("a", 64)
    budget.reserve("a", 16)
    assert budget.used_blocks == 1
    budget.reserve("b", 64)
    budget.reserve("a", 64)  # 4 free + its own 1: fits exactly
    assert budget.used_blocks == 8
    with pytest.raises(WireError):
        budget.reserve("a", 65)  # 5 blocks: more than its own 4 with none free
    # the failed re-reservation left what it held
    assert budget.used_blocks == 8


def test_refusal_names_blocks_and_gives_a_retry_hint():
    """An OPEN that does not fit now is OVERLOADED with retry_after_ms and a message naming blocks needed and free;
    nothing is reserved and the refusal is counted."""
    budget = KVBudget(1, 16 * 8, block_tokens=16, retry_after_ms=RETRY_MS)
    budget.reserve("a", 48)  # 3 blocks; 5 free
    with pytest.raises(WireError) as info:
        budget.reserve("b", 96)  # 6 blocks
    exc = info.value
    assert exc.code == pb.OVERLOADED and exc.retry_after_ms == RETRY_MS
    message = str(exc)
    assert "needs 6 blocks (96 positions)" in message, message
    assert "5 of 8 are free" in message and f"retry in {RETRY_MS} ms" in message, message
    assert budget.used_blocks == 3 and budget.refusals == 1
    budget.reserve("b", 80)  # 5 blocks: fits exactly
    assert budget.used_blocks == 8


def test_request_larger_than_the_whole_budget_never_fits():
    """A reservation beyond the whole budget is refused with retry_after_ms 0 (waiting cannot help), even when empty."""
    budget = KVBudget(1, 16 * 8, block_tokens=16, retry_after_ms=RETRY_MS)
    with pytest.raises(WireError) as info:
        budget.reserve("huge", 16 * 8 + 1)
    exc = info.value
    assert exc.code == pb.OVERLOADED and exc.retry_after_ms == 0
    assert "needs 9 blocks" in str(exc) and "whole budget is 8" in str(exc) and "fewer positions" in str(exc)
    assert budget.used_blocks == 0 and budget.refusals == 1
    budget.reserve("all", 16 * 8)  # exactly the whole budget fits
    assert budget.used_blocks == 8


def test_concurrent_reservations_never_exceed_the_budget():
    """Many threads reserving at once never hold more blocks than the budget."""
    budget = KVBudget(1, 16 * 10, block_tokens=16)
    granted: list[str] = []
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        barrier.wait(10)
        for j in range(20):
            try:
                budget.reserve(f"{i}-{j}", 16)
                granted.append(f"{i}-{j}")
            except WireError:
                pass

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(granted) == 10 and budget.used_blocks == 10 and budget.refusals == 8 * 20 - 10


# --------------------------------------------------------------------------------------- SessionStore + budget


@pytest.fixture(scope="module")
def middle(tiny_checkpoint, tmp_path_factory):
    """The middle part of the tiny llama3 split K=2, M=1."""
    _, cloud_dir = split_checkpoint(tiny_checkpoint("llama3"), K, M, tmp_path_factory.mktemp("kv-store") / "b")
    part, _ = load_middle_part(cloud_dir)
    return part


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_store(part, blocks: int, max_sessions: int = 16, clock=None) -> SessionStore:
    budget = KVBudget(part.kv_bytes_per_position, blocks * part.kv_bytes_per_position * 16, 16, RETRY_MS)
    return SessionStore(part, max_sessions, idle_timeout_s=10.0, budget=budget, clock=clock or Clock())


def test_open_reserves_and_preallocates_the_session_cache(middle):
    """OPEN reserves blocks for max_positions and allocates the cache at exactly that size at once."""
    store = make_store(middle, blocks=8)
    session = store.open("s", "dev", b"o", max_positions=40)
    assert store.budget.used_blocks == 3
    assert session.cache.max_length == 40 and session.cache.capacity == 40
    assert store.kv_bytes() == 40 * middle.kv_bytes_per_position


def test_zero_or_too_many_positions_mean_the_context(middle):
    """max_positions 0 reserves the model's whole context; more than the context is capped at it."""
    store = make_store(middle, blocks=CONTEXT // 16 * 2)
    a = store.open("a", "dev", b"o", max_positions=0)
    b = store.open("b", "dev", b"o", max_positions=CONTEXT * 4)
    assert a.cache.max_length == b.cache.max_length == CONTEXT
    assert store.budget.used_blocks == 2 * CONTEXT // 16


def test_close_and_expiry_release_blocks(middle):
    """CLOSE and idle expiry both give the session's blocks back."""
    clock = Clock()
    store = make_store(middle, blocks=8, clock=clock)
    store.open("a", "dev", b"o", max_positions=64)
    store.open("b", "dev", b"o", max_positions=64)
    assert store.budget.used_blocks == 8
    store.close("a", b"o")
    assert store.budget.used_blocks == 4
    clock.now += 11
    assert store.expire_idle() == ["b"]
    assert store.budget.used_blocks == 0 and len(store) == 0


def test_refused_open_creates_no_session(middle):
    """An OPEN refused for memory leaves no session and no reservation behind; it fits once memory is freed."""
    store = make_store(middle, blocks=8)
    store.open("a", "dev", b"o", max_positions=64)
    store.open("b", "dev", b"o", max_positions=64)
    with pytest.raises(WireError) as info:
        store.open("c", "dev", b"o", max_positions=64)
    assert info.value.code == pb.OVERLOADED and info.value.retry_after_ms == RETRY_MS
    assert len(store) == 2 and store.budget.used_blocks == 8
    store.close("b", b"o")
    store.open("c", "dev", b"o", max_positions=64)
    assert len(store) == 2 and store.budget.used_blocks == 8


def test_reopening_ones_own_session_replaces_its_reservation(middle):
    """Re-opening a session (a device's recovery) starts it afresh without reserving its blocks twice."""
    store = make_store(middle, blocks=8)
    first = store.open("a", "dev", b"o", max_positions=128)
    again = store.open("a", "dev", b"o", max_positions=128)  # all 8 blocks: fits only because its own are counted
    assert again is not first and again.cache.length == 0
    assert store.budget.used_blocks == 8 and len(store) == 1


def test_session_count_limit_gives_a_retry_hint(middle):
    """Beyond max_sessions an OPEN is OVERLOADED with the retry hint too."""
    store = make_store(middle, blocks=64, max_sessions=1)
    store.open("a", "dev", b"o", max_positions=16)
    with pytest.raises(WireError) as info:
        store.open("b", "dev", b"o", max_positions=16)
    assert info.value.code == pb.OVERLOADED and info.value.retry_after_ms == RETRY_MS
    assert "limit of 1 sessions" in str(info.value)


# --------------------------------------------------------------------------------------- a running cloud


@contextmanager
def raw_link(cluster, device_id: str, **overrides):
    """A registered CloudLink with no generator on it (holds sessions by hand)."""
    with CloudLink(cluster.link_config(device_id=device_id, **overrides)) as link:
        link.register(load_manifest(cluster.device_dir, part="device"))
        yield link


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, tmp_path_factory, one_torch_thread):
    """An unhindered cloud (default budget): the generator's tokens alone, its block size, middle outputs."""
    model_dir = tiny_checkpoint("llama3")
    with running_cloud(model_dir, K, M, tmp_path_factory.mktemp("kv-ref")) as cluster:
        with cluster.generator() as gen:
            tokens = gen.generate(PROMPT, NEW_TOKENS).token_ids
            prompt_len = len(gen.encode(PROMPT))
        yield cluster, tokens, prompt_len


@pytest.fixture(scope="module")
def tight(reference, tiny_checkpoint, tmp_path_factory):
    """A cloud whose KV budget holds exactly two sessions of SESSION_POSITIONS positions."""
    ref_cluster, _, prompt_len = reference
    budget = ref_cluster.server.budget
    assert prompt_len + NEW_TOKENS <= SESSION_POSITIONS  # a generation fits where a held session was
    blocks = budget.blocks_for(SESSION_POSITIONS)
    with running_cloud(tiny_checkpoint("llama3"), K, M, tmp_path_factory.mktemp("kv-tight"),
                       kv_budget_bytes=2 * blocks * budget.block_bytes, overload_retry_ms=RETRY_MS) as cluster:
        assert cluster.server.budget.total_blocks == 2 * blocks
        yield cluster


@contextmanager
def held_sessions(link, *session_ids: str, positions: int = SESSION_POSITIONS):
    """Sessions opened on `link` for `positions`, closed (if still open) at the end."""
    for sid in session_ids:
        assert link.open_session(sid, positions).header.kind == pb.OPENED
    try:
        yield
    finally:
        for sid in session_ids:
            try:
                link.close_session(sid)
            except CloudError:
                pass  # already closed by the test


def middle_outputs(link, session_id: str, hidden_steps: list[torch.Tensor]) -> list[torch.Tensor]:
    outs, start = [], 0
    for hidden in hidden_steps:
        outs.append(link.forward(session_id, start, hidden).tensor.clone())
        start += hidden.shape[0]
    return outs


def test_third_open_is_refused_while_two_sessions_run_undisturbed(tight, reference):
    """With the budget full, a third OPEN gets OVERLOADED with retry_after_ms and a message naming blocks; the two
    running sessions' middle outputs equal an unhindered cloud's; after one CLOSE the third OPEN succeeds."""
    ref_cluster = reference[0]
    hidden_size = tight.server.worker.part.spec.hidden_size
    torch.manual_seed(0)
    steps = {sid: [torch.randn(20, hidden_size)] + [torch.randn(1, hidden_size) for _ in range(6)]
             for sid in ("run-a", "run-b")}
    with raw_link(ref_cluster, "kv-ref-dev") as ref_link:
        expected = {}
        for sid, hidden_steps in steps.items():
            ref_link.open_session(sid)
            expected[sid] = middle_outputs(ref_link, sid, hidden_steps)
            ref_link.close_session(sid)
    refusals = tight.server.budget.refusals
    with raw_link(tight, "kv-holder") as holder, raw_link(tight, "kv-third") as third, \
            held_sessions(holder, "run-a", "run-b"):
        assert tight.server.budget.used_blocks == tight.server.budget.total_blocks
        got = {sid: [] for sid in steps}
        start = {sid: 0 for sid in steps}
        for i in range(len(steps["run-a"])):
            if i == 2:  # in the middle of both sessions' work
                with pytest.raises(CloudError) as info:
                    third.open_session("third", SESSION_POSITIONS)
                exc = info.value
                assert exc.code == pb.OVERLOADED and exc.retry_after_s == pytest.approx(RETRY_MS / 1000)
                assert "needs 4 blocks (64 positions)" in str(exc) and "0 of 8 are free" in str(exc), str(exc)
            sent = {sid: holder.send_forward(sid, start[sid], steps[sid][i]) for sid in steps}  # both in flight
            for sid, sequence in sent.items():
                got[sid].append(holder.receive(sequence).tensor.clone())
                start[sid] += steps[sid][i].shape[0]
        for sid in steps:
            for g, e in zip(got[sid], expected[sid]):
                torch.testing.assert_close(g, e, rtol=0, atol=1e-5)
        assert tight.server.budget.refusals == refusals + 1
        holder.close_session("run-a")
        assert third.open_session("third", SESSION_POSITIONS).header.kind == pb.OPENED
        assert third.forward("third", 0, torch.randn(3, hidden_size)).header.cache_length == 3
        third.close_session("third")
    assert tight.server.budget.used_blocks == 0


def test_open_larger_than_the_whole_budget_is_refused_without_retry(tight):
    """An OPEN for the whole context (max_positions 0) on a cloud that can never hold it: OVERLOADED, retry 0."""
    with raw_link(tight, "kv-huge") as link:
        with pytest.raises(CloudError) as info:
            link.open_session("huge", 0)
        assert info.value.code == pb.OVERLOADED and info.value.retry_after_s == 0
        assert f"needs {CONTEXT // 16} blocks" in str(info.value) and "whole budget is 8" in str(info.value)


def test_generator_waits_for_memory_then_matches_an_unhindered_run(tight, reference):
    """A generator refused for memory waits as told and retries; once a session closes it gets in
    (admission_waits >= 1) and its tokens equal the same generation on an unhindered cloud."""
    _, expected, _ = reference
    with raw_link(tight, "kv-holder-2") as holder, held_sessions(holder, "hold-a", "hold-b"):
        closed = threading.Event()

        def close_later():
            time.sleep(0.5)
            holder.close_session("hold-a")
            closed.set()

        closer = threading.Thread(target=close_later, daemon=True)
        with tight.generator(admission_timeout_s=20.0) as gen:
            closer.start()
            began = time.monotonic()
            result = gen.generate(PROMPT, NEW_TOKENS)
            waited = time.monotonic() - began
        closer.join(10)
        assert closed.is_set()
        assert result.admission_waits >= 1 and waited >= 0.4
        assert result.token_ids == expected
    assert tight.server.budget.used_blocks == 0


def test_generator_gives_up_after_its_admission_timeout(tight):
    """With the budget full and nothing closing, the generator raises CloudError saying it was still refused after
    waiting admission_timeout_s; it waited at least one retry hint, not much longer than the timeout."""
    with raw_link(tight, "kv-holder-3") as holder, held_sessions(holder, "hold-c", "hold-d"):
        refusals = tight.server.budget.refusals
        with tight.generator(admission_timeout_s=0.8) as gen:
            began = time.monotonic()
            with pytest.raises(CloudError) as info:
                gen.generate(PROMPT, NEW_TOKENS)
            waited = time.monotonic() - began
        exc = info.value
        assert exc.code == pb.OVERLOADED
        assert "still refused after waiting 0.8 s" in str(exc) and "blocks" in str(exc), str(exc)
        assert RETRY_MS / 1000 <= waited < 5.0
        assert tight.server.budget.refusals >= refusals + 2  # the first try and at least one retry
        assert len(tight.server.store) == 2  # the holder's sessions, nothing left of the generator's
    assert tight.server.budget.used_blocks == 0


def test_generator_does_not_wait_for_what_can_never_fit(tight):
    """A generation whose prompt + token budget exceeds the whole KV budget fails at once (retry 0), without waiting."""
    with tight.generator(admission_timeout_s=20.0) as gen:
        ids = gen.encode(PROMPT)
        began = time.monotonic()
        with pytest.raises(CloudError) as info:
            gen.generate_ids(ids, 200)  # prompt + 200 positions > 8 blocks of 16
        assert info.value.code == pb.OVERLOADED and "whole budget" in str(info.value)
        assert time.monotonic() - began < 2.0
    assert tight.server.budget.used_blocks == 0


def test_forward_past_max_positions_is_context_exceeded(tight):
    """A FORWARD that would take a session past the max_positions of its OPEN gets CONTEXT_EXCEEDED, before it
    touches the cache; positions up to the reservation work."""
    hidden_size = tight.server.worker.part.spec.hidden_size
    with raw_link(tight, "kv-ctx") as link, held_sessions(link, "ctx", positions=20):
        with pytest.raises(CloudError) as info:
            link.forward("ctx", 0, torch.randn(21, hidden_size))
        assert info.value.code == pb.CONTEXT_EXCEEDED
        assert "positions up to 21 exceed the session's 20 positions" in str(info.value), str(info.value)
        assert link.forward("ctx", 0, torch.randn(19, hidden_size)).header.cache_length == 19
        assert link.forward("ctx", 19, torch.randn(1, hidden_size)).header.cache_length == 20
        with pytest.raises(CloudError) as info:
            link.forward("ctx", 20, torch.randn(1, hidden_size))
        assert info.value.code == pb.CONTEXT_EXCEEDED
        # rewriting the last position (a rollback) is still inside the reservation
        assert link.forward("ctx", 19, torch.randn(1, hidden_size)).header.cache_length == 20


def test_recovery_reopen_waits_for_memory_like_the_first_open(tight, reference):
    """When the cloud loses a session mid-decode while its memory is taken, the device's re-OPEN waits for memory (as
    its first OPEN would) and the generation finishes with the same tokens."""
    _, expected, _ = reference
    store = tight.server.store
    with raw_link(tight, "kv-holder-4") as holder, raw_link(tight, "kv-filler") as filler, \
            held_sessions(holder, "hold-e"), tight.generator(admission_timeout_s=20.0) as gen:
        original = gen.link.send_forward
        calls = {"n": 0}
        released = threading.Event()

        def release_later():
            time.sleep(0.5)
            filler.close_session("filler")
            released.set()

        def send_forward(session_id, start, hidden, return_last=0, **options):
            calls["n"] += 1
            if calls["n"] == 6:  # in the decode: the cloud drops the session, another takes its memory
                store.close(session_id, store._sessions[session_id].owner)
                assert filler.open_session("filler", SESSION_POSITIONS).header.kind == pb.OPENED
                threading.Thread(target=release_later, daemon=True).start()
            return original(session_id, start, hidden, return_last, **options)

        gen.link.send_forward = send_forward
        try:
            result = gen.generate(PROMPT, NEW_TOKENS)
        finally:
            assert released.wait(10)  # the filler's link is used by the thread until then
    assert result.recoveries == 1
    assert result.token_ids == expected
