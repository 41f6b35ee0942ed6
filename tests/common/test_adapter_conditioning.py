"""A verified-conditioned draft adapter (AdapterConfig.conditioning == "verified", EAGLE's conditioning): its format,
its forward's contract and its training, on tiny random checkpoints.

Checked: an untrained conditioned adapter is exactly the input-only adapter with the same weights (fc starts as
[identity | zeros]), whatever the previous middle output; the previous middle output reaches the estimate once fc
is trained; calling it without one (or an input-only adapter with one) is an error; format 2 round-trips and
format 1 files (no `conditioning` key) load as input-only; training with feature noise and the second step lowers
the loss and writes a conditioned adapter; and on a checkpoint whose middle adds nothing the measures (teacher-forced
and chained, where later draft tokens see the adapter's own estimates) report a perfect draft.
"""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import hat.common.adapter_training as training
from hat.common.adapter import ADAPTER_CONFIG, AdapterConfig, AdapterMismatchError, DraftAdapter
from hat.common.adapter_training import (Teacher, chain_acceptance, distillation_loss, previous_middle,
                                         top1_agreement, train_adapter)
from hat.common.checkpoint import fingerprint
from hat.common.layers import SequenceSpan
from hat.common.model_spec import load_model_spec
from test_adapter import (FAKE_FINGERPRINT, K, M, config_for, identity_middle, inputs, model_dir, randomized,  # noqa: F401
                          read_loss_log, repetitive_data, small_config, spec, token_prefixes)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def conditioned_copy(adapter: DraftAdapter, spec) -> DraftAdapter:
    """A verified-conditioned adapter with `adapter`'s weights (its fc and norm as initialised)."""
    conditioned = DraftAdapter(spec, replace(adapter.config, conditioning="verified"))
    missing, unexpected = conditioned.load_state_dict(adapter.state_dict(), strict=False)
    assert sorted(missing) == ["condition.weight", "previous_norm.weight"] and not unexpected
    return conditioned.eval()


@torch.no_grad()
def test_untrained_conditioning_is_the_input_only_adapter(spec):
    plain = randomized(DraftAdapter(spec, config_for(spec)), seed=3)
    conditioned = conditioned_copy(plain, spec)
    hidden, embeds = inputs(spec, 10)
    expected = plain(hidden, embeds, [SequenceSpan(plain.new_cache(), 0, 10)])
    for seed in (1, 2):
        previous = 5 * torch.randn(10, spec.hidden_size, generator=torch.Generator().manual_seed(seed))
        got = conditioned(hidden, embeds, [SequenceSpan(conditioned.new_cache(), 0, 10)], previous)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@torch.no_grad()
def test_the_previous_middle_output_reaches_the_estimate(spec):
    adapter = conditioned_copy(randomized(DraftAdapter(spec, config_for(spec)), seed=4), spec)
    adapter.condition.weight.add_(0.1 * torch.randn(adapter.condition.weight.shape,
                                                    generator=torch.Generator().manual_seed(0)))
    hidden, embeds = inputs(spec, 6)
    a, b = (torch.randn(6, spec.hidden_size, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    out_a = adapter(hidden, embeds, [SequenceSpan(adapter.new_cache(), 0, 6)], a)
    out_b = adapter(hidden, embeds, [SequenceSpan(adapter.new_cache(), 0, 6)], b)
    assert not torch.allclose(out_a, out_b, atol=1e-3)
    # one position at a time through the cache == all at once (the previous output of each position given)
    cache, rows = adapter.new_cache(), []
    for i in range(6):
        rows.append(adapter(hidden[i:i + 1], embeds[i:i + 1], [SequenceSpan(cache, i, 1)], a[i:i + 1]))
    torch.testing.assert_close(torch.cat(rows), out_a, rtol=1e-4, atol=1e-5)


def test_forward_refuses_a_missing_or_unwanted_previous_output(spec):
    conditioned = DraftAdapter(spec, config_for(spec, conditioning="verified"))
    plain = DraftAdapter(spec, config_for(spec))
    hidden, embeds = inputs(spec, 3)
    with pytest.raises(ValueError, match="verified-conditioned adapter needs `previous`"):
        conditioned(hidden, embeds, [SequenceSpan(conditioned.new_cache(), 0, 3)])
    with pytest.raises(ValueError, match="takes no `previous`"):
        plain(hidden, embeds, [SequenceSpan(plain.new_cache(), 0, 3)], hidden)
    with pytest.raises(ValueError, match="`previous` has shape"):
        conditioned(hidden, embeds, [SequenceSpan(conditioned.new_cache(), 0, 3)], hidden[:2])
    with pytest.raises(ValueError, match="conditioning 'eagle'"):
        config_for(spec, conditioning="eagle")


@torch.no_grad()
def test_format_2_round_trips_and_format_1_loads_as_input_only(spec, tmp_path):
    adapter = conditioned_copy(randomized(DraftAdapter(spec, config_for(spec)), seed=5), spec)
    adapter.save(tmp_path / "v2")
    on_disk = json.loads((tmp_path / "v2" / ADAPTER_CONFIG).read_text())
    assert on_disk["format_version"] == 2 and on_disk["conditioning"] == "verified"
    loaded = DraftAdapter.load(tmp_path / "v2", spec)
    assert loaded.config == replace(adapter.config, format_version=2) and loaded.conditioned
    hidden, embeds = inputs(spec, 5)
    previous = torch.randn(5, spec.hidden_size, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(loaded(hidden, embeds, [SequenceSpan(loaded.new_cache(), 0, 5)], previous),
                               adapter(hidden, embeds, [SequenceSpan(adapter.new_cache(), 0, 5)], previous),
                               rtol=0, atol=0)
    with pytest.raises(AdapterMismatchError):  # the existing checks hold for a conditioned adapter too
        loaded.config.check_matches("b" * 64, K, M)
    loaded.config.check_matches(FAKE_FINGERPRINT, K, M)

    # a file of the version before (format 1, no `conditioning` key) is an input-only adapter, unchanged
    old = {k: v for k, v in asdict(config_for(spec)).items() if k != "conditioning"} | {"format_version": 1}
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / ADAPTER_CONFIG).write_text(json.dumps(old))
    assert AdapterConfig.load(tmp_path / "v1") == config_for(spec) and not AdapterConfig.load(tmp_path / "v1").conditioned

    for bad, message in (({**old, "conditioning": "verified"}, "format 1 has the `conditioning` key"),
                         ({**old, "format_version": 2}, "format 2 lacks the `conditioning` key"),
                         ({**old, "format_version": 2, "conditioning": "eagle"}, "conditioning 'eagle'"),
                         ({**old, "format_version": 3}, "adapter format 3")):
        (tmp_path / "v1" / ADAPTER_CONFIG).write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            AdapterConfig.load(tmp_path / "v1")


def test_weights_without_the_conditioning_layer_are_refused(spec, tmp_path):
    DraftAdapter(spec, config_for(spec)).save(tmp_path / "a")
    config_for(spec, conditioning="verified").save(tmp_path / "a")  # the config says conditioned, the weights are not
    with pytest.raises(ValueError, match="is corrupt or does not hold the weights"):
        DraftAdapter.load(tmp_path / "a", spec)


def test_previous_middle_shifts_within_each_window():
    h = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(6, 2)
    assert previous_middle(h, 2, 3).tolist() == [[0, 0], [0, 1], [2, 3], [0, 0], [6, 7], [8, 9]]


def test_training_a_conditioned_adapter(model_dir, spec, repetitive_data, tmp_path):
    out = tmp_path / "adapter"
    config = small_config(model_dir, out, repetitive_data, steps=16, batch_size=4, lr=1e-2, warmup_steps=2,
                          eval_every=8, ckpt_every=8, conditioning="verified", feature_noise=0.2,
                          second_step_weight=0.5)
    summary = train_adapter(config, log=lambda *a: None)
    losses = [float(r["loss"]) for r in read_loss_log(out)]
    assert sum(losses[-4:]) < sum(losses[:4]), losses
    adapter = DraftAdapter.load(out, spec)
    assert adapter.conditioned and adapter.config.format_version == 2
    assert not torch.equal(adapter.condition.weight[:, spec.hidden_size:], torch.zeros(()))  # fc learned from h_mid
    assert summary["adapter"]["conditioning"] == "verified" and 1 <= summary["final"]["accept_len"] <= 4
    with pytest.raises(ValueError, match="--conditioning verified only"):
        train_adapter(replace(config, out=str(tmp_path / "b"), conditioning="input"), log=lambda *a: None)


@torch.no_grad()
def test_noise_and_second_step_change_the_loss_reproducibly(model_dir, spec):
    teacher = Teacher(str(model_dir), K, M)
    adapter = conditioned_copy(randomized(DraftAdapter(spec, config_for(spec)), seed=6), spec)
    ids = torch.tensor(token_prefixes(spec, 2, 12))
    plain = distillation_loss(teacher, adapter, ids, 0.1)[0]
    # untrained fc ignores h_mid(t-1): noise changes nothing yet, the second pass adds its own (equal) loss
    noisy = distillation_loss(teacher, adapter, ids, 0.1, feature_noise=0.5, noise_seed=1)[0]
    assert float(noisy) == pytest.approx(float(plain), rel=1e-5)
    second = distillation_loss(teacher, adapter, ids, 0.1, second_step_weight=0.5)[0]
    assert float(second) == pytest.approx(1.5 * float(plain), rel=1e-5)
    adapter.condition.weight.add_(0.1 * torch.randn(adapter.condition.weight.shape,
                                                    generator=torch.Generator().manual_seed(0)))
    noisy = [distillation_loss(teacher, adapter, ids, 0.1, feature_noise=0.5, noise_seed=s)[0] for s in (1, 1, 2)]
    assert noisy[0] == noisy[1] != noisy[2]  # the noise is drawn from its seed alone
    with pytest.raises(ValueError, match="verified-conditioned adapter only"):
        distillation_loss(teacher, DraftAdapter(spec, config_for(spec)), ids, 0.1, feature_noise=0.5)


@torch.no_grad()
def test_perfect_conditioned_draft_is_measured_as_perfect(identity_middle):  # noqa: F811
    spec = load_model_spec(identity_middle)
    teacher = Teacher(str(identity_middle), 2, 3)
    adapter = DraftAdapter(spec, config_for(spec, input_layers=2, output_layers=3, conditioning="verified")).eval()
    ids = torch.tensor(token_prefixes(spec, 2, 24))
    assert top1_agreement(teacher, adapter, ids) == 1.0
    result = chain_acceptance(teacher, adapter, token_prefixes(spec, 3, 20, seed=3), draft_len=5)
    assert result == {"accept_len": 6.0, "accepted_at_depth": [1.0] * 5}


@torch.no_grad()
def test_chains_feed_the_verified_output_first_and_the_estimates_after(model_dir, spec, monkeypatch):
    """The chain's conditioned calls: the prefix with the teacher's h_mid shifted, then the round's first token with
    the teacher's h_mid of the prefix's last position, then each drafted token with the estimate before it."""
    teacher = Teacher(str(model_dir), K, M)
    adapter = conditioned_copy(randomized(DraftAdapter(spec, config_for(spec)), seed=7), spec)
    calls, real = [], DraftAdapter.forward

    def recording(self, hidden, embeds, spans, previous=None):
        out = real(self, hidden, embeds, spans, previous)
        calls.append((previous.clone(), out.clone()))
        return out

    monkeypatch.setattr(DraftAdapter, "forward", recording)
    prefix = token_prefixes(spec, 1, 9)[0]
    training._draft_chain(teacher, adapter, prefix, 3)
    _, _, h_mid = teacher.hidden(torch.tensor([prefix]))
    assert [c[0].shape[0] for c in calls] == [9, 1, 1, 1]
    torch.testing.assert_close(calls[0][0], previous_middle(h_mid, 1, 9), rtol=0, atol=0)
    torch.testing.assert_close(calls[1][0], h_mid[-1:], rtol=0, atol=0)
    for before, after in zip(calls[1:], calls[2:]):
        assert torch.equal(after[0], before[1])
