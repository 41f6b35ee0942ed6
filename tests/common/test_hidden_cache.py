"""The hidden-state cache (hat.common.hidden_cache), training over it, and the training texts
(hat.common.training_text), on a tiny random checkpoint.

The oracle for the cache is the teacher itself: what the cache holds must be the teacher's own h_K and
h_mid for the same windows (up to float16 rounding), a fill interrupted and resumed must equal a straight
one, and a loss over cached states must equal the loss the teacher computes on the fly.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import hat.common.adapter_training as training
import hat.common.datasets as datasets
from hat.common.adapter import ADAPTER_WEIGHTS, AdapterConfig, DraftAdapter
from hat.common.adapter_training import AdapterTrainConfig, Teacher, ce_vocabulary, distillation_loss, train_adapter
from hat.common.hidden_cache import CacheMeta, CacheMismatchError, HiddenStateCache
from hat.common.training_text import HELDOUT_FRACTION, hash_fraction, training_data

FAMILY = "llama3"
K, M = 2, 1
SEQ = 16

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint(FAMILY)


@pytest.fixture(scope="module")
def teacher(model_dir) -> Teacher:
    return Teacher(str(model_dir), K, M)


def stream_of(teacher: Teacher, tokens: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, teacher.spec.vocab_size, size=tokens).astype(np.int64)


def meta_for(teacher: Teacher, count: int, **changes) -> CacheMeta:
    base = CacheMeta(source_fingerprint="f" * 64, input_layers=K, output_layers=M, width=teacher.spec.hidden_size,
                     seq_len=SEQ, windows=count, stream="test stream")
    return replace(base, **changes)


def test_the_cache_holds_the_teachers_hidden_states(teacher, tmp_path):
    stream = stream_of(teacher, 7 * SEQ + 5)  # the tail past the last whole window is not cached
    cache = HiddenStateCache.open(tmp_path / "c", meta_for(teacher, 7))
    cache.fill(teacher, stream, batch=3)
    assert cache.full and cache.meta.filled == 7
    ids = torch.from_numpy(stream[:7 * SEQ].reshape(7, SEQ))
    _, h_k, h_mid = teacher.hidden(ids)
    assert np.array_equal(cache.ids[:], ids.numpy())
    for cached, exact in ((cache.h_k, h_k), (cache.h_mid, h_mid)):
        cached = torch.from_numpy(cached[:].astype(np.float32)).reshape(exact.shape)
        assert torch.allclose(cached, exact, rtol=1e-3, atol=1e-3 * float(exact.abs().max()))

    batch_ids, batch_k, batch_mid = cache.batch(seed=0, step=3, size=4)  # windows drawn from seed and step alone
    again = cache.batch(seed=0, step=3, size=4)
    assert all(torch.equal(a, b) for a, b in zip((batch_ids, batch_k, batch_mid), again))
    assert batch_ids.shape == (4, SEQ) and batch_k.shape == batch_mid.shape == (4 * SEQ, teacher.spec.hidden_size)
    rows = [int(np.flatnonzero((cache.ids[:] == row.numpy()).all(1))[0]) for row in batch_ids]
    assert torch.equal(batch_k.reshape(4, SEQ, -1), torch.from_numpy(cache.h_k[rows].astype(np.float32)))


class Interrupted(Exception):
    pass


def test_an_interrupted_fill_resumes_to_the_same_cache(teacher, tmp_path, monkeypatch):
    stream = stream_of(teacher, 6 * SEQ)
    straight = HiddenStateCache.open(tmp_path / "straight", meta_for(teacher, 6))
    straight.fill(teacher, stream, batch=2)

    calls, real = [], Teacher.hidden

    def failing(self, ids):
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted
        return real(self, ids)

    monkeypatch.setattr(Teacher, "hidden", failing)
    with pytest.raises(Interrupted):
        HiddenStateCache.open(tmp_path / "resumed", meta_for(teacher, 6)).fill(teacher, stream, batch=2)
    monkeypatch.setattr(Teacher, "hidden", real)
    resumed = HiddenStateCache.open(tmp_path / "resumed", meta_for(teacher, 6))
    assert resumed.meta.filled == 2  # the first batch was kept
    resumed.fill(teacher, stream, batch=2)
    for name in ("ids", "h_k", "h_mid"):
        assert np.array_equal(getattr(resumed, name)[:], getattr(straight, name)[:]), name

    smaller = HiddenStateCache.open(tmp_path / "straight", meta_for(teacher, 3))  # a smaller request: its first windows
    assert smaller.available == 3 and smaller.meta.windows == 6
    assert all(int(np.flatnonzero((straight.ids[:] == row.numpy()).all(1))[0]) < 3
               for row in smaller.batch(seed=1, step=0, size=8)[0])


def test_a_cache_made_for_something_else_is_refused(teacher, tmp_path):
    HiddenStateCache.open(tmp_path / "c", meta_for(teacher, 4))
    for change in ({"seq_len": SEQ * 2}, {"input_layers": K + 1}, {"source_fingerprint": "0" * 64},
                   {"stream": "other data"}):
        field = next(iter(change))
        with pytest.raises(CacheMismatchError, match=f"other {field}"):
            HiddenStateCache.open(tmp_path / "c", meta_for(teacher, 4, **change))
    with pytest.raises(CacheMismatchError, match="holds 4 windows, fewer than the 5"):
        HiddenStateCache.open(tmp_path / "c", meta_for(teacher, 5))
    (tmp_path / "c" / "cache.json").write_text("{\"not\": \"a cache\"}")
    with pytest.raises(CacheMismatchError, match="not a valid hidden-state cache"):
        HiddenStateCache.open(tmp_path / "c", meta_for(teacher, 4))
    with pytest.raises(ValueError, match="the cache needs"):
        HiddenStateCache.open(tmp_path / "short", meta_for(teacher, 4)).fill(teacher, stream_of(teacher, 3 * SEQ))


def test_the_loss_over_cached_states_equals_the_teachers(model_dir, teacher):
    spec = teacher.spec
    adapter = DraftAdapter(spec, AdapterConfig(K, M, spec.hidden_size, 1, spec.intermediate_size, "f" * 64))
    torch.nn.init.normal_(adapter.project.weight, std=0.05)
    ids = torch.from_numpy(stream_of(teacher, 3 * SEQ).reshape(3, SEQ))
    _, h_k, h_mid = teacher.hidden(ids)
    on_the_fly = distillation_loss(teacher, adapter, ids, 0.1)
    cached = distillation_loss(teacher, adapter, ids, 0.1, h_k.half().float(), h_mid.half().float())
    for a, b in zip(on_the_fly, cached):
        assert float(a) == pytest.approx(float(b), rel=1e-2)

    rows = torch.tensor([1, 5, 7, 30])  # a reduced vocabulary: the teacher's and draft's logits over those ids only
    _, _, ce = distillation_loss(teacher, adapter, ids, 0.1, rows=rows)
    with torch.no_grad():
        estimate = adapter(h_k, teacher.input.embed(ids.reshape(-1)), teacher.spans(adapter, 3, SEQ))
        p = torch.softmax(teacher.output_logits(h_mid, 3, SEQ)[:, rows], -1)
        log_q = torch.log_softmax(teacher.output_logits(estimate, 3, SEQ)[:, rows], -1)
    assert float(ce) == pytest.approx(float(-(p * log_q).sum(-1).mean()), rel=1e-4)


def test_ce_vocabulary_takes_the_most_frequent_training_tokens():
    config = AdapterTrainConfig(model_dir="", input_layers=K, output_layers=M, out="", ce_vocab=3)
    stream = np.array([4, 4, 4, 9, 9, 2, 2, 7, 1, 1, 1, 1])
    assert ce_vocabulary(config, 12, None, stream).tolist() == [1, 2, 4]  # 1 x4, 4 x3, then 2 and 9 tie: lower id
    assert ce_vocabulary(replace(config, ce_vocab=0), 12, None, stream) is None
    assert ce_vocabulary(replace(config, ce_vocab=12), 12, None, stream) is None


def test_training_over_the_cache_resumes_bit_identically(model_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        (data / f"m{i}.py").write_text("\n".join(f"def f{i}_{j}(x):\n    return x * {j} - {i}" for j in range(60)))
    base = AdapterTrainConfig(model_dir=str(model_dir), input_layers=K, output_layers=M, out=str(tmp_path / "A"),
                              steps=6, batch_size=2, seq_len=SEQ, lr=1e-2, warmup_steps=1, eval_every=3,
                              eval_windows=2, eval_chains=2, draft_len=3, ckpt_every=2, data=[str(data)],
                              cache=str(tmp_path / "cache"), cache_tokens=40 * SEQ, ce_vocab=20)
    summary = train_adapter(base, log=lambda *a: None)
    assert summary["distinct_tokens"] == 40 * SEQ and summary["epochs"] == pytest.approx(6 * 2 / 40)
    assert summary["tokens_seen"] == 6 * 2 * SEQ
    assert summary["cache_windows_filled"] == 40 and summary["cache_fill_s"] > 0

    calls, real = [], training.distillation_loss

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "distillation_loss", failing)
    resumed = replace(base, out=str(tmp_path / "B"))
    with pytest.raises(Interrupted):
        train_adapter(resumed, log=lambda *a: None)
    monkeypatch.setattr(training, "distillation_loss", real)
    again = train_adapter(replace(resumed, resume=True), log=lambda *a: None)
    assert again["cache_windows_filled"] == 0 and again["cache_fill_s"] == 0  # the cache was reused as it stood
    a, b = (load_file(str(tmp_path / d / ADAPTER_WEIGHTS)) for d in "AB")
    assert all(torch.equal(a[n], b[n]) for n in a), "resumed weights differ from the uninterrupted run's"


def test_sharegpt_texts_are_chat_formatted_and_split(monkeypatch):
    conversations = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
                     for i in range(400)]
    monkeypatch.setattr(datasets, "sharegpt_conversations", lambda: iter(conversations))

    class ChatTokenizer:
        def apply_chat_template(self, messages, tokenize):
            return "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)

    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        training_data(["sharegpt"])
    data = training_data(["sharegpt"], ChatTokenizer())
    train = list(data.train(0))
    held = {t.name for t in data.heldout}
    assert held and not held & {t.name for t in train} and len(held) + len(train) == 400
    assert all(hash_fraction(name) < HELDOUT_FRACTION for name in held)
    first = train[0]
    index = int(first.name.split("/")[1])
    assert first.chat and first.read() == f"<|user|>question {index}<|end|><|assistant|>answer {index}<|end|>"
    with pytest.raises(FileNotFoundError, match="store datasets: sharegpt"):
        training_data(["no-such-dataset"])
