"""The committed reference model: it loads both ways, and its held-out loss is the model card's."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hat.common.default_model import reference_model_dir
from hat.common.reference_corpus import heldout_files, heldout_scores, hf_logits_fn, mean_loss, runtime_logits_fn

FILES_SCORED = 3  # held-out files re-scored here (the card's figure covers all of them)
TOLERANCE = 0.05  # relative, as the issue asks


@pytest.fixture(scope="module")
def reference():
    model_dir = reference_model_dir()
    summary = json.loads((model_dir / "training_summary.json").read_text())
    recorded = {f["relpath"]: f for f in summary["heldout"]["per_file"]}
    # only files with the very bytes the card scored: another interpreter's stdlib may differ
    files = [f for f in heldout_files() if f.relpath in recorded and recorded[f.relpath]["sha256"] == f.sha256()]
    files = sorted((f for f in files if recorded[f.relpath]["tokens"] > 0),
                   key=lambda f: recorded[f.relpath]["tokens"])[:FILES_SCORED]
    if not files:
        pytest.skip("none of the card's held-out files is present unchanged in this interpreter's standard library")
    expected = sum(recorded[f.relpath]["nll"] for f in files) / sum(recorded[f.relpath]["tokens"] for f in files)
    return model_dir, summary, files, expected


def test_card_states_the_summary(reference):
    model_dir, summary, _, _ = reference
    card = (model_dir / "MODEL_CARD.md").read_text()
    assert f"{summary['heldout_loss']:.3f}" in card
    assert summary["model"]["parameters"] > 5_000_000 and summary["model"]["layers"] >= 8
    assert (model_dir / "model.safetensors").stat().st_size < 30_000_000


def test_heldout_loss_matches_card_through_transformers(reference):
    model_dir, _, files, expected = reference
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    loss = mean_loss(heldout_scores(hf_logits_fn(model), tokenizer, files))
    assert loss == pytest.approx(expected, rel=TOLERANCE)


def test_heldout_loss_matches_card_through_the_runtime(reference):
    model_dir, _, files, expected = reference
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    loss = mean_loss(heldout_scores(runtime_logits_fn(model_dir), tokenizer, files))
    assert loss == pytest.approx(expected, rel=TOLERANCE)


def test_split_generation_writes_python(reference_cloud):
    """What `hat demo --model reference` shows (its prompt and sampling, the default split): the reference model
    continues a function header with an indented Python body."""
    from hat.cli.demo_cmd import REFERENCE_PROMPT, REFERENCE_SEED, REFERENCE_TEMPERATURE, REFERENCE_TOP_P
    from hat.common.sampling import SamplingParams

    sampling = SamplingParams(REFERENCE_TEMPERATURE, REFERENCE_TOP_P, REFERENCE_SEED)
    with reference_cloud.generator() as generator:
        text = generator.generate(REFERENCE_PROMPT, 60, sampling).text
    assert text.startswith("\n"), repr(text)
    body = text.splitlines()[1:]
    assert body and all(line.startswith("    ") or not line.strip() for line in body[:2]), repr(text)
    keywords = ("return", "if ", "for ", "self", "None", "def ", "class ", "import ")
    assert sum(k in text for k in keywords) >= 2, repr(text)
