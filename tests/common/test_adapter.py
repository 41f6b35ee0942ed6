"""The draft adapter (hat.common.adapter) and its distillation (hat.common.adapter_training).

Everything runs on tiny random checkpoints, so nothing here measures how good a draft is; what is
checked is the contract: an untrained adapter passes its input through, save/load round-trips,
adapter_spec's shape rules, the mismatch refusals, that training lowers the loss and writes its
files, that an interrupted run resumes to bit-identical weights, the structure of the draft-chain
measure, and (on a checkpoint whose middle layer adds nothing, where an untrained adapter is the
perfect draft) that the measures report perfect agreement.
"""
from __future__ import annotations

import csv
import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hat.common.adapter_training as training
from checkpoints import TOKENIZER_TEXT
from hat.common.adapter import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterConfig, AdapterMismatchError, DraftAdapter,
                                adapter_spec)
from hat.common.adapter_training import (CONFIDENCE_TEMPERATURES, AdapterTrainConfig, Teacher, chain_acceptance, distillation_loss,
                                         top1_agreement, train_adapter)
from hat.common.checkpoint import fingerprint
from hat.common.layers import SequenceSpan
from hat.common.model_spec import load_model_spec

FAMILY = "llama3"  # hidden 64, 4 heads of 16, 2 kv heads, 6 layers
K, M = 2, 1
FAKE_FINGERPRINT = "a" * 64


# many small forwards: on a shared 2-core machine intra-op threads only add synchronisation
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint(FAMILY)


@pytest.fixture(scope="module")
def spec(model_dir):
    return load_model_spec(model_dir)


def config_for(spec, **changes) -> AdapterConfig:
    base = AdapterConfig(input_layers=K, output_layers=M, width=spec.hidden_size, depth=1,
                         intermediate_size=spec.intermediate_size, source_fingerprint=FAKE_FINGERPRINT)
    return replace(base, **changes)


def randomized(adapter: DraftAdapter, seed: int = 0, scale: float = 0.1) -> DraftAdapter:
    """Give the zero projection and the unit norms random values, so the adapter's body shows in its output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if name == "project.weight":
                p.copy_(scale * torch.randn(p.shape, generator=g))
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return adapter.eval()


def inputs(spec, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, spec.hidden_size, generator=g), torch.randn(count, spec.hidden_size, generator=g)


# ------------------------------------------------------------------------------------ the module


@torch.no_grad()
def test_untrained_adapter_passes_its_input_through(checkpoint_dir):
    """Every family: project starts at zero, so estimate == h_K exactly; caches grow by the positions run."""
    spec = load_model_spec(checkpoint_dir)
    config = config_for(spec)  # train_adapter's default shape: the model's width (qwen3: not a multiple of head_dim)
    torch.manual_seed(0)
    adapter = DraftAdapter(spec, config).eval()
    assert torch.count_nonzero(adapter.project.weight) == 0

    caches = [adapter.new_cache(), adapter.new_cache()]
    assert caches[0].num_layers == config.depth and caches[0].length == 0
    # two sequences in one ragged batch (prefill 9 and 5), then a decode step on each, then 8 more (crossing
    # mistral's 12-token window)
    for step, counts in enumerate([(9, 5), (1, 1), (8, 8)]):
        starts = [c.length for c in caches]
        hidden, embeds = inputs(spec, sum(counts), seed=step)
        out = adapter(hidden, embeds, [SequenceSpan(c, s, n) for c, s, n in zip(caches, starts, counts)])
        assert out.shape == (sum(counts), spec.hidden_size) and out.dtype == torch.float32
        assert torch.equal(out, hidden)
        assert [c.length for c in caches] == [s + n for s, n in zip(starts, counts)]
    assert [c.length for c in caches] == [18, 14]


@torch.no_grad()
def test_save_load_round_trip(spec, tmp_path):
    adapter = randomized(DraftAdapter(spec, config_for(spec)), seed=1)
    hidden, embeds = inputs(spec, 12)
    expected = adapter(hidden, embeds, [SequenceSpan(adapter.new_cache(), 0, 12)])
    assert not torch.allclose(expected, hidden, atol=1e-3)  # the body contributes

    adapter.save(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    on_disk = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    # an input-only adapter keeps format 1 (no `conditioning` key): older versions still read it
    assert on_disk == {k: v for k, v in asdict(adapter.config).items() if k != "conditioning"}
    assert on_disk["format_version"] == 1

    loaded = DraftAdapter.load(tmp_path / "a", spec)
    assert loaded.config == adapter.config and not loaded.training
    assert loaded.dtype == torch.float32
    state, reloaded = adapter.state_dict(), loaded.state_dict()
    assert state.keys() == reloaded.keys() and all(torch.equal(state[k], reloaded[k]) for k in state)
    assert torch.equal(loaded(hidden, embeds, [SequenceSpan(loaded.new_cache(), 0, 12)]), expected)

    half = DraftAdapter.load(tmp_path / "a", spec, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in half.parameters())
    cache = half.new_cache()
    assert cache.keys.dtype == torch.bfloat16
    out = half(hidden, embeds, [SequenceSpan(cache, 0, 12)])
    assert out.dtype == torch.bfloat16 and out.shape == expected.shape
    torch.testing.assert_close(out.float(), expected, rtol=0.03, atol=0.05)


def test_corrupt_or_foreign_weights_get_a_clear_error(spec, tmp_path):
    adapter = DraftAdapter(spec, config_for(spec))
    adapter.save(tmp_path / "a")
    weights = tmp_path / "a" / ADAPTER_WEIGHTS
    intact = weights.read_bytes()
    for damaged in (intact[: len(intact) // 2], b"\x00" * 64, intact[:8] + b"{not json" + intact[17:]):
        weights.write_bytes(damaged)
        with pytest.raises(ValueError, match="is corrupt or does not hold the weights"):
            DraftAdapter.load(tmp_path / "a", spec)
    wider = DraftAdapter(spec, config_for(spec, intermediate_size=spec.intermediate_size * 2))
    save_file({k: v.contiguous() for k, v in wider.state_dict().items()}, str(weights))  # weights of another shape
    with pytest.raises(ValueError, match="is corrupt or does not hold the weights"):
        DraftAdapter.load(tmp_path / "a", spec)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=f"no {ADAPTER_WEIGHTS}"):
        DraftAdapter.load(tmp_path / "a", spec)


def test_config_load_refuses_a_folder_that_is_no_adapter(spec, tmp_path):
    with pytest.raises(FileNotFoundError, match="hat train-adapter"):
        AdapterConfig.load(tmp_path)
    config_for(spec).save(tmp_path)
    data = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(ValueError, match="format 99"):
        AdapterConfig.load(tmp_path)


# ---------------------------------------------------------------------------------- adapter_spec


def test_adapter_spec_refuses_empty_shapes(spec):
    for changes in (dict(width=0), dict(depth=0), dict(intermediate_size=0), dict(width=-64)):
        with pytest.raises(ValueError, match="must be positive"):
            adapter_spec(spec, config_for(spec, **changes))


@torch.no_grad()
@pytest.mark.parametrize("width, depth, heads, kv_heads", [
    (64, 1, 4, 2),  # the model's own layer shape
    (128, 1, 8, 4),  # twice as wide: heads scale, the GQA ratio stays
    (64, 2, 4, 2),  # two layers
    (80, 2, 5, 5),  # 5 heads cannot share 2 kv heads: one kv head per head
    (72, 1, 4, 2),  # not a multiple of head_dim 16: heads round down, q/k/v keep the head size
    (8, 1, 1, 1),  # narrower than one head: still one head (of the model's head size)
])
def test_adapter_spec_shapes_and_forward(spec, width, depth, heads, kv_heads):
    config = config_for(spec, width=width, depth=depth, intermediate_size=96)
    s = adapter_spec(spec, config)
    assert (s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.intermediate_size) == \
        (width, depth, heads, kv_heads, spec.head_dim, 96)
    assert s.sliding_windows == (spec.sliding_windows[K],) * depth
    assert (s.vocab_size, s.rms_norm_eps, s.max_context) == (spec.vocab_size, spec.rms_norm_eps, spec.max_context)

    adapter = randomized(DraftAdapter(spec, config))
    assert adapter.fuse.weight.shape == (width, 2 * spec.hidden_size)
    assert adapter.project.weight.shape == (spec.hidden_size, width)
    cache = adapter.new_cache()
    hidden, embeds = inputs(spec, 7)
    out = adapter(hidden, embeds, [SequenceSpan(cache, 0, 7)])
    assert out.shape == (7, spec.hidden_size) and torch.isfinite(out).all()
    assert cache.num_layers == depth and cache.length == 7 and cache.keys.shape[1] == kv_heads


# --------------------------------------------------------------------------------- check_matches


def test_check_matches(spec):
    config = config_for(spec)
    config.check_matches(FAKE_FINGERPRINT, K, M)  # the right checkpoint and split: no error

    with pytest.raises(AdapterMismatchError) as info:
        config.check_matches("b" * 64, K, M)
    message = str(info.value)
    assert "a" * 12 in message and "b" * 12 in message and "distilled from checkpoint" in message
    assert "hat train-adapter" in message
    assert isinstance(info.value, ValueError)  # the CLI turns ValueError into a one-line error, exit 2

    for k, m in ((K + 1, M), (K, M + 1)):
        with pytest.raises(AdapterMismatchError) as info:
            config.check_matches(FAKE_FINGERPRINT, k, m)
        assert f"the adapter is for K={K}, M={M}" in str(info.value)
        assert f"the split is K={k}, M={m}" in str(info.value)


# -------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def repetitive_data(tmp_path_factory) -> Path:
    """Four copies of one periodic text: every window looks alike, so the loss curve is smooth."""
    folder = tmp_path_factory.mktemp("repetitive")
    for i in range(4):
        (folder / f"part{i}.txt").write_text(TOKENIZER_TEXT)
    return folder


@pytest.fixture(scope="module")
def varied_data(tmp_path_factory) -> Path:
    """Distinct files (.py, .txt, .md, and one that is skipped), so data order matters."""
    folder = tmp_path_factory.mktemp("varied")
    lines = TOKENIZER_TEXT.splitlines()
    for i in range(5):
        body = "\n".join(f"def f{i}_{j}(n):\n    return n * {j} + {i}  # {lines[(i + j) % len(lines)]}"
                         for j in range(40))
        (folder / f"module{i}.py").write_text(body)
    (folder / "notes.txt").write_text(" ".join(reversed(TOKENIZER_TEXT.split())))
    (folder / "sub").mkdir()
    (folder / "sub" / "README.md").write_text(TOKENIZER_TEXT.upper())
    (folder / "data.bin").write_bytes(bytes(range(256)))  # not *.py/*.txt/*.md: never read
    return folder


def small_config(model_dir: Path, out: Path, data: Path, **changes) -> AdapterTrainConfig:
    base = AdapterTrainConfig(model_dir=str(model_dir), input_layers=K, output_layers=M, out=str(out), steps=4,
                              batch_size=2, seq_len=32, eval_every=2, eval_windows=2, eval_chains=2, draft_len=3,
                              ckpt_every=2, data=[str(data)])
    return replace(base, **changes)


def read_loss_log(out: Path) -> list[dict]:
    with open(out / training.LOSS_LOG, newline="") as fh:
        return list(csv.DictReader(fh))


def test_training_lowers_the_loss_and_writes_its_files(model_dir, spec, repetitive_data, tmp_path):
    out = tmp_path / "adapter"
    config = small_config(model_dir, out, repetitive_data, steps=20, batch_size=4, lr=1e-2, warmup_steps=2,
                          eval_every=10, ckpt_every=5)
    logged: list[str] = []
    summary = train_adapter(config, log=logged.append)

    assert sorted(p.name for p in out.iterdir()) == sorted(
        [ADAPTER_CONFIG, ADAPTER_WEIGHTS, training.SUMMARY, training.LOSS_LOG])  # checkpoint.pt is gone

    rows = read_loss_log(out)
    assert list(rows[0]) == ["step", "loss", "smooth_l1", "ce", "lr"]
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    losses = [float(r["loss"]) for r in rows]
    assert sum(losses[-5:]) / 5 < losses[0], losses
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    for r in rows:  # loss = smooth_l1 + ce_weight * ce
        assert float(r["loss"]) == pytest.approx(float(r["smooth_l1"]) + 0.1 * float(r["ce"]), rel=1e-5)
    assert float(rows[-1]["lr"]) == pytest.approx(1e-3)  # cosine down to lr / 10

    on_disk = json.loads((out / training.SUMMARY).read_text())
    assert on_disk == json.loads(json.dumps(summary))
    final = summary["final"]
    assert final["step"] == 20 and 0 <= final["top1_agreement"] <= 1 and 1 <= final["accept_len"] <= 4
    assert len(final["accepted_at_depth"]) == 3
    assert [e["step"] for e in summary["evals"]] == [0, 10, 20]
    assert summary["tokens_seen"] == 20 * 4 * 32 and summary["train_config"] == asdict(config)
    assert any("held-out top-1 agreement" in line for line in logged)

    adapter = DraftAdapter.load(out, spec)
    calibration = summary["calibration"]
    assert adapter.config == AdapterConfig(input_layers=K, output_layers=M, width=spec.hidden_size, depth=1,
                                           intermediate_size=spec.intermediate_size,
                                           source_fingerprint=fingerprint(model_dir),
                                           confidence_temperature=calibration["confidence_temperature"])
    assert calibration["confidence_temperature"] in CONFIDENCE_TEMPERATURES
    assert calibration["log_loss"] <= calibration["log_loss_at_1"]  # the fit is at least as good as no fit
    assert summary["adapter"] == asdict(adapter.config)
    assert adapter.dtype == torch.float32 and torch.count_nonzero(adapter.project.weight) > 0
    adapter.config.check_matches(fingerprint(model_dir), K, M)


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("changes", [{}, dict(conditioning="verified", feature_noise=0.3, second_step_weight=0.5)],
                         ids=["input", "verified"])
def test_resume_matches_an_uninterrupted_run(model_dir, varied_data, tmp_path, monkeypatch, changes):
    straight = small_config(model_dir, tmp_path / "A", varied_data, **changes)
    summary_a = train_adapter(straight, log=lambda *a: None)

    # run B: killed during step 3, after the step-2 checkpoint
    config_b = replace(straight, out=str(tmp_path / "B"))
    calls = []
    real_loss = training.distillation_loss

    def failing_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training, "distillation_loss", failing_loss)
    with pytest.raises(Interrupted):
        train_adapter(config_b, log=lambda *a: None)
    monkeypatch.setattr(training, "distillation_loss", real_loss)
    out_b = tmp_path / "B"
    assert sorted(p.name for p in out_b.iterdir()) == [training.CHECKPOINT]
    assert torch.load(out_b / training.CHECKPOINT, weights_only=False)["step"] == 2

    with pytest.raises(ValueError, match="other settings"):  # a resume must use the same settings
        train_adapter(replace(config_b, lr=1e-3, resume=True), log=lambda *a: None)

    logged: list[str] = []
    summary_b = train_adapter(replace(config_b, resume=True), log=logged.append)
    assert any("resumed from" in line and "step 2" in line for line in logged), logged
    assert not (out_b / training.CHECKPOINT).exists()

    a, b = (load_file(str(tmp_path / d / ADAPTER_WEIGHTS)) for d in "AB")
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"resumed weights differ from the uninterrupted run's: {different}"
    assert read_loss_log(tmp_path / "A") == read_loss_log(out_b)
    assert summary_b["evals"] == summary_a["evals"] and summary_b["final"] == summary_a["final"]
    assert summary_b["tokens_seen"] == summary_a["tokens_seen"]


def test_resume_without_a_checkpoint_starts_afresh(model_dir, varied_data, tmp_path):
    logged: list[str] = []
    summary = train_adapter(small_config(model_dir, tmp_path / "C", varied_data, steps=2, resume=True),
                            log=logged.append)
    assert summary["final"]["step"] == 2 and not any("resumed" in line for line in logged)


def test_data_folder_without_text_files_is_refused(model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.py, \\*.txt or \\*.md files"):
        train_adapter(small_config(model_dir, tmp_path / "D", tmp_path / "empty"), log=lambda *a: None)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        train_adapter(small_config(model_dir, tmp_path / "D", tmp_path / "missing"), log=lambda *a: None)


# ------------------------------------------------------------------------------- the teacher side


def token_prefixes(spec, count: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, spec.vocab_size, (count, length), generator=g).tolist()


@torch.no_grad()
def test_chain_acceptance_structure(model_dir, spec):
    teacher = Teacher(str(model_dir), K, M)
    adapter = randomized(DraftAdapter(spec, config_for(spec)), seed=2, scale=0.05)
    prefixes = token_prefixes(spec, 5, 20)
    draft_len = 4
    result = chain_acceptance(teacher, adapter, prefixes, draft_len)
    assert set(result) == {"accept_len", "accepted_at_depth"}
    depth = result["accepted_at_depth"]
    assert 1 <= result["accept_len"] <= draft_len + 1
    assert len(depth) == draft_len and all(0 <= d <= 1 for d in depth)
    assert all(a >= b for a, b in zip(depth, depth[1:])), depth
    # mean accepted = sum over depths of P(accepted > depth); each chain accepts a whole number of tokens
    assert result["accept_len"] == pytest.approx(1 + sum(depth), abs=1e-3)
    assert (result["accept_len"] - 1) * len(prefixes) == pytest.approx(round((result["accept_len"] - 1) * 5))
    assert 0 <= top1_agreement(teacher, adapter, torch.tensor(token_prefixes(spec, 2, 16, seed=1))) <= 1


@torch.no_grad()
def test_untrained_adapter_drafts_as_if_the_middle_were_skipped(model_dir, spec):
    teacher = Teacher(str(model_dir), K, M)
    adapter = DraftAdapter(spec, config_for(spec)).eval()
    ids = torch.tensor(token_prefixes(spec, 2, 10))
    embeds, h_k, h_mid, logits = teacher.targets(ids)
    assert h_k.shape == h_mid.shape == (20, spec.hidden_size) and logits.shape == (20, spec.vocab_size)
    estimate, draft = teacher.draft_logits(adapter, embeds, h_k, 2, 10)
    assert torch.equal(estimate, h_k)
    skipped = teacher.output.logits(teacher.output.forward_layers(h_k, teacher.spans(teacher.output, 2, 10)))
    assert torch.equal(draft, skipped)
    assert not torch.allclose(draft, logits)  # the real middle does change the logits


@pytest.fixture(scope="module")
def identity_middle(model_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint with K=2, M=3 (one middle layer, layer 2) whose attention and MLP outputs are zeroed:
    the middle layer returns its input exactly, so an untrained adapter (estimate = h_K) is a perfect draft."""
    out = tmp_path_factory.mktemp("identity-middle")
    for f in model_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    tensors = load_file(str(out / "model.safetensors"))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
        tensors[f"model.layers.2.{name}"].zero_()
    save_file(tensors, str(out / "model.safetensors"), metadata=metadata)
    return out


@torch.no_grad()
def test_perfect_draft_is_measured_as_perfect(identity_middle):
    spec = load_model_spec(identity_middle)
    teacher = Teacher(str(identity_middle), 2, 3)
    assert teacher.middle.num_layers == 1
    adapter = DraftAdapter(spec, config_for(spec, input_layers=2, output_layers=3)).eval()

    ids = torch.tensor(token_prefixes(spec, 2, 24))
    embeds, h_k, h_mid, logits = teacher.targets(ids)
    assert torch.equal(h_mid, h_k)
    _, draft = teacher.draft_logits(adapter, embeds, h_k, 2, 24)
    assert torch.equal(draft, logits)
    loss, regression, ce = distillation_loss(teacher, adapter, ids, 0.1)
    assert float(regression) == 0.0
    entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1).mean()
    assert float(ce) == pytest.approx(float(entropy), rel=1e-5)  # CE of a distribution with itself

    assert top1_agreement(teacher, adapter, ids) == 1.0
    result = chain_acceptance(teacher, adapter, token_prefixes(spec, 3, 20, seed=3), draft_len=5)
    assert result == {"accept_len": 6.0, "accepted_at_depth": [1.0] * 5}
