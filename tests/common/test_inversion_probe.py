"""scripts/privacy_inversion_probe.py: the states it inverts are what a device sends, and its probes invert them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import privacy_inversion_probe as probe_script  # noqa: E402
from privacy_chat_text import fixed_opening, prompt_windows, training_windows  # noqa: E402
from privacy_inversion_probe import (baselines, collect_states, evaluate, fit_lda, fit_nearest, sample_windows,  # noqa: E402
                                     train_probe)

SEQ_LEN = 128
# a ChatML template with a default system prompt, as SmolLM2's, for the reference tokenizer (which has none)
CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
          "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
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
                              "--epochs", "1", "--probe-width", "128", "--batch-size", "128", "--device-rounds", "3",
                              "--json", str(out), "--markdown", str(tmp_path / "probe.md")]) == 0
    result = json.loads(out.read_text())
    assert [row["input_layers"] for row in result["rows"]] == [0, 2]  # K=0, the embedding check, comes first
    assert result["train_tokens"] == 2000 and result["eval_tokens"] == 800
    assert result["settings"]["epochs"] == 1 and result["settings"]["seed"] == 0
    for row in result["rows"]:
        assert set(row["probes"]) == {"linear", "mlp"} and row["probe"] in row["probes"]
        assert row["top1"] == max(p["top1"] for p in row["probes"].values())
        assert 0 <= row["top1"] <= row["top5"] <= 1
    assert result["rows"][0]["top1"] > result["baseline"]["majority_top1"] + 0.3
    # the device's time per token beside each split point (none for K=0, which is no split)
    assert result["rows"][0]["device"] is None and result["rows"][1]["device"]["input_layers"] == 2
    assert result["device"]["rows"] == [result["rows"][1]["device"]] and result["device"]["rounds"] == 3
    table = capsys.readouterr().out
    assert (tmp_path / "probe.md").read_text().strip() in table
    assert "| 2 | after 2 layers |" in table and "device ms/token" in table
    assert "embedding" in table and "after 2 layers" in table and "Majority baseline" in table


def test_main_refuses_a_split_past_the_model(capsys):
    with pytest.raises(SystemExit, match="below the model's 12 layers"):
        probe_script.main(["--model", "reference", "-K", "12", "--train-tokens", "100", "--eval-tokens", "100"])


def test_lda_probe_inverts_the_hidden_states(pairs):
    """The closed-form attacker: the embeddings up to the coverage, and two layers in at least what the trained
    softmax probe recovers (it fits the same linear scores without the epochs)."""
    _, _, (train_states, train_tokens), (eval_states, eval_tokens) = pairs
    reference = baselines(train_tokens, eval_tokens)
    lda = {k: evaluate(fit_lda(train_states[k], train_tokens), eval_states[k], eval_tokens) for k in (0, 2)}
    assert lda[0]["top1"] > 0.98 * reference["coverage"]
    assert lda[0]["top5"] <= reference["coverage"] + 1e-9
    softmax = evaluate(train_probe(train_states[2], train_tokens, "linear", epochs=2, batch_size=128, seed=0),
                       eval_states[2], eval_tokens)
    assert lda[2]["top1"] > reference["majority_top1"] + 0.3
    assert lda[2]["top1"] >= softmax["top1"] - 0.02


def test_nearest_probe_names_tokens_never_seen_in_training(reference, pairs):
    """The attacker with the model's weights maps states to the input embeddings: on the embeddings themselves it
    recovers every token, those absent from its training pairs included (past the coverage, the other probes'
    ceiling); two layers in it still beats the majority baseline by far."""
    _, model, _ = reference
    _, _, (train_states, train_tokens), (eval_states, eval_tokens) = pairs
    table = model.get_input_embeddings().weight.detach().float()
    reference_figures = baselines(train_tokens, eval_tokens)
    unseen = ~torch.isin(eval_tokens, train_tokens)
    assert unseen.any()
    probe = fit_nearest(train_states[0], train_tokens, table)
    assert len(probe.classes) == model.config.vocab_size
    assert evaluate(probe, eval_states[0], eval_tokens)["top1"] == 1.0 > reference_figures["coverage"]
    assert evaluate(probe, eval_states[0][unseen], eval_tokens[unseen])["top1"] == 1.0
    deeper = evaluate(fit_nearest(train_states[2], train_tokens, table), eval_states[2], eval_tokens)
    assert deeper["top1"] > reference_figures["majority_top1"] + 0.2
    with pytest.raises(ValueError, match="input embeddings"):
        train_probe(train_states[2], train_tokens, "nearest")


def test_lda_is_the_gaussian_bayes_rule():
    """Classes drawn from Gaussians with one shared covariance: LDA's choice is the Bayes rule's, computed from the
    true means, covariance and priors, on nearly every point (the fitted ones differ by sampling error)."""
    generator = torch.Generator().manual_seed(0)
    d, classes = 6, 5
    means = torch.randn(classes, d, generator=generator) * 1.5
    mix = torch.randn(d, d, generator=generator) / d ** 0.5 + torch.eye(d)
    priors = torch.tensor([0.4, 0.25, 0.15, 0.12, 0.08])
    def draw(n):
        labels = torch.multinomial(priors, n, replacement=True, generator=generator)
        return means[labels] + torch.randn(n, d, generator=generator) @ mix.T, labels
    x, y = draw(40_000)
    probe = fit_lda(x, y + 10, shrinkage=0.0)  # token ids 10..14
    test_x, test_y = draw(5_000)
    precision = torch.linalg.inv(mix @ mix.T)
    scores = test_x @ precision @ means.T - 0.5 * ((means @ precision) * means).sum(1) + priors.log()
    bayes = scores.argmax(1) + 10
    chosen = probe.topk(test_x, 1)[:, 0]
    assert (chosen == bayes).float().mean() > 0.98
    assert (chosen == test_y + 10).float().mean() > 0.5  # and it is a real classifier (chance: 0.4)


@pytest.fixture(scope="module")
def chat_tokenizer(reference):
    from transformers import AutoTokenizer

    model_dir, _, _ = reference
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHATML
    return tokenizer


def test_prompt_windows_count_only_the_users_text(chat_tokenizer):
    tokenizer = chat_tokenizer
    prompts = ["Write a haiku about the sea.", "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n"]
    windows = prompt_windows("set", prompts, tokenizer)
    assert windows.name == "set" and len(windows.ids) == 2
    opening = fixed_opening(tokenizer)
    assert tokenizer.decode(opening).startswith("<|im_start|>system")
    for prompt, ids, keep in zip(prompts, windows.ids, windows.keep):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"] and len(keep) == len(ids)
        assert ids[:len(opening)] == opening and not any(keep[:len(opening)])
        counted = [t for t, k in zip(ids, keep) if k]
        assert tokenizer.decode(counted).strip() == prompt.strip()  # the user's text, none of the template's
        assert not keep[-1]  # the generation prompt is not counted
    assert windows.counted == sum(map(sum, windows.keep))


def test_training_windows_fill_the_budget_after_the_opening(chat_tokenizer):
    tokenizer = chat_tokenizer
    conversations = [[{"role": "user", "content": f"Question {i}: " + "why is the sky blue? " * (3 + 5 * i)},
                      {"role": "assistant", "content": "Because of Rayleigh scattering. " * (2 + i)}] for i in range(6)]
    conversations.insert(2, [{"role": "user", "content": "hi"}])  # too short: fewer than MIN_COUNTED positions
    opening = fixed_opening(tokenizer)
    seen = []
    windows = training_windows(conversations, tokenizer, max_tokens=300, seq_len=96, progress=seen.append)
    assert windows.counted == 300 == sum(seen)
    for ids, keep in zip(windows.ids, windows.keep):
        assert len(ids) == len(keep) <= 96 and ids[:len(opening)] == opening
        assert keep == [False] * len(opening) + [True] * (len(ids) - len(opening))
    full = tokenizer.apply_chat_template(conversations[0], tokenize=False)
    assert windows.ids[0] == tokenizer(full, add_special_tokens=False)["input_ids"][:96]
    assert tokenizer.decode(windows.ids[1]).count("hi<|im_end|>") == 0  # the short conversation was skipped


def test_masked_states_are_the_same_positions(reference, pairs):
    """collect_states with masks gives the rows of the kept positions, the same vectors as without masks."""
    _, model, _ = reference
    train_windows, _, (train_states, train_tokens), _ = pairs
    windows = train_windows[:3]
    keep = [[j % 3 == 1 for j in range(len(w))] for w in windows]
    states, tokens = collect_states(model, windows, [2], keep=keep)
    assert tokens.tolist() == [t for w, m in zip(windows, keep) for t, k in zip(w, m) if k]
    rows = [sum(len(w) - 1 for w in windows[:i]) + j - 1 for i, w in enumerate(windows) for j in range(len(w)) if keep[i][j]]
    torch.testing.assert_close(states[2], train_states[2][rows], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one mask per window"):
        collect_states(model, windows, [2], keep=keep[:2])


def test_device_step_times_per_split_point(reference):
    from privacy_device_cost import CostSettings, device_step_times

    model_dir, _, _ = reference
    result = device_step_times(model_dir, [1, 4], CostSettings(rounds=3, warmup=1, past=32))
    assert [r["input_layers"] for r in result["rows"]] == [1, 4]
    assert result["num_layers"] == 12 and result["output_layers"] == 1 and result["whole_ms"] > 0
    for r in result["rows"]:
        assert r["input_ms"] > 0 and r["output_ms"] == result["output_ms"] > 0
        assert r["device_ms"] == pytest.approx(r["input_ms"] + r["output_ms"])
        assert r["share"] == pytest.approx(r["device_ms"] / result["whole_ms"])
    with pytest.raises(ValueError, match="K must lie in"):
        device_step_times(model_dir, [11], CostSettings(rounds=1))


def test_chat_data_needs_a_chat_template():
    with pytest.raises(SystemExit):
        probe_script.main(["--model", "reference", "--data", "chat", "-K", "1", "--train-tokens", "100"])
