"""The onnxruntime backend against the torch backend (the oracle: itself checked against transformers elsewhere).

- The export wrappers (dense tensors, explicit caches) compute the runtime parts' functions, for every family.
- `hat export-onnx` on the reference model: its graphs keep batch, sequence and past free; their logits are within
  1e-4 of torch's in float32 over a prompt chunk, drafting steps and a verification after a rollback; greedy
  speculative generation against a loopback cloud gives the same tokens (and the same rounds) on both backends.
- A split with no output layers and no adapter exports and runs; stale or missing exports get clear errors.
- The sessions' worker threads sleep between calls (spinning workers of idle sessions took the running one's cores).
"""
from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import torch

from hat.cli.main import main
from hat.common.default_model import DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS, reference_model_dir
from hat.common.layers import SequenceSpan
from hat.common.split import split_checkpoint
from hat.device.cloud_link import LinkConfig
from hat.device.device_model import DeviceModel
from hat.device.onnx_backend import choose_providers
from hat.device.onnx_graphs import AdapterGraph, HeadGraph, InputPartGraph, OutputLayersGraph
from hat.device.onnx_manifest import OnnxBundleError, past_names
from hat.device.speculation import SpeculationConfig
from test_generate_oracle import assert_same_greedy, hf_greedy
from test_speculative import device_with_adapter

FAMILY_SPLITS = [("llama3", 1, 1), ("llama_tied_bias", 2, 1), ("mistral", 2, 1), ("qwen2", 1, 2), ("qwen3", 2, 1)]
CODE = ("import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser()\n"
        "    parser.add_argument('--verbose', action='store_true')\n    args = parser.parse_args(argv)\n"
        "    for path in args.paths:\n        with open(path) as f:\n            print(f.read())\n    return 0\n")


def _empty_past(layers: int, kv_heads: int, head_dim: int, batch: int = 1) -> tuple[torch.Tensor, ...]:
    return (torch.zeros(batch, kv_heads, 0, head_dim),) * (2 * layers)


def _past(cache, start: int) -> tuple[torch.Tensor, ...]:
    """The graphs' past inputs: key_0, value_0, key_1, ... each [1, kv_heads, start, head_dim]."""
    return tuple(t[layer, None, :, :start] for layer in range(cache.num_layers) for t in (cache.keys, cache.values))


@pytest.mark.parametrize("family,k,m", FAMILY_SPLITS, ids=[f"{f}-K{k}-M{m}" for f, k, m in FAMILY_SPLITS])
@torch.inference_mode()
def test_dense_graphs_compute_the_runtime_parts(tiny_checkpoint, tmp_path, family, k, m):
    """20 tokens (past mistral's 12-token window), then 3 more on the cached past: the export wrappers give the
    runtime parts' outputs and new cache entries; two rows in one call give each row's own result."""
    model = device_with_adapter(tiny_checkpoint(family), k, m, tmp_path)
    spec = model.spec
    ids = torch.randint(spec.vocab_size, (23,), generator=torch.Generator().manual_seed(0))
    ic, ac, oc = model.input_part.new_cache(), model.adapter.new_cache(), model.output_part.new_cache()
    graphs = (InputPartGraph(model.input_part), AdapterGraph(model.adapter), OutputLayersGraph(model.output_part),
              HeadGraph(model.output_part))
    for start, end in ((0, 20), (20, 23)):
        spans = lambda cache: [SequenceSpan(cache, start, end - start)]  # noqa: E731
        past_i, past_a, past_o = _past(ic, start), _past(ac, start), _past(oc, start)
        hidden, embeds = model.input_part.forward_tokens(ids[start:end], spans(ic))
        estimate = model.adapter(hidden, embeds, spans(ac))
        out = model.output_part.forward_layers(estimate, spans(oc))
        logits = model.output_part.logits(out)

        g_hidden, g_embeds, keys, values = graphs[0](ids[None, start:end], *past_i)
        torch.testing.assert_close(g_hidden[0], hidden, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g_embeds[0], embeds)
        torch.testing.assert_close(keys[:, 0], ic.keys[:, :, start:end], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values[:, 0], ic.values[:, :, start:end], atol=1e-5, rtol=1e-5)
        g_estimate, keys, _ = graphs[1](hidden[None], embeds[None], *past_a)
        torch.testing.assert_close(g_estimate[0], estimate, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(keys[:, 0], ac.keys[:, :, start:end], atol=1e-5, rtol=1e-5)
        g_out, keys, _ = graphs[2](estimate[None], *past_o)
        torch.testing.assert_close(g_out[0], out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(keys[:, 0], oc.keys[:, :, start:end], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(graphs[3](out[None])[0], logits, atol=1e-4, rtol=1e-5)

    other = torch.randint(spec.vocab_size, (20,), generator=torch.Generator().manual_seed(1))
    empty = _empty_past(k, spec.num_kv_heads, spec.head_dim)
    one = graphs[0](other[None], *empty)[0]
    both = graphs[0](torch.stack([ids[:20], other]), *(t.expand(2, -1, -1, -1) for t in empty))[0]
    torch.testing.assert_close(both[1], one[0], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def reference_export(tmp_path_factory):
    """The reference model's default split in float32 with its adapter, exported by the `hat export-onnx` command."""
    bundle = tmp_path_factory.mktemp("onnx-reference") / "bundle"
    device_dir, _ = split_checkpoint(reference_model_dir(), DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS, bundle,
                                     dtype="float32")
    assert main(["export-onnx", "--bundle", str(device_dir)]) == 0
    return device_dir


def test_export_keeps_batch_sequence_and_past_free(reference_export):
    import onnxruntime as ort

    manifest = json.loads((reference_export / "onnx" / "onnx_manifest.json").read_text())
    assert set(manifest["graphs"]) == {"input_part", "adapter", "output_layers", "head"}
    assert all(error < 1e-4 for error in manifest["max_abs_error"].values()), manifest["max_abs_error"]
    session = ort.InferenceSession(str(reference_export / "onnx" / "input_part.onnx"))
    shapes = {arg.name: arg.shape for arg in session.get_inputs()}
    assert list(shapes) == ["input_ids", *past_names(DEFAULT_INPUT_LAYERS)]
    assert shapes["input_ids"] == ["batch", "sequence"]
    for name in past_names(DEFAULT_INPUT_LAYERS):
        assert [isinstance(d, str) for d in shapes[name]] == [True, False, True, False]
    # three rows with a shared past of 4 positions: each row's result is the row's own
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 8000, (3, 5))
    past = {name: rng.standard_normal((3, 4, 4, 32)).astype(np.float32) for name in past_names(DEFAULT_INPUT_LAYERS)}
    batched = session.run(None, {"input_ids": ids, **past})
    for row in range(3):
        alone = session.run(None, {"input_ids": ids[row:row + 1], **{n: p[row:row + 1] for n, p in past.items()}})
        for b, a in zip(batched, alone):
            np.testing.assert_allclose(b[:, row:row + 1] if b.ndim == 5 else b[row:row + 1], a, atol=1e-5)


@torch.inference_mode()
def test_onnxruntime_logits_match_torch_within_1e4(reference_export):
    """A 60-token prompt chunk, four drafting steps, a rollback and a five-token verification: every hidden state and
    every logit of the onnxruntime backend within 1e-4 of the torch backend's (float32), the same argmax."""
    states, logits = {}, {}
    for backend in ("torch", "onnxruntime"):
        model = DeviceModel.load(reference_export, backend=backend)
        ids = model.tokenizer(CODE)["input_ids"][:64]
        assert len(ids) == 64
        ic, oc, ac = model.input_part.new_cache(), model.output_part.new_cache(), model.adapter.new_cache()
        hidden, estimate = model.run_input(ids[:60], 0, ic, ac)
        out = model.output_part.forward_layers(hidden, [SequenceSpan(oc, 0, 60)])
        states[backend], logits[backend] = [hidden, estimate, out], [model.output_part.logits(out[-1:])]
        for i in range(60, 64):  # drafting: input part, adapter, output part over the estimate, head
            hidden, estimate = model.run_input(ids[i:i + 1], i, ic, ac)
            out = model.output_part.forward_layers(estimate, [SequenceSpan(oc, i, 1)])
            states[backend] += [hidden, estimate, out]
            logits[backend].append(model.output_part.logits(out))
        for cache in (ic, oc, ac):
            cache.truncate(61)
        hidden, _ = model.run_input(ids[59:64], 59, ic, ac)  # a retry from before the cut
        verified = model.output_part.forward_layers(hidden, [SequenceSpan(oc, 59, 5)])
        states[backend] += [hidden, verified]
        logits[backend].append(model.output_part.logits(verified))
        two_sequences = [SequenceSpan(model.output_part.new_cache(), 0, 3), SequenceSpan(oc, 62, 2)]
        states[backend].append(model.output_part.forward_layers(hidden[:5], two_sequences))
        assert ic.length == oc.length == ac.length == 64
    for kind in (states, logits):
        for want, got in zip(kind["torch"], kind["onnxruntime"], strict=True):
            assert want.dtype == got.dtype == torch.float32 and want.shape == got.shape
            assert float((want - got).abs().max()) < 1e-4
    for want, got in zip(logits["torch"], logits["onnxruntime"]):
        assert torch.equal(want.argmax(-1), got.argmax(-1))


@torch.inference_mode()
def test_sessions_burn_no_cpu_between_calls(reference_export):
    """After drafting calls on 2 threads, the four sessions' workers sleep: the process uses (almost) no CPU while
    idle. onnxruntime's default spin-waiting burnt 67 ms of CPU in 300 ms idle here; sleeping workers burn < 1."""
    model = DeviceModel.load(reference_export, backend="onnxruntime", threads=2)
    ic, ac, oc = model.input_part.new_cache(), model.adapter.new_cache(), model.output_part.new_cache()
    hidden, _ = model.run_input(list(range(3, 40)), 0, ic, ac)
    model.output_part.forward_layers(hidden, [SequenceSpan(oc, 0, 37)])
    for i in range(37, 41):
        _, estimate = model.run_input([i], i, ic, ac)
        model.output_part.logits(model.output_part.forward_layers(estimate, [SequenceSpan(oc, i, 1)]))
    began = time.process_time()
    time.sleep(0.3)
    assert (time.process_time() - began) * 1e3 < 15


def test_greedy_speculation_gives_the_same_tokens_on_both_backends(reference_export, reference_cloud):
    prompts = ["def fibonacci(n):", CODE, "class Stack:\n    def __init__(self):"]
    model_dir = reference_model_dir()
    models = {b: DeviceModel.load(reference_export, backend=b) for b in ("torch", "onnxruntime")}
    runs = {}
    for backend, model in models.items():
        with reference_cloud.generator(model) as gen:
            gen.speculation = SpeculationConfig(length="threshold")  # timing-free lengths: the same rounds on both
            runs[backend] = [gen.generate_ids(gen.encode(p), 32) for p in prompts]
    for prompt, torch_run, onnx_run in zip(prompts, runs["torch"], runs["onnxruntime"]):
        assert onnx_run.token_ids == torch_run.token_ids
        assert [r.accepted for r in onnx_run.decode_rounds] == [r.accepted for r in torch_run.decode_rounds]
        assert onnx_run.accept_len > 1.5
        ids = models["torch"].tokenizer(prompt)["input_ids"]
        assert_same_greedy(model_dir, ids, onnx_run.token_ids, hf_greedy(model_dir, ids, 32))


def test_generate_command_reports_its_backend(reference_export, reference_cloud, capsys):
    cluster = reference_cloud
    assert main(["generate", "--bundle", str(reference_export), "--cloud", "127.0.0.1", "--data-port",
                 str(cluster.data_port), "--control-port", str(cluster.control_port), "--prompt", "def add(a, b):",
                 "--max-new-tokens", "8", "--backend", "onnxruntime", "--json"]) == 0
    # the device id the command derives (host name and this process's id): its registration is the command's, the latest
    registered = cluster.server.registry._devices[LinkConfig().resolved_device_id()]
    out, err = capsys.readouterr()
    assert "device backend: onnxruntime (CPUExecutionProvider)" in err
    assert len(json.loads(out)["token_ids"]) == 8
    assert registered.capabilities.backend == "onnxruntime (CPUExecutionProvider)"


def test_plain_decoding_on_an_export_with_an_adapter(reference_export, reference_cloud, capsys):
    """`hat generate --no-speculation --backend onnxruntime` leaves the exported adapter unread (its graph is not
    checked or loaded) and gives the speculative run's greedy tokens; a changed adapter is still refused when used."""
    cluster = reference_cloud
    base = ["generate", "--bundle", str(reference_export), "--cloud", "127.0.0.1", "--data-port",
            str(cluster.data_port), "--control-port", str(cluster.control_port), "--prompt", "def add(a, b):",
            "--max-new-tokens", "8", "--backend", "onnxruntime", "--json"]
    tokens = {}
    for flags in ((), ("--no-speculation",)):
        assert main([*base, *flags]) == 0
        result = json.loads(capsys.readouterr().out)
        tokens[flags] = result["token_ids"]
        assert result["speculative"] != bool(flags)
    assert tokens[()] == tokens[("--no-speculation",)] and len(tokens[()]) == 8
    plain = DeviceModel.load(reference_export, backend="onnxruntime", with_adapter=False)
    assert plain.adapter is None


@torch.inference_mode()
def test_split_without_output_layers_or_adapter(tiny_checkpoint, tmp_path):
    """mistral (sliding window 12) with M = 0 and no adapter: only the input part and the head are exported; 30
    tokens cross the window; logits match torch's."""
    device_dir, _ = split_checkpoint(tiny_checkpoint("mistral"), 2, 0, tmp_path / "bundle")
    assert main(["export-onnx", "--bundle", str(device_dir)]) == 0
    assert sorted(p.name for p in (device_dir / "onnx").glob("*.onnx")) == ["head.onnx", "input_part.onnx"]
    logits = []
    for backend in ("torch", "onnxruntime"):
        model = DeviceModel.load(device_dir, backend=backend)
        assert model.adapter is None and model.output_part.num_layers == 0
        cache = model.input_part.new_cache()
        hidden, _ = model.run_input(list(range(3, 33)), 0, cache)
        step, _ = model.run_input([40], 30, cache)
        logits.append(model.output_part.logits(torch.cat([hidden, step])))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=0)


def test_stale_or_missing_exports_are_refused(reference_export, tmp_path):
    bundle = tmp_path / "device"
    shutil.copytree(reference_export, bundle)
    with pytest.raises(ValueError, match="unknown backend"):
        DeviceModel.load(bundle, backend="tensorflow")
    weights = bundle / "adapter" / "adapter.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-4] + b"\0\0\0\0")
    with pytest.raises(OnnxBundleError, match="adapter changed"):
        DeviceModel.load(bundle, backend="onnxruntime")
    weights.write_bytes(original)
    manifest_path = bundle / "onnx" / "onnx_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "format_version": 1}))  # one stacked past input: refused
    with pytest.raises(OnnxBundleError, match="export format 1, this version reads 2; re-run `hat export-onnx`"):
        DeviceModel.load(bundle, backend="onnxruntime")
    manifest_path.write_text(json.dumps(manifest))
    (bundle / "onnx" / "head.onnx").unlink()
    with pytest.raises(OnnxBundleError, match="head.onnx is missing"):
        DeviceModel.load(bundle, backend="onnxruntime")
    shutil.rmtree(bundle / "onnx")
    with pytest.raises(OnnxBundleError, match="hat export-onnx"):
        DeviceModel.load(bundle, backend="onnxruntime")
    assert main(["generate", "--bundle", str(bundle), "--cloud", "127.0.0.1", "--prompt", "x",
                 "--backend", "onnxruntime"]) == 2


def test_providers_prefer_tensorrt_then_cuda_then_cpu():
    offered = ["AzureExecutionProvider", "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    assert choose_providers(offered) == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["CPUExecutionProvider", "AzureExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match="no CPUExecutionProvider"):
        choose_providers(["AzureExecutionProvider"])
