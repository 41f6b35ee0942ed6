"""`hat convert-gguf` on GGUF files written here from tiny checkpoints of every family.

Oracles: the source checkpoint itself (float GGUFs must give its logits within 1e-4), and transformers' own GGUF
loader (`from_pretrained(dir, gguf_file=...)`, an independent dequantizer and name map) for quantized files.
"""
from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from checkpoints import FAMILIES, TOKENIZER_TEXT
from gguf_files import llama3_rope_divisors, write_gguf
from hat.cli.main import main
from hat.common.gguf_import import convert_gguf
from hat.common.gguf_metadata import GGUFError, llama3_rope_from_factors
from hat.common.model_spec import UnsupportedModelError, load_model_spec

TOL = 1e-4
TEXT = TOKENIZER_TEXT[:300]
Q = gguf.GGMLQuantizationType


@torch.no_grad()
def logits(model_dir, ids: list[int], **kwargs) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()
    return model(torch.tensor([ids])).logits[0]


def no_leftovers(folder) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_float_gguf_gives_back_the_source_model(tiny_checkpoint, tmp_path, family):
    source = tiny_checkpoint(family)
    out = convert_gguf(write_gguf(source, tmp_path / "model.gguf"), tmp_path / "out")
    ids = AutoTokenizer.from_pretrained(source)(TEXT)["input_ids"]
    assert (logits(out, ids) - logits(source, ids)).abs().max() < TOL
    spec, expected = load_model_spec(out), load_model_spec(source)  # the runtime reads it as it reads the source
    for field in ("model_type", "num_layers", "num_kv_heads", "head_dim", "qkv_bias", "o_bias", "mlp_bias", "qk_norm",
                  "tie_word_embeddings", "sliding_windows"):
        assert getattr(spec, field) == getattr(expected, field), field
    if family not in ("qwen2", "qwen3"):  # transformers' Qwen2Tokenizer imposes Qwen's split regex, which the tiny
        # test vocabulary was not trained with; Llama-family files keep the file's byte-level splitting
        assert AutoTokenizer.from_pretrained(out)(TEXT)["input_ids"] == ids


# transformers' loader (5.24) leaves out Llama's biases, llama 3's rope_freqs, Mistral's sliding window (the 12-token
# prompt stays inside it) and a Qwen3 head width other than hidden/heads: the float test above covers those
@pytest.mark.parametrize("family,qtype", [("mistral", Q.Q8_0), ("qwen2", Q.Q4_1), ("mistral", Q.Q4_0)])
def test_a_quantized_gguf_matches_transformers_own_gguf_loader(tiny_checkpoint, tmp_path, family, qtype):
    source = tiny_checkpoint(family)
    gguf_file = write_gguf(source, tmp_path / "model.gguf", qtype)
    out = convert_gguf(gguf_file, tmp_path / "out")
    ids = AutoTokenizer.from_pretrained(source)(TEXT)["input_ids"][:12]
    ours, theirs = logits(out, ids), logits(tmp_path, ids, gguf_file="model.gguf")
    assert (ours - theirs).abs().max() < TOL
    assert (ours - logits(source, ids)).abs().max() > 10 * TOL  # the quantization is real, so the check above is too
    card = (out / "README.md").read_text()
    assert f"dequantized to float32" in card and qtype.name in card


def test_conversion_is_deterministic(tiny_checkpoint, tmp_path):
    gguf_file = write_gguf(tiny_checkpoint("llama3"), tmp_path / "model.gguf", Q.Q8_0)
    first, second = convert_gguf(gguf_file, tmp_path / "a"), convert_gguf(gguf_file, tmp_path / "b")
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir()) and "model.safetensors" in names
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_llama3_rope_parameters_are_recovered_from_the_rope_freqs_tensor():
    config = {"hidden_size": 4096, "num_attention_heads": 32, "max_position_embeddings": 131072,
              "model_type": "llama", "rope_parameters": {
                  "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    divisors = llama3_rope_divisors(config).astype(np.float32).astype(np.float64)  # stored as F32, as llama.cpp does
    assert llama3_rope_from_factors(divisors, 500000.0, 128) == config["rope_parameters"]
    with pytest.raises(UnsupportedModelError, match="not a llama 3 rope scaling"):
        llama3_rope_from_factors(divisors[::-1].copy(), 500000.0, 128)


def test_bad_files_get_clear_errors_and_leave_nothing(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("llama3")
    good = write_gguf(source, tmp_path / "good.gguf")
    data = good.read_bytes()
    out_root = tmp_path / "out"
    out_root.mkdir()
    cases = {
        "missing": (tmp_path / "absent.gguf", FileNotFoundError, "no GGUF file"),
        "half": (data[:len(data) // 2], GGUFError, "not a readable GGUF"),
        "short": (data[:-8], GGUFError, "not a readable GGUF"),
        "magic": (b"GGML" + data[4:], GGUFError, "not a readable GGUF"),
        "arch": (write_gguf(source, tmp_path / "arch.gguf", architecture="gpt2"), UnsupportedModelError, "'gpt2'"),
        "moe": (write_gguf(source, tmp_path / "moe.gguf", replace={
            "blk.0.ffn_gate_exps.weight": np.zeros((4, 160, 64), np.float32)}), UnsupportedModelError, "ffn_gate_exps"),
        "int8": (write_gguf(source, tmp_path / "int8.gguf", replace={
            "blk.1.attn_v.weight": np.zeros((32, 64), np.int8)}), UnsupportedModelError, "type I8"),
    }
    for name, (content, error, message) in cases.items():
        path = content if not isinstance(content, bytes) else tmp_path / f"{name}.gguf"
        if isinstance(content, bytes):
            path.write_bytes(content)
        with pytest.raises(error, match=message):
            convert_gguf(path, out_root / name)
        assert not (out_root / name).exists() and no_leftovers(out_root), name
    convert_gguf(good, out_root / "done")
    with pytest.raises(FileExistsError):
        convert_gguf(good, out_root / "done")


def test_the_command(tiny_checkpoint, tmp_path, capsys):
    gguf_file = write_gguf(tiny_checkpoint("qwen2"), tmp_path / "model.gguf", Q.F16)
    assert main(["convert-gguf", str(gguf_file), "--out", str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip().endswith(str(tmp_path / "out"))
    assert load_model_spec(tmp_path / "out").model_type == "qwen2"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").dtype == torch.bfloat16
    shutil.copy(gguf_file, tmp_path / "bad.gguf")
    with open(tmp_path / "bad.gguf", "r+b") as f:
        f.truncate(1000)
    assert main(["convert-gguf", str(tmp_path / "bad.gguf"), "--out", str(tmp_path / "out2")]) == 2
    assert "not a readable GGUF" in capsys.readouterr().err
