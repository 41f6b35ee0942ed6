"""Speculative decoding with a verified-conditioned draft adapter (EAGLE's conditioning, AdapterConfig.conditioning):
lossless, and fed what the design says.

Greedy output equals plain split decoding on random checkpoints (a random conditioned adapter, threshold 0: drafts
are made and mostly rejected, so rollback runs often), with and without drafting ahead; on the reference model with
its shipped adapter made conditioned (a small random h_mid half in fc: drafts mostly accepted, the previous output
matters) it equals plain decoding and transformers, and every adapter call is checked against an oracle: each
position's previous middle output is the model's true h_mid of the position before (a float32 teacher over the final
sequence; zeros at position 0) or the adapter's own estimate of that position from the same draft, a round's first
token always gets the verified one, and after the generation every accepted position's adapter entry was last
written from the verified one (settle's rewrite). Speculative sampling with it fits the target's exact distribution
(the chi-square oracle of test_speculative_sampling).
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cluster import running_cloud
from hat.common.adapter import AdapterConfig, DraftAdapter
from hat.common.adapter_training import Teacher
from hat.common.checkpoint import fingerprint
from hat.common.default_model import DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS, reference_model_dir
from hat.common.model_spec import load_model_spec
from hat.common.split import default_adapter_dir, split_checkpoint
from hat.device.device_model import DeviceModel
from hat.device.speculation import SpeculationConfig
from test_generate_oracle import PROMPTS, assert_same_greedy, hf_greedy
from test_speculative import speculative_beside_plain

CASES = [("llama3", 1, 0), ("qwen2", 1, 3), ("qwen3", 2, 2)]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def conditioned(adapter: DraftAdapter, spec, scale: float, seed: int = 0) -> DraftAdapter:
    """`adapter` made verified-conditioned: its weights, fc = [identity | scale x random] (so h_mid(t-1) counts)."""
    out = DraftAdapter(spec, replace(adapter.config, conditioning="verified"))
    out.load_state_dict(adapter.state_dict(), strict=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        half = out.condition.weight[:, spec.hidden_size:]
        half.copy_(scale * torch.randn(half.shape, generator=g))
    return out.eval()


def random_conditioned_adapter(model_dir, k: int, m: int, out, seed: int = 0):
    spec = load_model_spec(model_dir)
    torch.manual_seed(seed)
    adapter = DraftAdapter(spec, AdapterConfig(k, m, spec.hidden_size, 1, spec.intermediate_size, fingerprint(model_dir)))
    torch.nn.init.normal_(adapter.project.weight, std=0.02)
    conditioned(adapter, spec, 0.05, seed).save(out)
    return out


@pytest.mark.parametrize("family,k,m", CASES, ids=[f"{f}-K{k}-M{m}" for f, k, m in CASES])
def test_greedy_conditioned_speculation_matches_plain(tiny_checkpoint, tmp_path, family, k, m):
    model_dir = tiny_checkpoint(family)
    adapter = random_conditioned_adapter(model_dir, k, m, tmp_path / "adapter")
    device_dir, _ = split_checkpoint(model_dir, k, m, tmp_path / "spec-bundle", adapter=adapter)
    model = DeviceModel.load(device_dir)
    assert model.conditioned_adapter
    drafted = accepted = 0
    with running_cloud(model_dir, k, m, tmp_path) as cluster, cluster.generator(model) as gen:
        for prompt in PROMPTS:
            _, runs = speculative_beside_plain(gen, gen.encode(prompt))
            for spec in runs:
                drafted += sum(s.drafted for s in spec.decode_rounds)
                accepted += sum(s.accepted for s in spec.decode_rounds)
    assert drafted > accepted  # rejections happened: rollback ran


@pytest.fixture(scope="module")
def reference_conditioned(tmp_path_factory):
    """(device model, teacher): the reference model's float32 device bundle carrying its shipped adapter made
    conditioned, and the float32 teacher for the oracle."""
    model_dir, k, m = reference_model_dir(), DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS
    work = tmp_path_factory.mktemp("conditioned-reference")
    spec = load_model_spec(model_dir)
    shipped = DraftAdapter.load(default_adapter_dir(model_dir, k, m), spec, torch.float32)
    conditioned(shipped, spec, 0.002).save(work / "adapter")
    device_dir, _ = split_checkpoint(model_dir, k, m, work / "bundle", dtype="float32", adapter=work / "adapter")
    return DeviceModel.load(device_dir), Teacher(str(model_dir), k, m)


class AdapterCalls:
    """Every call of the device's adapter: (start position, previous [count, width], output [count, width])."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = DraftAdapter.forward

        def recording(adapter, hidden, embeds, spans, previous=None):
            out = real(adapter, hidden, embeds, spans, previous)
            self.calls.append((spans[0].start, previous.clone(), out.clone()))
            return out

        monkeypatch.setattr(DraftAdapter, "forward", recording)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-6))


def test_reference_conditioned_speculation_is_lossless_and_fed_right(reference_cloud, reference_conditioned,
                                                                     monkeypatch):
    model, teacher = reference_conditioned
    prompts = ["def fibonacci(n):", "class Stack:\n    def __init__(self):"]
    with reference_cloud.generator(model) as gen:
        for prompt in prompts:
            ids = gen.encode(prompt)
            gen.speculation = None
            plain = gen.generate_ids(ids, 32)
            gen.speculation = SpeculationConfig(length="threshold", parallel=False)
            calls = AdapterCalls(monkeypatch)
            spec = gen.generate_ids(ids, 32)
            monkeypatch.undo()
            assert spec.token_ids == plain.token_ids
            assert_same_greedy(reference_model_dir(), ids, spec.token_ids, hf_greedy(reference_model_dir(), ids, 32))
            assert spec.accept_len > 1.5, spec.accept_len
            check_features(teacher, ids + spec.token_ids, calls.calls, len(ids), len(spec.decode_rounds))


@torch.no_grad()
def check_features(teacher: Teacher, sequence: list[int], calls, prompt_len: int, rounds: int) -> None:
    """The oracle: see the module docstring. The cloud (bfloat16) and the float32 teacher differ by rounding only:
    a verified feature is within 5% (relative norm) of the teacher's h_mid, while an estimate is an exact copy of an
    earlier output at the position before."""
    _, _, h_mid = teacher.hidden(torch.tensor([sequence]))
    truth = torch.cat([torch.zeros(1, h_mid.shape[1]), h_mid])  # truth[p] = h_mid(p - 1), zeros at p = 0
    outputs: dict[int, list[torch.Tensor]] = {}
    last_write: dict[int, str] = {}
    first_tokens_verified = 0
    for start, previous, out in calls:
        for j in range(previous.shape[0]):
            p = start + j
            verified = p < len(sequence) and relative_error(previous[j], truth[p]) < 0.05
            own = any(torch.equal(previous[j], o) for o in outputs.get(p - 1, []))
            assert verified or own, f"position {p}: the previous output is neither the verified one nor an estimate"
            last_write[p] = "verified" if verified else "own"
            outputs.setdefault(p, []).append(out[j])
        if previous.shape[0] == 1 and start >= prompt_len and last_write[start] == "verified":
            first_tokens_verified += 1
    assert first_tokens_verified >= rounds  # each round's pending token (and the rewrites) saw the verified output
    assert all(last_write[p] == "verified" for p in range(len(sequence) - 1)), last_write


def test_conditioned_speculative_sampling_matches_the_target(tmp_path):
    """test_speculative_sampling's oracle (exact joint of the first 3 tokens on a 6-token Llama, chi-square) with a
    conditioned adapter: its one drafted token per generation is run with the prefill's verified middle output (the
    estimate-fed positions are covered by the greedy tests above, whose drafts run 4 deep)."""
    from test_speculative_sampling import (SAMPLE, SPECULATION, build_checkpoint, chi2_pvalue, generate, histogram,
                                           random_adapter as sampling_adapter, target_joint)

    model_dir = build_checkpoint(tmp_path / "model")
    spec = load_model_spec(model_dir)
    conditioned(DraftAdapter.load(sampling_adapter(model_dir, tmp_path / "plain"), spec), spec, 0.3).save(
        tmp_path / "adapter")
    device_dir, _ = split_checkpoint(model_dir, 1, 1, tmp_path / "bundle", adapter=tmp_path / "adapter")
    model = DeviceModel.load(device_dir)
    assert model.conditioned_adapter
    trials = 400
    with running_cloud(model_dir, 1, 1, tmp_path) as cluster, cluster.generator(model) as gen:
        gen.speculation = SPECULATION
        sequences, stats = generate(gen, SAMPLE, trials)
    assert stats["drafted"] >= trials
    assert 0.2 * stats["drafted"] < stats["accepted"] < 0.8 * stats["drafted"], stats
    assert chi2_pvalue(histogram(sequences), target_joint(model_dir, SAMPLE)) > 1e-3
