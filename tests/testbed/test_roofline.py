"""Roofline latency model: shapes against transformers' own parameter counts, costs against hand arithmetic."""
from __future__ import annotations

import json

import pytest

from hat.common.cost_fit import PROFILE_SHAPES
from hat.testbed.roofline import (ACCELERATORS, ALLREDUCE_BYTES_PER_S, ALLREDUCE_LATENCY_S, MODEL_SHAPES,
                                  ModelShape, RooflineCost, describe, fit_linear, model_shape)

A6000 = ACCELERATORS["a6000"]
ORIN = ACCELERATORS["jetson-agx-orin"]
LLAMA_7B = MODEL_SHAPES["llama-7b"]


@pytest.mark.parametrize("extra", [{}, {"head_dim": 32}])
def test_from_config_counts_what_transformers_builds(tmp_path, extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, **extra)
    config.save_pretrained(tmp_path)
    shape = ModelShape.from_config(tmp_path)
    assert model_shape(str(tmp_path / "config.json")) == shape == model_shape(str(tmp_path))
    model = LlamaForCausalLM(config)
    layer = model.model.layers[0]
    assert shape.layer_params() == sum(p.numel() for p in layer.parameters())
    assert shape.embedding_params() == model.model.embed_tokens.weight.numel() == 100 * 64
    assert shape.head_params() == model.lm_head.weight.numel() == 100 * 64
    assert shape.total_params() == sum(p.numel() for p in model.parameters())
    head_dim = extra.get("head_dim", 16)
    assert shape.kv_bytes_per_position() == 2 * 2 * head_dim * 2.0  # k and v, 2 kv heads, fp16 default
    assert layer.self_attn.k_proj.weight.shape[0] == 2 * head_dim


def test_from_config_reads_dtype_and_defaults_kv_heads(tmp_path):
    config = {"hidden_size": 32, "num_hidden_layers": 3, "intermediate_size": 48, "num_attention_heads": 4,
              "vocab_size": 50, "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = ModelShape.from_config(tmp_path / "config.json")
    assert (shape.kv_heads, shape.head_dim, shape.bytes_per_param, shape.kv_bytes_per_value) == (4, 8, 4.0, 4.0)
    config["dtype"], config["torch_dtype"] = "bfloat16", None
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert ModelShape.from_config(tmp_path).bytes_per_param == 2.0
    config["dtype"] = "int8"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="dtype"):
        ModelShape.from_config(tmp_path)


def test_presets():
    assert abs(LLAMA_7B.total_params() / 6.74e9 - 1) < 0.01
    assert LLAMA_7B.total_params() == 32 * 202_383_360 + 2 * 32000 * 4096 + 4096  # by hand
    assert abs(MODEL_SHAPES["llama-13b"].total_params() / 13.0e9 - 1) < 0.01
    assert MODEL_SHAPES["vicuna-7b"].layer_params() == LLAMA_7B.layer_params()
    assert LLAMA_7B.kv_bytes_per_position() == 2 * 4096 * 2  # 16 KiB per position per layer


def test_unknown_model_names_the_presets():
    with pytest.raises(ValueError, match="llama-7b.*vicuna-13b"):
        model_shape("nope")


def test_describe():
    assert describe(ORIN) == "jetson-agx-orin: 42.5 TFLOP/s FP16 x0.45, 204.8 GB/s x0.75, spec sheet figures"
    assert all(a.source and 0 < a.compute_efficiency < 1 and 0 < a.memory_efficiency < 1
               for a in ACCELERATORS.values())


def test_decode_is_memory_bound():
    cost = RooflineCost(LLAMA_7B, A6000, layers=32)
    assert cost.weight_bytes() == 32 * LLAMA_7B.layer_params() * 2.0
    assert cost.compute_s([(1, 0)]) < cost.memory_s([(1, 0)]) / 100
    seconds = cost.predict(1)
    assert seconds == pytest.approx(cost.fixed_s() + cost.memory_s([(1, 0)]), rel=1e-12)
    by_hand = A6000.overhead_s + 32 * A6000.per_layer_s + cost.weight_bytes() / (768e9 * A6000.memory_efficiency)
    assert seconds == pytest.approx(by_hand, rel=1e-3)  # KV and activations of one token are negligible
    assert 0.015 < seconds < 0.030
    # a longer context reads more KV cache: 32 layers x 16 KiB per position
    extra = cost.predict(1, 1000) - seconds
    assert extra == pytest.approx(32 * 16384 * 1000 / (768e9 * A6000.memory_efficiency), rel=1e-9)


def test_prefill_is_compute_bound_and_linear():
    cost = RooflineCost(LLAMA_7B, A6000, layers=32, embedding=True, head=True)
    assert cost.compute_s([(2048, 0)]) > 3 * cost.memory_s([(2048, 0)])
    flops = 2 * (32 * LLAMA_7B.layer_params() + 32000 * 4096 + 4096) * 2048 + 32 * 4 * 4096 * 2048 * 2049 / 2
    assert cost.flops([(2048, 0)]) == pytest.approx(flops, rel=1e-12)
    growth = (cost.predict(4096) - cost.predict(2048)) / (cost.predict(2048) - cost.predict(1024))
    assert 2.0 <= growth < 2.3  # doubling tokens doubles the GEMMs, attention grows a little faster


def test_batched_decode_reads_weights_once():
    cost = RooflineCost(LLAMA_7B, A6000, layers=32, head=True)
    batch = cost.spans([(1, 500)] * 32)
    assert batch < 32 * cost.predict(1, 500) / 10
    assert batch > cost.predict(1, 500)
    assert cost.spans([(3, 10), (0, 99)]) == cost.predict(3, 10)
    assert cost.spans([]) == 0.0


def test_tensor_parallel_halves_compute_and_pays_allreduce():
    one = RooflineCost(LLAMA_7B, A6000, layers=32)
    two = RooflineCost(LLAMA_7B, A6000, layers=32, parallel=2)
    allreduce = 32 * (2 * 2048 * 4096 * 2.0 / ALLREDUCE_BYTES_PER_S + ALLREDUCE_LATENCY_S)
    assert two.allreduce_s(2048) == pytest.approx(allreduce, rel=1e-12) and one.allreduce_s(2048) == 0.0
    overhead = one.fixed_s()
    assert two.predict(2048) - allreduce - overhead == pytest.approx((one.predict(2048) - overhead) / 2, rel=1e-12)
    assert 0.5 < two.predict(2048) / one.predict(2048) < 0.75


def test_extra_params_and_part_sizes():
    base = RooflineCost(LLAMA_7B, ORIN, layers=1)
    fused = RooflineCost(LLAMA_7B, ORIN, layers=1, extra_params=2 * 4096 * 4096)
    assert fused.weight_bytes() - base.weight_bytes() == 2 * 4096 * 4096 * 2.0
    assert fused.predict(1) > base.predict(1)
    assert RooflineCost(LLAMA_7B, ORIN, layers=2).kv_bytes_per_position() == 2 * 16384
    assert RooflineCost(LLAMA_7B, ORIN, layers=2).predict(1) < RooflineCost(LLAMA_7B, ORIN, layers=4).predict(1)
    slower = RooflineCost(LLAMA_7B, ACCELERATORS["jetson-agx-xavier"], layers=2)
    assert slower.predict(64) > RooflineCost(LLAMA_7B, ORIN, layers=2).predict(64)


@pytest.mark.parametrize("accelerator", ["a6000", "jetson-agx-orin"])
@pytest.mark.parametrize("part", [dict(layers=32, embedding=True, head=True), dict(layers=2, embedding=True),
                                  dict(layers=1, head=True), dict(layers=1, extra_params=2 * 4096 * 4096)])
def test_fit_linear_reproduces_predict(accelerator, part):
    cost = RooflineCost(LLAMA_7B, ACCELERATORS[accelerator], **part)
    fit = fit_linear(cost)
    assert min(fit.base_s, fit.per_token_s, fit.per_attended_s) >= 0
    for tokens, start in PROFILE_SHAPES:
        assert fit.predict(tokens, start) == pytest.approx(cost.predict(tokens, start), rel=0.25)
