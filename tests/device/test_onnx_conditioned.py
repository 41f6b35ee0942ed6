"""The onnxruntime backend with a verified-conditioned draft adapter (AdapterConfig.conditioning), against torch.

- The export wrapper of a conditioned adapter computes DraftAdapter.forward, `previous` included (every family).
- `hat export-onnx` exports it with a third input `previous` before the past; on the onnxruntime backend its estimates
  and cache entries equal the torch adapter's within the export tolerance over a prompt chunk, single steps, and an
  adapter-only retry after a cut (run_adapter, whose embeddings come from the bundle's weights), at past lengths 0,
  20, 21 and 21 again; a different `previous` gives a different estimate (the input is used).
- Greedy speculation on the onnxruntime backend equals plain split decoding (threshold 0: drafts mostly rejected,
  so rollback and settle's rewrite run), and drafts the same tokens, round for round, as the torch backend.
- The onnxruntime adapter refuses a missing, unwanted or misshapen `previous` with DraftAdapter's errors.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cluster import running_cloud
from hat.common.layers import SequenceSpan
from hat.common.split import split_checkpoint
from hat.device.device_model import DeviceModel
from hat.device.onnx_backend import OnnxAdapter
from hat.device.onnx_manifest import past_names
from hat.device.speculation import SpeculationConfig
from test_generate_oracle import PROMPTS
from test_onnx_backend import _past
from test_speculative import speculative_beside_plain
from test_speculative_conditioned import CASES, random_conditioned_adapter

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILY, K, M = "qwen3", 2, 2  # q/k norms, input, adapter, output layers and head graphs all exported


@pytest.mark.parametrize("family,k,m", CASES, ids=[f"{f}-K{k}-M{m}" for f, k, m in CASES])
@torch.inference_mode()
def test_conditioned_adapter_graph_computes_the_adapter(tiny_checkpoint, tmp_path, family, k, m):
    """20 positions from 0, then 3 on the cached past: the graph's estimates and new cache entries are the adapter's."""
    from hat.device.onnx_graphs import ConditionedAdapterGraph, adapter_graph

    model_dir = tiny_checkpoint(family)
    adapter = random_conditioned_adapter(model_dir, k, m, tmp_path / "adapter")
    device_dir, _ = split_checkpoint(model_dir, k, m, tmp_path / "bundle", adapter=adapter)
    model = DeviceModel.load(device_dir)
    graph = adapter_graph(model.adapter)
    assert isinstance(graph, ConditionedAdapterGraph)
    g = torch.Generator().manual_seed(0)
    width = model.spec.hidden_size
    hidden, embeds, previous = (torch.randn(23, width, generator=g) for _ in range(3))
    cache = model.adapter.new_cache()
    for start, end in ((0, 20), (20, 23)):
        past = _past(cache, start)
        want = model.adapter(hidden[start:end], embeds[start:end], [SequenceSpan(cache, start, end - start)],
                             previous[start:end])
        got, keys, values = graph(hidden[None, start:end], embeds[None, start:end], previous[None, start:end], *past)
        torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(keys[:, 0], cache.keys[:, :, start:end], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values[:, 0], cache.values[:, :, start:end], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def conditioned_export(tiny_checkpoint, tmp_path_factory):
    """(checkpoint, device bundle) of a tiny qwen3 split with a random conditioned adapter, exported by the
    `hat export-onnx` command (float32)."""
    from hat.cli.main import main

    model_dir = tiny_checkpoint(FAMILY)
    work = tmp_path_factory.mktemp("onnx-conditioned")
    adapter = random_conditioned_adapter(model_dir, K, M, work / "adapter")
    device_dir, _ = split_checkpoint(model_dir, K, M, work / "bundle", adapter=adapter)
    assert main(["export-onnx", "--bundle", str(device_dir)]) == 0
    return model_dir, device_dir


def test_export_has_the_previous_input(conditioned_export):
    import onnxruntime as ort

    _, device_dir = conditioned_export
    model = DeviceModel.load(device_dir, backend="onnxruntime")
    assert model.conditioned_adapter and model.backend.startswith("onnxruntime")
    session = ort.InferenceSession(str(device_dir / "onnx" / "adapter.onnx"))
    shapes = {arg.name: arg.shape for arg in session.get_inputs()}
    assert list(shapes) == ["hidden", "embeds", "previous", *past_names(model.adapter.config.depth)]
    assert shapes["previous"][:2] == ["batch", "sequence"]


@torch.inference_mode()
def test_onnxruntime_conditioned_adapter_matches_torch(conditioned_export):
    from hat.device.onnx_export import EXPORT_TOLERANCE

    _, device_dir = conditioned_export
    states = {}
    for backend in ("torch", "onnxruntime"):
        model = DeviceModel.load(device_dir, backend=backend)
        width = model.spec.hidden_size
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(model.spec.vocab_size, (24,), generator=g).tolist()
        previous = torch.randn(24, width, generator=g)
        ic, ac = model.input_part.new_cache(), model.adapter.new_cache()
        hidden, estimate = model.run_input(ids[:20], 0, ic, ac, previous[:20])
        out = [hidden, estimate]
        for i in (20, 21):
            out += model.run_input(ids[i:i + 1], i, ic, ac, previous[i:i + 1])
        ic.truncate(21)
        ac.truncate(21)
        hidden, _ = model.run_input(ids[21:24], 21, ic)  # the input part first, the adapter when `previous` comes
        out += [hidden, model.run_adapter(ids[21:24], hidden, 21, ac, previous[21:24])]
        assert ac.length == 24
        out += [ac.keys[:, :, :24].clone(), ac.values[:, :, :24].clone()]
        # the same tokens with other previous outputs: another estimate
        out.append(model.run_adapter(ids[21:24], hidden, 21, ac, previous[21:24].flip(0)))
        states[backend] = out
    for i, (want, got) in enumerate(zip(states["torch"], states["onnxruntime"], strict=True)):
        assert want.dtype == got.dtype == torch.float32 and want.shape == got.shape, i
        assert float((want - got).abs().max()) < EXPORT_TOLERANCE["float32"], i
    assert float((states["onnxruntime"][-1] - states["onnxruntime"][-4]).abs().max()) > 1e-2


def test_greedy_conditioned_speculation_on_onnxruntime_matches_plain(conditioned_export, tmp_path):
    model_dir, device_dir = conditioned_export
    models = {b: DeviceModel.load(device_dir, backend=b) for b in ("torch", "onnxruntime")}
    rounds = {}
    with running_cloud(model_dir, K, M, tmp_path) as cluster:
        with cluster.generator(models["onnxruntime"]) as gen:
            drafted = accepted = 0
            for prompt in PROMPTS:
                _, runs = speculative_beside_plain(gen, gen.encode(prompt))
                for run in runs:
                    drafted += sum(r.drafted for r in run.decode_rounds)
                    accepted += sum(r.accepted for r in run.decode_rounds)
        assert drafted > accepted  # rejections happened: rollback and settle's rewrite ran
        # timing-free rounds (no drafting ahead, threshold lengths): the same drafts and acceptances on both backends
        for backend, model in models.items():
            with cluster.generator(model) as gen:
                gen.speculation = SpeculationConfig(threshold=0.0, max_draft=4, parallel=False, length="threshold")
                rounds[backend] = [[(r.drafted, r.accepted) for r in gen.generate_ids(gen.encode(p), 16).decode_rounds]
                                   for p in PROMPTS]
    assert rounds["onnxruntime"] == rounds["torch"]
    assert any(accepted for run in rounds["torch"] for _, accepted in run)


@torch.inference_mode()
def test_onnxruntime_adapter_refuses_a_wrong_previous(conditioned_export):
    _, device_dir = conditioned_export
    model = DeviceModel.load(device_dir, backend="onnxruntime")
    width = model.spec.hidden_size
    hidden, embeds = torch.zeros(2, width), torch.zeros(2, width)
    span = [SequenceSpan(model.adapter.new_cache(), 0, 2)]
    with pytest.raises(ValueError, match="verified-conditioned adapter needs `previous`"):
        model.adapter(hidden, embeds, span)
    with pytest.raises(ValueError, match="needs `previous`"):
        model.run_input([1, 2], 0, model.input_part.new_cache(), model.adapter.new_cache())
    with pytest.raises(ValueError, match=r"`previous` has shape \(1, "):
        model.adapter(hidden, embeds, span, torch.zeros(1, width))
    input_only = OnnxAdapter(replace(model.adapter.config, conditioning="input"), model.adapter.graph)
    with pytest.raises(ValueError, match="input-conditioned adapter takes no `previous`"):
        input_only(hidden, embeds, span, torch.zeros(2, width))
