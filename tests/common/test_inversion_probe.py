"""scripts/privacy_inversion_probe.py: the states it inverts are what a device sends, and its probes invert them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import privacy_inversion_probe as probe_script  # noqa: E402
from privacy_inversion_probe import baselines, collect_states, evaluate, sample_windows, train_probe  # noqa: E402

SEQ_LEN = 128
TRAIN_TOKENS, EVAL_TOKENS = 4000, 1500

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small ops: one thread is faster, the more so on shared cores


@pytest.fixture(scope="module")
def reference(one_torch_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hat.common.default_model import reference_model_dir

    model_dir = reference_model_dir()
    return (model_dir, AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(model_dir))


@pytest.fixture(scope="module")
def pairs(reference):
    from hat.common.reference_corpus import split_corpus

    _, model, tokenizer = reference
    train_files, heldout = split_corpus()
    train_windows = sample_windows(train_files, tokenizer, TRAIN_TOKENS, SEQ_LEN, seed=0)
    eval_windows = sample_windows(heldout, tokenizer, EVAL_TOKENS, SEQ_LEN, seed=1)
    train = collect_states(model, train_windows, [0, 2])
    held = collect_states(model, eval_windows, [0, 2])
    return train_windows, eval_windows, train, held


def test_windows_fill_the_budget_and_start_with_bos(reference, pairs):
    _, _, tokenizer = reference
    train_windows, eval_windows, (train_states, train_tokens), (eval_states, eval_tokens) = pairs
    for windows, budget in ((train_windows, TRAIN_TOKENS), (eval_windows, EVAL_TOKENS)):
        assert sum(len(w) - 1 for w in windows) == budget
        assert all(w[0] == tokenizer.bos_token_id and 2 <= len(w) <= SEQ_LEN for w in windows)
        assert all(tokenizer.bos_token_id not in w[1:] for w in windows)
    # the <s> of every window is left out: one pair per prompt token, each K's states aligned with the tokens
    assert train_tokens.tolist() == [t for w in train_windows for t in w[1:]]
    assert train_states[0].shape == train_states[2].shape == (TRAIN_TOKENS, 256)
    assert eval_states[2].shape == (EVAL_TOKENS, 256) and len(eval_tokens) == EVAL_TOKENS
    # seeded: the same windows again, another seed other windows
    from hat.common.reference_corpus import split_corpus

    heldout = split_corpus()[1]
    assert sample_windows(heldout, tokenizer, EVAL_TOKENS, SEQ_LEN, seed=1) == eval_windows
    assert sample_windows(heldout, tokenizer, EVAL_TOKENS, SEQ_LEN, seed=2) != eval_windows


def test_states_are_what_the_device_sends(reference, pairs):
    """hidden_states[K] of transformers equals the project runtime's input part with K layers, position by position."""
    from hat.common.checkpoint import load_tensors
    from hat.common.layers import SequenceSpan
    from hat.common.model_part import ModelPart
    from hat.common.model_spec import load_model_spec

    model_dir, _, _ = reference
    train_windows, _, (train_states, _), _ = pairs
    spec = load_model_spec(model_dir)
    tensors = load_tensors(model_dir, lambda name: True, torch.float32)
    window = torch.tensor(train_windows[0], dtype=torch.long)
    rows = len(window) - 1
    for k in (0, 2):
        part = ModelPart.from_tensors(spec, 0, k, tensors, embedding=True, head=False)
        with torch.no_grad():
            sent = part.forward_layers(part.embed(window), [SequenceSpan(part.new_cache(len(window)), 0, len(window))])
        torch.testing.assert_close(train_states[k][:rows], sent[1:].float(), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(train_states[0][:rows], train_states[2][:rows], atol=1e-2)


def test_split_point_past_the_last_layer_is_refused(reference):
    _, model, _ = reference
    with pytest.raises(ValueError, match="split points"):
        collect_states(model, [[1, 2, 3]], [model.config.num_hidden_layers])


def test_probes_invert_the_hidden_states(pairs):
    _, _, (train_states, train_tokens), (eval_states, eval_tokens) = pairs
    reference = baselines(train_tokens, eval_tokens)
    assert 0 < reference["majority_top1"] < 0.2 and reference["majority_top5"] >= reference["majority_top1"]
    results = {}
    for k in (0, 2):
        for kind in ("linear", "mlp"):
            probe = train_probe(train_states[k], train_tokens, kind, epochs=2, width=256, batch_size=128, seed=0)
            assert set(probe.classes.tolist()) == set(train_tokens.tolist())
            result = evaluate(probe, eval_states[k], eval_tokens)
            assert 0 <= result["top1"] <= result["top5"] <= 1
            assert result["top5"] <= reference["coverage"] + 1e-9  # no probe names a token it never saw
            results[k, kind] = result
    # the embeddings are nearly all recovered (up to the coverage), far above always guessing the commonest token
    assert results[0, "linear"]["top1"] > 0.5
    assert results[0, "linear"]["top1"] > 0.9 * reference["coverage"]
    assert results[0, "linear"]["top1"] > reference["majority_top1"] + 0.4
    # two layers in, much of the prompt still shows (the reference model keeps the token in its residual stream)
    assert max(results[2, kind]["top1"] for kind in ("linear", "mlp")) > reference["majority_top1"] + 0.2


def test_training_is_seeded(pairs):
    _, _, (train_states, train_tokens), (eval_states, _) = pairs
    guesses = [train_probe(train_states[2], train_tokens, "linear", epochs=1, batch_size=256, seed=seed)
               .topk(eval_states[2], 5) for seed in (3, 3, 4)]
    assert torch.equal(guesses[0], guesses[1])
    assert not torch.equal(guesses[0], guesses[2])


def test_baselines_on_known_tokens():
    train = torch.tensor([5, 5, 5, 7, 7, 9])
    held = torch.tensor([5, 7, 1, 1])
    assert baselines(train, held) == {"majority_token": 5, "majority_top1": 0.25, "majority_top5": 0.5, "coverage": 0.5}


def test_main_writes_one_row_per_split_point(tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert probe_script.main(["--model", "reference", "-K", "2", "--train-tokens", "2000", "--eval-tokens", "800", "--seq-len", "128",
                              "--epochs", "1", "--probe-width", "128", "--batch-size", "128", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["input_layers"] for row in result["rows"]] == [0, 2]  # K=0, the embedding check, comes first
    assert result["train_tokens"] == 2000 and result["eval_tokens"] == 800
    assert result["settings"]["epochs"] == 1 and result["settings"]["seed"] == 0
    for row in result["rows"]:
        assert set(row["probes"]) == {"linear", "mlp"} and row["probe"] in row["probes"]
        assert row["top1"] == max(p["top1"] for p in row["probes"].values())
        assert 0 <= row["top1"] <= row["top5"] <= 1
    assert result["rows"][0]["top1"] > result["baseline"]["majority_top1"] + 0.3
    table = capsys.readouterr().out
    assert "embedding" in table and "after 2 layers" in table and "Majority baseline" in table


def test_main_refuses_a_split_past_the_model(capsys):
    with pytest.raises(SystemExit, match="below the model's 12 layers"):
        probe_script.main(["--model", "reference", "-K", "12", "--train-tokens", "100", "--eval-tokens", "100"])
