"""Speculative SAMPLING end to end (device drafting with a random adapter, loopback cloud, verification) is lossless.

The oracle is transformers: on a tiny Llama with a 6-token vocabulary the exact joint probability of the
first generated tokens, p(x1 | prompt) p(x2 | prompt, x1) p(x3 | prompt, x1, x2), comes from a few dozen
forward passes. Hundreds of seeded (so deterministic) speculative generations must fit it by Pearson's
chi-square test; the same test with the verification rule broken (every draft accepted) must reject, which
shows it has the power to catch a wrong rule in the generator's plumbing, not only in `acceptance`.

With 3 new tokens, x1 comes from the prompt pass, and the first speculative round may draft only one token
(its limit is the remaining budget minus the bonus token): accepted, it yields x2 (the draft) and x3 (the
bonus); rejected, x2 is drawn from the residual and a last round with an empty draft yields x3. (No round
drafts ahead here, parallel or not: that needs more budget left than the draft and its bonus.)
"""
from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from cluster import running_cloud
from hat.common.adapter import AdapterConfig, DraftAdapter
from hat.common.checkpoint import fingerprint
from hat.common.model_spec import load_model_spec
from hat.common.sampling import SamplingParams, token_distribution
from hat.common.split import split_checkpoint
from hat.common.token_frequencies import FrequencyTable, FrequencyTableMismatchError, tokenizer_fingerprint
import hat.device.acceptance as verify_module
from hat.device.acceptance import Verdict
from hat.device.device_model import DeviceModel
from hat.device.speculation import SpeculationConfig
from hat.device.generator import SplitGenerator
from test_acceptance import chi2_sf

VOCAB = 6
WORDS = ["<unk>", "<s>", "</s>", "a", "b", "c"]
PROMPT = [1, 3, 3]
NEW_TOKENS = 3
# Measured: the real rule's p-value lies in 0.09-0.84 from 200 to 2000 trials (0.19 at 500), while a subtly
# wrong rule (on a rejection, resample from p instead of the residual max(0, p - q)) gets 3e-7 at 500 trials.
TRIALS = 500
NUCLEUS_TRIALS = 400
POWER_TRIALS = 200  # accepting every draft fails even with 200 trials (measured p ~ 1e-13)
SAMPLE = SamplingParams(temperature=1.0, top_p=1.0)
NUCLEUS = SamplingParams(temperature=0.8, top_p=0.7)
SPECULATION = SpeculationConfig(threshold=0.0, max_draft=3, parallel=True, length="threshold")  # always drafts
SUBSET = [1, 3, 4]  # the reduced draft head's tokens: the target gives the other three a good share too


# many small forwards: on a shared 2-core machine intra-op threads only add synchronisation
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build_checkpoint(out: Path, seed: int = 0) -> Path:
    """A 4-layer Llama over 6 tokens with a word-level tokenizer. No end-of-sequence id (config, generation
    config and tokenizer alike would otherwise stop runs early); initializer_range 0.2 makes next-token
    distributions neither flat nor one-hot (entropy 1.1-1.6 nats of at most ln 6 = 1.79)."""
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.2,
                         bos_token_id=1, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>").save_pretrained(out)
    return out


def random_adapter(model_dir: Path, out: Path, seed: int = 1, scale: float = 0.3) -> Path:
    """A K=1, M=1 adapter with random weights, `project` included (an untrained adapter passes h_K through)."""
    spec = load_model_spec(model_dir)
    torch.manual_seed(seed)
    adapter = DraftAdapter(spec, AdapterConfig(1, 1, spec.hidden_size, 1, 64, fingerprint(model_dir)))
    torch.nn.init.normal_(adapter.project.weight, std=scale)
    adapter.save(out)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model_dir, generator): one loopback cloud and one speculative generator for every test here."""
    work = tmp_path_factory.mktemp("spec-sampling")
    model_dir = build_checkpoint(work / "model")
    adapter = random_adapter(model_dir, work / "adapter")
    device_dir, _ = split_checkpoint(model_dir, 1, 1, work / "spec-bundle", adapter=adapter)
    model = DeviceModel.load(device_dir)
    assert model.adapter is not None and model.stop_ids == ()  # nothing ends a generation early
    with running_cloud(model_dir, 1, 1, work) as cluster, cluster.generator(model) as gen:
        gen.speculation = SPECULATION
        yield model_dir, gen


_JOINTS: dict = {}


@torch.no_grad()
def target_joint(model_dir: Path, params: SamplingParams, length: int = NEW_TOKENS) -> torch.Tensor:
    """Exact [VOCAB] * length joint of the first `length` tokens that sampling the target with `params` draws
    after PROMPT: transformers (float32) over every continuation, token_distribution over its logits."""
    key = (str(model_dir), params, length)
    if key not in _JOINTS:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        prefixes = torch.tensor(list(itertools.product(range(VOCAB), repeat=length - 1)), dtype=torch.long)
        prefixes = prefixes.reshape(-1, length - 1)
        ids = torch.cat([torch.tensor(PROMPT).expand(len(prefixes), -1), prefixes], dim=1)
        logits = model(ids).logits[:, len(PROMPT) - 1:].double()  # [VOCAB^(length-1), length, VOCAB]
        dist = token_distribution(logits, params).double()  # float32 inside: renormalise in float64
        dist = dist / dist.sum(dim=-1, keepdim=True)
        chosen = dist[:, :-1].gather(2, prefixes[:, :, None]).squeeze(2).prod(dim=1)  # p(prefix)
        _JOINTS[key] = (chosen[:, None] * dist[:, -1]).reshape((VOCAB,) * length)
    return _JOINTS[key]


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson goodness of fit over the cells with probs > 0, cells expected fewer than 5 times pooled into
    one (grown with the next smallest cells until it is expected 5 times). A count in a cell of probability 0
    fails at once."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    assert int(counts[probs == 0].sum()) == 0, "a token sequence of probability 0 was generated"
    keep = probs > 0
    counts, expected = counts[keep], counts.sum() * probs[keep] / probs[keep].sum()
    order = torch.argsort(expected)
    counts, expected = counts[order], expected[order]
    pooled = int((expected < 5).sum())
    while pooled < len(expected) and float(expected[:pooled].sum()) < 5:
        pooled += 1
    if pooled > 1:
        counts = torch.cat([counts[:pooled].sum(0, keepdim=True), counts[pooled:]])
        expected = torch.cat([expected[:pooled].sum(0, keepdim=True), expected[pooled:]])
    assert len(expected) >= 2, "too few samples for a chi-square test"
    stat = float(((counts - expected) ** 2 / expected).sum())
    return chi2_sf(stat, len(expected) - 1)


def generate(gen: SplitGenerator, params: SamplingParams, trials: int,
             length: int = NEW_TOKENS) -> tuple[list[tuple[int, ...]], dict[str, int]]:
    """The generated tokens for seeds 0..trials-1, and the decode rounds' draft statistics: rounds, drafted
    and accepted tokens, rounds with a rejection."""
    sequences = []
    stats = dict(rounds=0, drafted=0, accepted=0, rejecting_rounds=0)
    for seed in range(trials):
        result = gen.generate_ids(PROMPT, length, SamplingParams(params.temperature, params.top_p, seed))
        assert len(result.token_ids) == length and result.finish_reason == "length" and result.speculative
        sequences.append(tuple(result.token_ids))
        for step in result.decode_rounds:
            stats["rounds"] += 1
            stats["drafted"] += step.drafted
            stats["accepted"] += step.accepted
            stats["rejecting_rounds"] += step.accepted < step.drafted
    return sequences, stats


def histogram(sequences: list[tuple[int, ...]]) -> torch.Tensor:
    counts = torch.zeros((VOCAB,) * len(sequences[0]), dtype=torch.long)
    for tokens in sequences:
        counts[tokens] += 1
    return counts


def test_oracle_distributions_are_neither_flat_nor_one_hot(setup):
    model_dir, _ = setup
    joint = target_joint(model_dir, SAMPLE)
    assert float(joint.sum()) == pytest.approx(1.0, abs=1e-9)
    p1 = joint.sum(dim=(1, 2))
    p2 = joint.sum(dim=2) / p1[:, None]  # p(x2 | x1)
    for row in (p1, *p2):  # uniform would be 1/6 each, entropy ln 6 = 1.79
        assert 0.6 < float(-(row * row.log()).sum()) and 0.25 < float(row.max()) < 0.9, row
    nucleus = target_joint(model_dir, NUCLEUS)
    assert 0 < int((nucleus == 0).sum()) < nucleus.numel()  # top-p cuts some sequences, not all


def test_speculative_sampling_matches_the_target(setup):
    model_dir, gen = setup
    sequences, stats = generate(gen, SAMPLE, TRIALS)
    assert stats["drafted"] >= TRIALS  # the first speculative round of every generation drafts
    assert 0.2 * stats["drafted"] < stats["accepted"] < 0.8 * stats["drafted"], stats  # both outcomes, often
    assert stats["rejecting_rounds"] > 0.2 * TRIALS, stats
    assert chi2_pvalue(histogram(sequences), target_joint(model_dir, SAMPLE)) > 1e-3
    assert generate(gen, SAMPLE, 25)[0] == sequences[:25]  # fixed seeds: the same tokens on every run


def accept_everything(draft_tokens, draft_probs, target_logits, params, generator) -> Verdict:
    """Wrong: keeps every draft token (so they follow the draft's q), then a bonus drawn from the target."""
    bonus = token_distribution(target_logits[len(draft_tokens)], params)
    return Verdict(len(draft_tokens), int(torch.multinomial(bonus, 1, generator=generator)))


def test_broken_verification_is_detected(setup, monkeypatch):
    model_dir, gen = setup
    monkeypatch.setattr("hat.device.generator.verify", accept_everything)
    sequences, stats = generate(gen, SAMPLE, POWER_TRIALS)
    assert stats["accepted"] == stats["drafted"] > 0
    assert chi2_pvalue(histogram(sequences), target_joint(model_dir, SAMPLE)) < 1e-6


def test_temperature_and_top_p(setup):
    """Tempered nucleus sampling: the draft's q and the target's p both come from token_distribution; the
    generations must follow the target's nucleus joint and never leave it."""
    model_dir, gen = setup
    sequences, stats = generate(gen, NUCLEUS, NUCLEUS_TRIALS)
    assert 0 < stats["accepted"] < stats["drafted"], stats
    assert chi2_pvalue(histogram(sequences), target_joint(model_dir, NUCLEUS)) > 1e-3  # and no 0-probability cell


def test_rounds_that_draft_nothing_still_sample(setup):
    """A round whose draft is empty (threshold 1: no draft step is confident enough; also the last round of a
    generation when one token is left) verifies nothing and samples its token from the target row."""
    _, gen = setup
    gen.speculation = SpeculationConfig(threshold=1.0, max_draft=3, length="threshold")
    try:
        result = gen.generate_ids(PROMPT, NEW_TOKENS, SamplingParams(temperature=1.0, seed=0))
    finally:
        gen.speculation = SPECULATION
    assert len(result.token_ids) == NEW_TOKENS
    assert [s.drafted for s in result.decode_rounds] == [0] * (NEW_TOKENS - 1)


def subset_table(tokenizer, vocab: int = VOCAB) -> FrequencyTable:
    return FrequencyTable(vocab, tokenizer_fingerprint(tokenizer), tuple(100 if i in SUBSET else 1 for i in range(VOCAB)))


def test_reduced_draft_head_keeps_the_target_distribution(setup, monkeypatch):
    """FR-Spec: the draft proposes only SUBSET's tokens, its q is zero outside them, verification runs over the full
    vocabulary; the generations must still follow the target's joint (cells outside the subset included)."""
    model_dir, gen = setup
    seen = dict(tokens=set(), mass_outside=0.0)
    real_verify = verify_module.verify

    def spy(draft_tokens, draft_probs, target_logits, params, generator):
        seen["tokens"].update(draft_tokens)
        if draft_probs is not None and len(draft_tokens):
            outside = [i for i in range(VOCAB) if i not in SUBSET]
            seen["mass_outside"] += float(draft_probs[:, outside].sum())
        return real_verify(draft_tokens, draft_probs, target_logits, params, generator)

    monkeypatch.setattr("hat.device.generator.verify", spy)
    monkeypatch.setattr(gen.model, "token_frequencies", subset_table(gen.model.tokenizer))
    gen.speculation = replace(SPECULATION, draft_vocab=len(SUBSET))
    try:
        sequences, stats = generate(gen, SAMPLE, TRIALS)
    finally:
        gen.speculation = SPECULATION
    assert seen["tokens"] and seen["tokens"] <= set(SUBSET) and seen["mass_outside"] == 0.0
    assert stats["drafted"] >= TRIALS and 0.1 * stats["drafted"] < stats["accepted"] < 0.8 * stats["drafted"], stats
    joint = target_joint(model_dir, SAMPLE)
    assert float(joint[:, [i for i in range(VOCAB) if i not in SUBSET]].sum()) > 0.3  # the target leaves the subset
    assert chi2_pvalue(histogram(sequences), joint) > 1e-3


def test_a_frequency_table_for_another_vocabulary_is_refused(tmp_path):
    model_dir = build_checkpoint(tmp_path / "model")
    adapter = random_adapter(model_dir, tmp_path / "adapter")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    FrequencyTable(VOCAB + 1, tokenizer_fingerprint(tokenizer), (1,) * (VOCAB + 1)).save(adapter)
    device_dir, _ = split_checkpoint(model_dir, 1, 1, tmp_path / "bundle", adapter=adapter)
    with pytest.raises(FrequencyTableMismatchError, match="vocabulary of 7 tokens"):
        DeviceModel.load(device_dir)
    subset_table(tokenizer).save(adapter)
    (device_dir / "adapter" / "token_frequencies.json").write_text((adapter / "token_frequencies.json").read_text())
    model = DeviceModel.load(device_dir)
    from hat.device.draft_head import reduced_head
    assert reduced_head(model, 3).ids.tolist() == SUBSET
    model.token_frequencies = None
    with pytest.raises(ValueError, match="frequency table"):
        reduced_head(model, 3)
