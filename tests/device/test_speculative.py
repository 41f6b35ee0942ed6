"""Speculative decoding end to end (device drafting, loopback cloud, verification) against two oracles.

Greedy speculation must produce exactly the tokens of plain split decoding and of transformers'
generate: on random checkpoints of every family (a random adapter and threshold 0, so drafts are made
and mostly rejected) and on the reference model with its shipped adapter (drafts mostly accepted).
A cloud that lost the session (dropped, or its cache cut short) refuses the verification with
UNKNOWN_SESSION or BAD_POSITION; the device re-sends its history and the output does not change.
"""
from __future__ import annotations

import pytest
import torch

from cluster import running_cloud
from hat.common.adapter import AdapterConfig, DraftAdapter
from hat.common.checkpoint import fingerprint
from hat.common.default_model import DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS, reference_model_dir
from hat.common.model_spec import load_model_spec
from hat.common.proto import hat_pb2 as pb
from hat.common.split import default_adapter_dir, split_checkpoint
from hat.device.cloud_link import CloudError
from hat.device.device_model import DeviceModel
from hat.device.draft_length import GIVE_UP_ROUNDS
from hat.device.speculation import SpeculationConfig
from test_generate_oracle import PROMPTS, assert_same_greedy, hf_greedy

NEW_TOKENS = 20
CASES = [("llama3", 1, 0), ("llama_tied_bias", 2, 1), ("mistral", 2, 1), ("qwen2", 1, 3), ("qwen3", 2, 2)]

# many small forwards (drafts, verifications, transformers' generate on tiny models): on a 2-core machine intra-op
# threads only add synchronisation
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_adapter(model_dir, k: int, m: int, out, seed: int = 0):
    """An adapter with random weights everywhere (project too), saved to `out`."""
    spec = load_model_spec(model_dir)
    torch.manual_seed(seed)
    adapter = DraftAdapter(spec, AdapterConfig(k, m, spec.hidden_size, 1, spec.intermediate_size, fingerprint(model_dir)))
    torch.nn.init.normal_(adapter.project.weight, std=0.02)
    adapter.save(out)
    return out


def speculative_beside_plain(gen, ids: list[int]) -> tuple:
    """Plain decoding of `ids`, then speculation (threshold 0, up to 4 drafted) without and with drafting ahead,
    each asserted to give plain's tokens and finish reason; returns plain's result and the two speculative ones."""
    gen.speculation = None
    plain = gen.generate_ids(ids, NEW_TOKENS)
    runs = []
    for parallel in (False, True):
        gen.speculation = SpeculationConfig(threshold=0.0, max_draft=4, parallel=parallel, length="threshold")
        spec = gen.generate_ids(ids, NEW_TOKENS)
        assert spec.token_ids == plain.token_ids, (ids[:8], parallel)
        assert spec.finish_reason == plain.finish_reason
        runs.append(spec)
    return plain, runs


def device_with_adapter(model_dir, k, m, tmp_path, adapter=None) -> DeviceModel:
    adapter = adapter or random_adapter(model_dir, k, m, tmp_path / "adapter")
    device_dir, _ = split_checkpoint(model_dir, k, m, tmp_path / "spec-bundle", adapter=adapter)
    return DeviceModel.load(device_dir)


@pytest.mark.parametrize("family,k,m", CASES, ids=[f"{f}-K{k}-M{m}" for f, k, m in CASES])
def test_greedy_speculation_matches_plain_and_transformers(tiny_checkpoint, tmp_path, family, k, m):
    model_dir = tiny_checkpoint(family)
    model = device_with_adapter(model_dir, k, m, tmp_path)
    drafted = 0
    with running_cloud(model_dir, k, m, tmp_path) as cluster, cluster.generator(model) as gen:
        for prompt in PROMPTS:
            ids = gen.encode(prompt)
            plain, runs = speculative_beside_plain(gen, ids)
            for spec in runs:
                rounds = spec.decode_rounds
                produced = sum(s.accepted + 1 for s in rounds)  # a stop token may end the last round early
                assert produced == len(spec.token_ids) - 1 or (spec.finish_reason == "stop" and produced >= len(spec.token_ids) - 1)
                drafted += sum(s.drafted for s in rounds)
            assert_same_greedy(model_dir, ids, plain.token_ids, hf_greedy(model_dir, ids, NEW_TOKENS))
    assert drafted > 0


def test_reference_model_speculation_is_lossless_and_accepts(reference_cloud, tmp_path):
    """The shipped adapter on held-out-style code prompts: same tokens as plain decoding and transformers,
    more than one token per round."""
    model_dir = reference_model_dir()
    k, m = DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS
    if not (default_adapter_dir(model_dir, k, m) / "adapter.safetensors").is_file():
        pytest.fail("the reference model ships no adapter for its default split")
    device_dir, _ = split_checkpoint(model_dir, k, m, tmp_path / "bundle", dtype="float32")
    model = DeviceModel.load(device_dir)
    assert model.adapter is not None
    prompts = ["def fibonacci(n):", "import os\nimport sys\n\n\ndef main(argv):\n", "class Stack:\n    def __init__(self):"]
    with reference_cloud.generator(model) as gen:
        for prompt in prompts:
            ids = gen.encode(prompt)
            gen.speculation = None
            plain = gen.generate_ids(ids, 32)
            # the threshold's lengths: this checks the adapter's acceptance, which cost-chosen lengths would make depend
            # on the machine's load (a loaded machine's timings can make plain decoding the better choice)
            gen.speculation = SpeculationConfig(length="threshold")
            spec = gen.generate_ids(ids, 32)
            assert spec.token_ids == plain.token_ids
            assert_same_greedy(model_dir, ids, spec.token_ids, hf_greedy(model_dir, ids, 32))
            assert spec.accept_len > 1.5, spec.accept_len
            assert len(spec.decode_rounds) < len(plain.decode_rounds)


def test_reference_model_cost_lengths_and_reduced_head_are_lossless(reference_cloud, tmp_path):
    """Draft lengths chosen from measured costs, and a reduced-vocabulary draft head (a quarter of the vocabulary,
    counted on standard-library source): greedy output is still plain decoding's and transformers', tokens outside
    the draft's subset included (verification keeps the full vocabulary)."""
    import os

    from hat.common.token_frequencies import FrequencyTable, tokenizer_fingerprint

    model_dir = reference_model_dir()
    k, m = DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS
    device_dir, _ = split_checkpoint(model_dir, k, m, tmp_path / "bundle", dtype="float32")
    model = DeviceModel.load(device_dir)
    vocab = model.spec.vocab_size
    counts = [0] * vocab
    for token in model.tokenizer(open(os.__file__).read())["input_ids"]:
        counts[token] += 1
    model.token_frequencies = FrequencyTable(vocab, tokenizer_fingerprint(model.tokenizer), tuple(counts))
    size = vocab // 4
    subset = set(model.token_frequencies.top(size))
    prompts = ["class Stack:\n    def __init__(self):"]
    configs = [SpeculationConfig(draft_vocab=size),  # cost-chosen lengths (the default)
               SpeculationConfig(length="threshold", threshold=0.0, max_draft=4, draft_vocab=size)]
    outside, drafted = 0, 0
    with reference_cloud.generator(model) as gen:
        for prompt in prompts:
            ids = gen.encode(prompt)
            gen.speculation = None
            plain = gen.generate_ids(ids, 32)
            assert_same_greedy(model_dir, ids, plain.token_ids, hf_greedy(model_dir, ids, 32))
            outside += sum(t not in subset for t in plain.token_ids)
            for config in configs:
                gen.speculation = config
                spec = gen.generate_ids(ids, 32)
                assert spec.token_ids == plain.token_ids, (prompt, config)
                drafted += sum(s.drafted for s in spec.decode_rounds)
        assert gen.draft_head().size == size
    assert outside > 0 and drafted > 0


def test_cost_chosen_lengths_stop_drafting_for_an_adapter_that_is_never_right(tiny_checkpoint, tmp_path):
    """A random adapter on a random checkpoint: its drafts are (nearly) always rejected, so after a few rounds the
    measured acceptance makes plain decoding the best choice; output stays plain decoding's."""
    model_dir = tiny_checkpoint("llama3")
    model = device_with_adapter(model_dir, 1, 0, tmp_path)
    with running_cloud(model_dir, 1, 0, tmp_path) as cluster, cluster.generator(model) as gen:
        ids = gen.encode(PROMPTS[0])
        gen.speculation = None
        plain = gen.generate_ids(ids, 60)
        gen.speculation = SpeculationConfig(parallel=False)
        spec = gen.generate_ids(ids, 60)
    assert spec.token_ids == plain.token_ids
    rounds = spec.decode_rounds
    # the premise, on the few tokens drafted before drafting stops (about 5: one lucky acceptance is 0.2)
    accepted = sum(s.accepted for s in rounds) / max(1, sum(s.drafted for s in rounds))
    assert rounds[0].drafted > 0 and accepted <= 0.5, accepted
    late = rounds[len(rounds) // 2:]
    assert sum(s.drafted for s in late) <= 0.2 * len(late), [s.drafted for s in rounds]
    # after GIVE_UP_ROUNDS rounds in a row accepting nothing, plain decode steps: no drafting time at all
    assert len(rounds) > GIVE_UP_ROUNDS + 4 and all(s.draft_ms == 0 for s in rounds[-4:]), [s.draft_ms for s in rounds]


def _sabotage_after(gen, rounds: int, sabotage):
    """Make the link call `sabotage()` just before the `rounds`-th verification is sent."""
    original = gen.link.send_forward
    calls = {"n": 0}

    def send_forward(session_id, start, hidden, return_last=0, **options):
        calls["n"] += 1
        if calls["n"] == rounds:
            sabotage(session_id)
        return original(session_id, start, hidden, return_last, **options)

    gen.link.send_forward = send_forward


@pytest.mark.parametrize("fault", ["session_dropped", "cache_cut_short"])
@pytest.mark.parametrize("speculative", [False, True])
def test_device_recovers_when_the_cloud_lost_the_session(tiny_checkpoint, tmp_path, fault, speculative):
    model_dir = tiny_checkpoint("llama_tied_bias")
    model = device_with_adapter(model_dir, 2, 1, tmp_path)
    speculation = SpeculationConfig(threshold=0.0, max_draft=3, length="threshold") if speculative else None
    with running_cloud(model_dir, 2, 1, tmp_path) as cluster, cluster.generator(model) as gen:
        ids = gen.encode(PROMPTS[2])
        gen.speculation = speculation
        clean = gen.generate_ids(ids, NEW_TOKENS)
        sessions = cluster.server.store._sessions

        def sabotage(session_id):
            if fault == "session_dropped":
                del sessions[session_id]
            else:
                sessions[session_id].cache.truncate(3)

        _sabotage_after(gen, 4, sabotage)
        recovered = gen.generate_ids(ids, NEW_TOKENS)
    assert recovered.recoveries == 1
    assert recovered.token_ids == clean.token_ids


def test_verification_refusals_are_clear(tiny_checkpoint, tmp_path):
    """A verification for an unknown session, or starting beyond the cloud's cache, gets a named error."""
    model_dir = tiny_checkpoint("qwen2")
    with running_cloud(model_dir, 1, 1, tmp_path) as cluster, cluster.generator() as gen:
        hidden = torch.zeros(3, load_model_spec(model_dir).hidden_size)
        with pytest.raises(CloudError, match="unknown session") as err:
            gen.link.forward("never-opened", 0, hidden)
        assert err.value.code == pb.UNKNOWN_SESSION
        gen.link.open_session("s1")
        gen.link.forward("s1", 0, hidden)
        with pytest.raises(CloudError, match="beyond the session's cache of 3 positions") as err:
            gen.link.forward("s1", 5, hidden)
        assert err.value.code == pb.BAD_POSITION
        assert gen.link.forward("s1", 3, hidden).tensor.shape == (3, hidden.shape[1])  # the session still works
