"""scripts/probe_verified_features.py: the +verified adapter's inputs are the previous positions' middle outputs, and
it starts as the input-only adapter it wraps; so does the +verified-concat one, whose h_mid half still learns."""
from __future__ import annotations

import pytest
import torch

from hat.common.adapter import AdapterConfig, DraftAdapter
from hat.common.layers import SequenceSpan
from hat.common.model_spec import load_model_spec
from script_loader import load_script


def test_previous_positions_shift_each_window_by_one():
    probe = load_script("probe_verified_features")
    batch, length, width = 3, 5, 4
    h_mid = torch.randn(batch * length, width)
    shifted = probe.previous_positions(h_mid, batch, length)
    for b in range(batch):
        for t in range(length):
            expected = torch.zeros(width) if t == 0 else h_mid[b * length + t - 1]
            assert torch.equal(shifted[b * length + t], expected)


def wrapped_adapter(tiny_checkpoint, wrapper_name: str):
    """A trained-looking adapter of the tiny model, the probe's wrapper `wrapper_name` around it, inputs for 6
    positions, and run(model, *extra) over them on a fresh cache."""
    probe = load_script("probe_verified_features")
    spec = load_model_spec(tiny_checkpoint("llama3"))
    config = AdapterConfig(input_layers=1, output_layers=1, width=spec.hidden_size, depth=1,
                           intermediate_size=spec.intermediate_size, source_fingerprint="x")
    torch.manual_seed(0)
    adapter = DraftAdapter(spec, config)
    with torch.no_grad():  # an adapter past its zero start: its projection moves the estimate
        adapter.project.weight.normal_(0, 0.1)
    wrapped = getattr(probe, wrapper_name)(adapter, spec.hidden_size, spec.rms_norm_eps)
    length = 6
    h_k, embeds, previous = (torch.randn(length, spec.hidden_size) for _ in range(3))

    def run(model, *extra):
        span = [SequenceSpan(adapter.new_cache(length), 0, length)]
        return model(h_k, embeds, span, *extra)

    return adapter, wrapped, previous, run


def test_the_verified_adapter_starts_as_the_input_only_one_and_reads_the_previous_output(tiny_checkpoint):
    adapter, wrapped, previous, run = wrapped_adapter(tiny_checkpoint, "VerifiedFeatureAdapter")
    with torch.no_grad():
        assert torch.equal(run(wrapped, previous), run(adapter))
        wrapped.previous.weight.normal_(0, 0.1)
        assert not torch.allclose(run(wrapped, previous), run(adapter))
        assert not torch.allclose(run(wrapped, previous), run(wrapped, torch.zeros_like(previous)))


def test_the_concat_adapter_starts_as_the_input_only_one_and_learns_from_the_previous_output(tiny_checkpoint):
    adapter, wrapped, previous, run = wrapped_adapter(tiny_checkpoint, "ConcatFeatureAdapter")
    width = previous.shape[-1]
    with torch.no_grad():
        assert torch.allclose(run(wrapped, previous), run(adapter))
    run(wrapped, previous).square().sum().backward()
    fc = wrapped.previous.weight
    assert fc.shape == (width, 2 * width)
    assert fc.grad[:, width:].abs().sum() > 0  # the zero h_mid half still learns
    with torch.no_grad():
        fc[:, width:].normal_(0, 0.1)
        assert not torch.allclose(run(wrapped, previous), run(wrapped, torch.zeros_like(previous)))


def test_variants_flag_takes_a_subset_in_order_and_rejects_unknown_names():
    probe = load_script("probe_verified_features")
    assert probe.parse_args([]).variants == ["input-only", "+verified", "+verified-concat"]
    args = probe.parse_args(["--variants", "+verified-concat,input-only"])
    assert args.variants == ["+verified-concat", "input-only"]
    for bad in ("input-only,eagle", "", "input-only,input-only"):
        with pytest.raises(SystemExit):
            probe.parse_args(["--variants", bad])
