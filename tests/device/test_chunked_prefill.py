"""The pipelined, chunked prefill end to end (device parts, a loopback cloud, transformers as the oracle).

How a prompt is cut must never change what is computed: greedy output is the same for every chunking
mode (adaptive, fixed sizes, none) and equal to transformers' generate, and the cloud's middle-layer
cache (and the device's own caches) hold the same keys and values whether the prompt came in one
message or in many. Prompt chunks are FORWARDs with `append_only`: the cloud refuses one that does not
start exactly at the end of the session's cache (a duplicate, a stale or a skipped chunk) with
BAD_POSITION, one for a session it does not hold with UNKNOWN_SESSION, each before touching any cache;
a session lost in the middle of a prefill is recovered. The CLI reports the chunking in its JSON, and
the predicted time to the first token comes from the pipeline's cost model.
"""
from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

import pytest
import torch

from checkpoints import TOKENIZER_TEXT
from cluster import running_cloud
from script_loader import load_script
from hat.cli.main import main
from hat.common.cost_fit import LinearCost
from hat.common.layers import SequenceSpan
from hat.common.prefill_pipeline import PipelineCosts
from hat.common.proto import hat_pb2 as pb
from hat.common.split import split_checkpoint
from hat.device.chunk_planner import ChunkingConfig, ChunkPlanner
from hat.device.cloud_link import CloudError
from hat.device.drafter import DeviceCaches
from hat.device.link_estimator import LinkEstimator
from test_cli import CloudProcess, assert_usage_error, finish, generate
from test_cli import FAMILY as CLI_FAMILY, K as CLI_K, M as CLI_M, NEW_TOKENS as CLI_NEW_TOKENS
from test_cli import hf_greedy as hf_greedy_text
from test_generate_oracle import assert_same_greedy, hf_greedy
from test_link_estimator import SimulatedLink, open_session, reply, train

# One torch thread: the in-process cloud and the device share this machine's cores, and with several threads each
# they oversubscribe them, which makes the timings the chunk planner and the TTFT test rely on erratic.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

NEW_TOKENS = 8
PROMPT_TOKENS = 72  # long enough for several chunks of every size tried
CASES = [("llama3", 2, 1), ("qwen2", 1, 0), ("mistral", 1, 2)]  # qwen2 K1-M0: no output layers on the device
CASE_IDS = [f"{f}-K{k}-M{m}" for f, k, m in CASES]
FIXED_SIZES = [1, 3, 7, 16, PROMPT_TOKENS + 28]
MODES = ([("adaptive", ChunkingConfig())] + [(f"fixed{n}", ChunkingConfig(fixed_size=n)) for n in FIXED_SIZES]
         + [("none", ChunkingConfig(enabled=False))])
# float32: chunked and whole computations differ only in summation order (matmuls of other shapes). The tolerance
# is 1e-5 of the tensor's largest magnitude: the tiny random models' middle keys/values reach ~5, and there a
# whole-prompt float32 run is itself ~1e-5 away from a float64 transformers run.
ATOL = 1e-5


def fixed_sizes(tokens: int, size: int) -> list[int]:
    """The chunk sizes --chunk-size `size` must give a `tokens`-token prompt: full chunks, then the rest."""
    return [size] * (tokens // size) + ([tokens % size] if tokens % size else [])


def prompt_ids(gen, tokens: int = PROMPT_TOKENS) -> list[int]:
    ids = gen.encode(TOKENIZER_TEXT)[:tokens]
    assert len(ids) == tokens
    return ids


# ----------------------------------------------------------------------------------- cache helpers


def snapshot(cache) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(length, keys, values) of a KVCache's valid positions, copied."""
    n = cache.length
    return n, cache.keys[:, :, :n].clone(), cache.values[:, :, :n].clone()


def cloud_cache(cluster, session_id: str) -> tuple[int, torch.Tensor, torch.Tensor]:
    return snapshot(cluster.server.store._sessions[session_id].cache)


def assert_same_cache(got, expected, atol: float = ATOL) -> None:
    assert got[0] == expected[0], f"cache length {got[0]}, expected {expected[0]}"
    for name, a, b in (("keys", got[1], expected[1]), ("values", got[2], expected[2])):
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert_close(a, b, atol, name)


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL, name: str = "") -> None:
    """|a - b| <= atol x max(1, the largest |b|) everywhere."""
    bound = atol * max(1.0, float(b.abs().max())) if b.numel() else 0.0
    diff = float((a - b).abs().max()) if b.numel() else 0.0
    assert diff <= bound, f"{name} differ by {diff:.3g} (bound {bound:.3g})"


@torch.inference_mode()
def run_prefill(gen, session_id: str, ids: list[int], config: ChunkingConfig):
    """Open `session_id` and prefill `ids` the way generate_ids does; (last middle output, report, device caches)."""
    model = gen.model
    gen.prefill.config = config
    caches = DeviceCaches(model.input_part.new_cache(), model.output_part.new_cache(), None)
    gen.link.open_session(session_id)
    last, report = gen.prefill.run(session_id, ids, caches, gen.max_message_tokens, [])
    return last, report, caches


# ------------------------------------------------------------------- 1. output across chunking modes


@pytest.mark.parametrize("family,k,m", CASES, ids=CASE_IDS)
def test_greedy_output_is_the_same_for_every_chunking_and_matches_transformers(tiny_checkpoint, tmp_path, family, k, m):
    """Adaptive, fixed (1, 3, 7, 16, > prompt) and no chunking give transformers' tokens; chunks tile the prompt."""
    model_dir = tiny_checkpoint(family)
    with running_cloud(model_dir, k, m, tmp_path) as cluster, cluster.generator() as gen:
        ids = prompt_ids(gen)
        expected = hf_greedy(model_dir, ids, NEW_TOKENS)
        outputs = {}
        for name, config in MODES:
            gen.prefill.config = config
            result = gen.generate_ids(ids, NEW_TOKENS)
            outputs[name] = result.token_ids
            assert result.chunking == config.mode, name
            assert sum(result.chunks) == len(ids), (name, result.chunks)
            assert all(c > 0 for c in result.chunks), (name, result.chunks)
            assert result.recoveries == 0
            prefill_rounds = [s for s in result.steps if not s.decode]
            assert [s.tokens for s in prefill_rounds] == result.chunks, name
            if config.mode == "fixed":
                assert result.chunks == fixed_sizes(len(ids), config.fixed_size), (name, result.chunks)
            elif config.mode == "none":
                assert result.chunks == [len(ids)]
    assert fixed_sizes(PROMPT_TOKENS, 7) == [7] * 10 + [2]
    assert_same_greedy(model_dir, ids, outputs["none"], expected)
    assert outputs == {name: outputs["none"] for name in outputs}


def test_chunks_never_exceed_the_clouds_message_limit(tiny_checkpoint, tmp_path):
    """With a cloud taking 32 tokens a message, no chunking cuts evenly and fixed sizes are capped; output unchanged."""
    model_dir = tiny_checkpoint("llama3")
    with running_cloud(model_dir, 2, 1, tmp_path, max_tokens_per_message=32) as cluster, cluster.generator() as gen:
        assert gen.max_message_tokens == 32
        ids = prompt_ids(gen)
        results = {}
        for name, config in [("none", ChunkingConfig(enabled=False)), ("fixed100", ChunkingConfig(fixed_size=100)),
                             ("adaptive", ChunkingConfig())]:
            gen.prefill.config = config
            results[name] = gen.generate_ids(ids, NEW_TOKENS)
    assert results["none"].chunks == [24, 24, 24]
    assert results["fixed100"].chunks == [32, 32, 8]
    assert max(results["adaptive"].chunks) <= 32 and sum(results["adaptive"].chunks) == len(ids)
    assert results["none"].token_ids == results["fixed100"].token_ids == results["adaptive"].token_ids
    assert_same_greedy(model_dir, ids, results["none"].token_ids, hf_greedy(model_dir, ids, NEW_TOKENS))


# A fast device, link and cloud (seconds per call, per token): the planner then prefers a ramp 16, 32, steady, 32, 16.
RAMP_COSTS = PipelineCosts(device_input=LinearCost(1e-4, 1e-5, 0), device_output=LinearCost(1e-4, 1e-5, 0),
                           cloud=LinearCost(1e-4, 1e-5, 0), cloud_queue_s=0.0, uplink_bytes_per_s=1e8,
                           downlink_bytes_per_s=1e8, rtt_s=1e-4, up_bytes_per_token=256, down_bytes_per_token=256)


def test_adaptive_plan_respects_the_clouds_message_limit(tiny_checkpoint, tmp_path):
    """The adaptive plan never has a chunk over the cloud's message limit, and the prefill sends exactly the plan
    (a ramp's middle once came out as (16, 32, 54, 32, 16) for a limit of 40, and 54 was sent as 40 + 14)."""
    model_dir = tiny_checkpoint("llama3")
    with running_cloud(model_dir, 2, 1, tmp_path, max_tokens_per_message=40) as cluster, cluster.generator() as gen:
        ids = prompt_ids(gen, 150)
        gen.prefill.config = ChunkingConfig(enabled=False)
        whole = gen.generate_ids(ids, NEW_TOKENS)
        gen.prefill.costs = lambda: RAMP_COSTS  # a deterministic plan
        gen.prefill.config = ChunkingConfig(replan_drift=1e9)  # and no re-plan
        result = gen.generate_ids(ids, NEW_TOKENS)
    plan = ChunkPlanner(ChunkingConfig()).plan(len(ids), RAMP_COSTS, 40)
    assert result.token_ids == whole.token_ids
    assert max(result.chunks) <= 40 and sum(result.chunks) == len(ids) and result.replans == 0
    assert max(plan.sizes) <= 40, plan.sizes
    assert result.chunks == list(plan.sizes)


# ------------------------------------------------------------------------------- 2. identical caches


@pytest.mark.parametrize("family,k,m", CASES, ids=CASE_IDS)
def test_chunked_prefill_leaves_the_same_caches_as_a_whole_prompt(tiny_checkpoint, tmp_path, family, k, m):
    """The cloud's session cache and the device's input/output caches after chunked prefills equal unchunked ones."""
    model_dir = tiny_checkpoint(family)
    with running_cloud(model_dir, k, m, tmp_path) as cluster, cluster.generator() as gen:
        ids = prompt_ids(gen)
        whole_last, whole_report, whole_caches = run_prefill(gen, "whole", ids, ChunkingConfig(enabled=False))
        assert whole_report.chunks == [len(ids)]
        whole_cloud = cloud_cache(cluster, "whole")
        assert whole_cloud[0] == len(ids)
        for name, config in MODES[:-1]:
            sid = f"chunked-{name}"
            last, report, caches = run_prefill(gen, sid, ids, config)
            assert sum(report.chunks) == len(ids)
            assert_same_cache(cloud_cache(cluster, sid), whole_cloud)
            assert_same_cache(snapshot(caches.input), snapshot(whole_caches.input))
            assert_same_cache(snapshot(caches.output), snapshot(whole_caches.output))
            assert caches.output.length == (len(ids) if m else 0)
            assert last.shape == whole_last.shape == (1, gen.model.spec.hidden_size)
            assert_close(last, whole_last, name=f"{name}: the last position's middle output")
            gen.link.close_session(sid)


# ------------------------------------------------------------------------------ 3. bad prompt chunks

RAW_CHUNK = 8
RAW_TOKENS = 40  # 5 chunks of 8


@pytest.fixture(scope="module")
def raw(tiny_checkpoint, tmp_path_factory):
    """A loopback cloud (llama3 K2-M1), a registered generator, the prompt's input-part hidden states, and the
    cloud cache a clean in-order run of its 8-token chunks leaves."""
    model_dir = tiny_checkpoint("llama3")
    with running_cloud(model_dir, 2, 1, tmp_path_factory.mktemp("raw")) as cluster, cluster.generator() as gen:
        part = gen.model.input_part
        ids = prompt_ids(gen, RAW_TOKENS)
        with torch.inference_mode():
            hidden = part.forward_layers(part.embed(torch.tensor(ids)), [SequenceSpan(part.new_cache(), 0, len(ids))])
        raw = Raw(cluster, gen, hidden)
        gen.link.open_session("clean")
        for i in range(raw.chunks):
            raw.receive(raw.send("clean", i))
        raw.clean = cloud_cache(cluster, "clean")
        assert raw.clean[0] == RAW_TOKENS
        yield raw


class Raw:
    """Raw prompt-chunk FORWARDs over the generator's link: chunk i is positions [8i, 8i + 8)."""

    def __init__(self, cluster, gen, hidden):
        self.cluster, self.gen, self.hidden = cluster, gen, hidden
        self.chunks = RAW_TOKENS // RAW_CHUNK
        self.clean = None

    def send(self, session_id: str, chunk: int, start: int | None = None) -> int:
        """Send chunk `chunk` (claiming position `start`, by default its own) as a prompt chunk; its sequence."""
        start = chunk * RAW_CHUNK if start is None else start
        rows = self.hidden[chunk * RAW_CHUNK:(chunk + 1) * RAW_CHUNK]
        return self.gen.link.send_forward(session_id, start, rows, append_only=True)

    def receive(self, sequence: int):
        reply = self.gen.link.receive(sequence)
        assert reply.header.kind == pb.RESULT
        return reply

    def refused(self, sequence: int, code: int, *words: str) -> CloudError:
        """The reply to `sequence` is a CloudError with `code` whose message names the problem."""
        with pytest.raises(CloudError) as err:
            self.gen.link.receive(sequence)
        assert err.value.code == code, (pb.ErrorCode.Name(err.value.code or 0), str(err.value))
        for word in words:
            assert word in str(err.value), str(err.value)
        return err.value

    def cache(self, session_id: str):
        return cloud_cache(self.cluster, session_id)

    def finish(self, session_id: str, first: int) -> None:
        """Send chunks `first`.. in order; the session's cache must then equal the clean run's."""
        for i in range(first, self.chunks):
            self.receive(self.send(session_id, i))
        assert_same_cache(self.cache(session_id), self.clean)
        self.gen.link.close_session(session_id)


# (name, chunks accepted first, the bad chunk's index and claimed start, the words its refusal must contain)
BAD_CHUNKS = [
    ("duplicate", 2, 1, 8, ["BAD_POSITION", "position 8", "cache of 16 positions", "duplicate"]),
    ("stale", 3, 0, 0, ["BAD_POSITION", "position 0", "cache of 24 positions", "out-of-order"]),
    ("gap", 1, 2, 16, ["BAD_POSITION", "position 16", "beyond", "cache of 8 positions", "gap"]),
    ("gap_on_empty_session", 0, 1, 8, ["BAD_POSITION", "position 8", "beyond", "cache of 0 positions"]),
    ("far_beyond", 2, 2, 200, ["BAD_POSITION", "position 200", "beyond", "cache of 16 positions"]),
]


@pytest.mark.parametrize("name,accepted,chunk,start,words", BAD_CHUNKS, ids=[b[0] for b in BAD_CHUNKS])
def test_a_misplaced_chunk_is_refused_and_leaves_the_cache_alone(raw, name, accepted, chunk, start, words):
    """A duplicate, stale or skipped-ahead prompt chunk gets BAD_POSITION naming it; the cache is unchanged and the
    prefill goes on to the clean result."""
    sid = f"bad-{name}"
    raw.gen.link.open_session(sid)
    for i in range(accepted):
        raw.receive(raw.send(sid, i))
    before = raw.cache(sid)
    raw.refused(raw.send(sid, chunk, start), pb.BAD_POSITION, *words)
    assert_same_cache(raw.cache(sid), before, atol=0)
    raw.finish(sid, accepted)


def test_a_chunk_for_an_unknown_session_is_refused(raw):
    """A prompt chunk for a session never opened gets UNKNOWN_SESSION naming it, and creates no session."""
    raw.refused(raw.send("never-opened", 0), pb.UNKNOWN_SESSION, "unknown session", "never-opened")
    assert "never-opened" not in raw.cluster.server.store._sessions
    assert_same_cache(raw.cache("clean"), raw.clean, atol=0)  # another session is untouched


def test_a_chunk_for_a_dropped_session_is_refused_and_a_reopen_starts_clean(raw):
    """After the cloud dropped the session mid-prompt the next chunk gets UNKNOWN_SESSION; re-opened, the prompt
    sent again from position 0 leaves the clean cache."""
    sid = "dropped"
    raw.gen.link.open_session(sid)
    for i in range(2):
        raw.receive(raw.send(sid, i))
    del raw.cluster.server.store._sessions[sid]
    raw.refused(raw.send(sid, 2), pb.UNKNOWN_SESSION, "unknown session", sid)
    assert sid not in raw.cluster.server.store._sessions
    raw.gen.link.open_session(sid)
    raw.refused(raw.send(sid, 2), pb.BAD_POSITION, "beyond", "cache of 0 positions")  # the re-opened cache is empty
    raw.finish(sid, 0)


def test_a_duplicate_sent_while_chunks_are_in_flight_is_refused(raw):
    """Several chunks and a duplicate sent before any reply: only the duplicate is refused, replies come back in any
    order of sequence numbers, and the final cache is the clean one."""
    sid = "in-flight-duplicate"
    link = raw.gen.link
    link.open_session(sid)
    sent = [raw.send(sid, 0), raw.send(sid, 1), raw.send(sid, 1)]  # the third is the duplicate
    sent += [raw.send(sid, i) for i in range(2, raw.chunks)]
    duplicate = sent[2]
    order = list(reversed(sent))
    for sequence in order:
        if sequence == duplicate:
            raw.refused(sequence, pb.BAD_POSITION, "position 8", "cache of 16 positions", "duplicate")
        else:
            raw.receive(sequence)
    assert not link._stash and not any(s in link._awaited for s in sent)
    assert_same_cache(raw.cache(sid), raw.clean)
    link.close_session(sid)


def test_chunks_out_of_order_while_in_flight_are_refused_then_resent(raw):
    """Chunk 2 sent before chunk 1 is refused as a gap; chunk 1 and a re-sent chunk 2 are taken; replies received in
    a shuffled order; the final cache is the clean one."""
    sid = "in-flight-out-of-order"
    link = raw.gen.link
    link.open_session(sid)
    early = raw.send(sid, 2)  # before chunks 0 and 1: a gap on the empty cache
    good = [raw.send(sid, 0), raw.send(sid, 1), raw.send(sid, 2)]
    late = raw.send(sid, 1)  # chunk 1 again, after chunk 2: stale
    good += [raw.send(sid, i) for i in range(3, raw.chunks)]
    order = [early, late, *good]
    random.Random(5).shuffle(order)
    for sequence in order:
        if sequence == early:
            raw.refused(sequence, pb.BAD_POSITION, "position 16", "beyond", "cache of 0 positions", "gap")
        elif sequence == late:
            raw.refused(sequence, pb.BAD_POSITION, "position 8", "cache of 24 positions", "out-of-order")
        else:
            assert raw.receive(sequence).header.cache_length % RAW_CHUNK == 0
    assert not link._stash
    assert_same_cache(raw.cache(sid), raw.clean)
    link.close_session(sid)


def test_the_append_only_flag_is_what_refuses_a_rewrite(raw):
    """The same FORWARD without append_only (a verification) may rewrite the cache's end: the check is the flag's."""
    sid = "rewrite"
    link = raw.gen.link
    link.open_session(sid)
    for i in range(3):
        raw.receive(raw.send(sid, i))
    raw.refused(raw.send(sid, 2), pb.BAD_POSITION, "would rewrite")
    assert link.forward(sid, 16, raw.hidden[16:24]).header.cache_length == 24  # rewrites positions 16..24
    raw.finish(sid, 3)


# ------------------------------------------------------------------------------------------ 4. recovery


def drop_session_before_chunk(gen, cluster, chunk: int) -> dict:
    """Make the link drop the session from the cloud just before the `chunk`-th prompt chunk is sent (once)."""
    original = gen.link.send_forward
    sessions = cluster.server.store._sessions
    calls = {"chunks": 0, "dropped": 0}

    def send_forward(session_id, start, hidden, return_last=0, append_only=False):
        if append_only:
            calls["chunks"] += 1
            if calls["chunks"] == chunk:
                deadline = time.monotonic() + 10  # the OPEN went out unanswered: wait for the cloud to take it
                while session_id not in sessions and time.monotonic() < deadline:
                    time.sleep(0.001)
                del sessions[session_id]
                calls["dropped"] += 1
        return original(session_id, start, hidden, return_last, append_only=append_only)

    gen.link.send_forward = send_forward
    return calls


@pytest.mark.parametrize("chunk", [3, 9])
def test_a_session_dropped_mid_prefill_is_recovered(tiny_checkpoint, tmp_path, chunk):
    """The cloud loses the session before the 3rd (or the 9th, with 8 chunks in flight) of 18 prompt chunks: one
    recovery, and the same tokens as a clean run."""
    model_dir = tiny_checkpoint("llama3")
    with running_cloud(model_dir, 2, 1, tmp_path) as cluster, cluster.generator() as gen:
        gen.prefill.config = ChunkingConfig(fixed_size=4)
        ids = prompt_ids(gen)
        clean = gen.generate_ids(ids, NEW_TOKENS)
        assert clean.chunks == [4] * 18 and clean.recoveries == 0
        calls = drop_session_before_chunk(gen, cluster, chunk)
        recovered = gen.generate_ids(ids, NEW_TOKENS)
        assert calls["dropped"] == 1
        assert recovered.recoveries == 1
        assert recovered.token_ids == clean.token_ids
        assert recovered.chunks == clean.chunks
        again = gen.generate_ids(ids, NEW_TOKENS)  # the link is left in a usable state
        assert again.recoveries == 0 and again.token_ids == clean.token_ids
        assert not gen.link._stash
        assert not cluster.server.store._sessions  # every session closed, the abandoned one included


# ------------------------------------------------------------------------------------------------ 5. CLI

CLI_PROMPT = TOKENIZER_TEXT[:160]


@pytest.fixture(scope="module")
def cli_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    """test_cli's split (llama3 K2-M1) of the tiny checkpoint: OUT/device and OUT/cloud."""
    out = tmp_path_factory.mktemp("chunk-cli") / "B"
    device_dir, cloud_dir = split_checkpoint(tiny_checkpoint(CLI_FAMILY), CLI_K, CLI_M, out)
    assert (device_dir, cloud_dir) == (out / "device", out / "cloud")
    return out


@pytest.fixture(scope="module")
def cli_runs(cli_bundle):
    """`hat generate --json` with --chunk-size 8 and with --no-chunking, at the same time, against `hat cloud serve`."""
    cloud = CloudProcess(cli_bundle)
    procs = {}
    try:
        cloud.ports = cloud.wait_ready()
        procs = {
            "fixed": generate(cloud, cli_bundle / "device", CLI_PROMPT, "--json", "--chunk-size", 8),
            "none": generate(cloud, cli_bundle / "device", CLI_PROMPT, "--json", "--no-chunking"),
        }
        results = {}
        for name, proc in procs.items():
            rc, out, err = finish(proc)
            assert rc == 0, err
            results[name] = json.loads(out.strip().splitlines()[-1])
        yield results
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        cloud.stop()


def test_cli_json_reports_the_chunking(cli_runs, tiny_checkpoint):
    """--chunk-size 8 reports "fixed" and chunks of 8, --no-chunking "none" and one chunk; tokens as transformers'."""
    fixed, none = cli_runs["fixed"], cli_runs["none"]
    for result in (fixed, none):
        for key in ("chunks", "ttft_predicted_ms", "replans", "chunking", "plan_ms"):
            assert key in result, key
        assert sum(result["chunks"]) == result["prompt_tokens"] > 24
        assert isinstance(result["replans"], int) and result["replans"] >= 0
        assert 0 < result["ttft_predicted_ms"] < 60_000
        assert 0 <= result["plan_ms"] < result["ttft_ms"]
    assert fixed["chunking"] == "fixed"
    assert fixed["chunks"] == fixed_sizes(fixed["prompt_tokens"], 8)
    assert none["chunking"] == "none"
    assert none["chunks"] == [none["prompt_tokens"]]
    assert none["replans"] == 0
    assert fixed["token_ids"] == none["token_ids"] == hf_greedy_text(tiny_checkpoint(CLI_FAMILY), CLI_PROMPT,
                                                                     CLI_NEW_TOKENS)


@pytest.mark.parametrize("flags,words", [
    (["--chunk-size", "0"], ["--chunk-size", "at least 1", "0"]),
    (["--chunk-size", "-3"], ["--chunk-size", "at least 1"]),
    (["--chunk-size", "four"], ["--chunk-size", "four"]),
    (["--chunk-size", "4", "--no-chunking"], ["--no-chunking", "--chunk-size"]),
], ids=["zero", "negative", "not-a-number", "contradiction"])
def test_cli_refuses_bad_chunking_flags(capsys, cli_bundle, flags, words):
    """A chunk size below 1, not a number, or with --no-chunking is a usage error (exit 2) naming the flag."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--bundle", str(cli_bundle / "device"), "--cloud", "127.0.0.1", "--data-port", "1",
              "--control-port", "1", "--prompt", "x", *flags])
    out, err = capsys.readouterr()
    assert_usage_error((exit_.value.code, out, err), "generate", *words)


# ----------------------------------------------------------------------------------- 6. TTFT prediction


def test_predicted_ttft_follows_the_measured_one(tiny_checkpoint, tmp_path):
    """ttft_predicted_ms is within 0.2x..5x of ttft_ms for a 200-token prompt in every mode, and it is larger for
    many small chunks than for one message, as the measured time is."""
    model_dir = tiny_checkpoint("llama3")
    with running_cloud(model_dir, 2, 1, tmp_path) as cluster, cluster.generator() as gen:
        ids = gen.encode(TOKENIZER_TEXT)[:200]
        predicted, measured = {}, {}
        # many tiny chunks last: on a loaded machine their transfers can leave the uplink estimate far too low for
        # every later prompt (see test_a_fast_links_rate_recovers_from_one_slow_sample)
        for name, config in [("none", ChunkingConfig(enabled=False)), ("adaptive", ChunkingConfig()),
                             ("fixed4", ChunkingConfig(fixed_size=4))]:
            gen.prefill.config = config
            # warm the link estimator, the device's fits and the cloud's predictor to this pattern (on a loaded machine
            # the start-up profiles can come out several times slower than the prompts then run)
            for _ in range(4):
                gen.generate_ids(ids, 2)
            runs = [gen.generate_ids(ids, 2) for _ in range(3)]
            assert all(r.ttft_predicted_ms > 0 for r in runs), name
            predicted[name] = statistics.median(r.ttft_predicted_ms for r in runs)
            measured[name] = statistics.median(r.ttft_ms for r in runs)
            assert 0.2 <= predicted[name] / measured[name] <= 5, (name, predicted[name], measured[name])
    assert measured["fixed4"] > measured["none"]  # 50 round trips cost more than one on loopback
    assert predicted["fixed4"] > 1.5 * predicted["none"], predicted


def test_a_fast_links_rate_recovers_from_one_slow_sample():
    """On a 1 GB/s link, one chunk stamped 2 ms late, then 50 prompts measured right: the uplink estimate is back
    within 5x of the true rate."""
    link = SimulatedLink(up_rate=1e9, down_rate=1e9, up_delay_s=5e-5, down_delay_s=5e-5, cloud_s=5e-3)
    estimator = LinkEstimator()
    chunk = 200 * 256  # a 200-token prompt of the tiny models' float32 hidden states
    sent = open_session(estimator, link, at_s=1000.0) + 0.01
    arrives, fields = link.request(sent, chunk, chunk)
    fields["arrival_us"] += 2000  # the cloud's receiving thread took it 2 ms late
    estimator.on_reply(reply(fields, sent, arrives), chunk, chunk)
    for _ in range(50):  # unchunked prompts, each in its own session
        train(estimator, link, open_session(estimator, link, at_s=link.down_free + 0.1), count=1,
              up_bytes=chunk, down_bytes=chunk)
    assert estimator.estimate.uplink_bytes_per_s > 0.2 * link.up_rate, estimator.estimate


def test_the_trace_script_prints_a_ratio_per_mode(capsys):
    """scripts/trace_ttft_prediction.py on the reference model: a line per prompt and a positive median ratio of
    predicted to measured TTFT for each mode asked for; bad arguments are usage errors."""
    script = load_script("trace_ttft_prediction")
    with pytest.raises(SystemExit) as exit_:
        script.parse_args(["--prompts", "2", "--warmup", "2"])
    assert exit_.value.code == 2
    assert script.main(["--prompt-tokens", "40", "--prompts", "2", "--warmup", "1", "--busy", "0",
                        "--modes", "none", "adaptive"]) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith(("none ", "adaptive ")) for line in out.splitlines()) == 4
    summary = dict(line.split()[:2] for line in out.split("median over prompts", 1)[1].splitlines()[1:] if line.strip())
    assert set(summary) == {"none", "adaptive"} and all(float(v) > 0 for v in summary.values()), out
