"""The cloud's middle worker runs many sessions of different lengths in one forward, each exact."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hat.cloud.kv_budget import KVBudget
from hat.cloud.middle_worker import ForwardJob, MiddleWorker, load_middle_part
from hat.cloud.session_store import SessionStore
from hat.common.checkpoint import load_tensors
from hat.common.layers import SequenceSpan
from hat.common.model_part import ModelPart
from hat.common.model_spec import load_model_spec
from hat.common.proto import hat_pb2 as pb
from hat.common.split import split_checkpoint
from hat.common.wire import make_header

K, M = 2, 1


def _input_hidden(model_dir, ids: torch.Tensor) -> torch.Tensor:
    spec = load_model_spec(model_dir)
    part = ModelPart.from_tensors(spec, 0, K, load_tensors(model_dir, lambda n: True), embedding=True)
    return part.forward_layers(part.embed(ids), [SequenceSpan(part.new_cache(), 0, len(ids))])


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen3"])
@torch.no_grad()
def test_ragged_batch_matches_transformers(family, tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint(family)
    _, cloud_dir = split_checkpoint(model_dir, K, M, tmp_path / "bundle")
    part, _ = load_middle_part(cloud_dir)
    worker = MiddleWorker(part)
    store = SessionStore(part, max_sessions=8, idle_timeout_s=60, budget=KVBudget(part.kv_bytes_per_position, 1 << 30))
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(0)
    prompts = [torch.randint(3, 300, (n,)) for n in (5, 17, 30)]
    # each session first prefills part of its prompt in one batch, then the rest (ragged: 1, 9, 30 new tokens)
    first_counts = [4, 8, 0]
    sessions = [store.open(f"s{i}", "dev", b"owner") for i in range(len(prompts))]
    outputs = [[] for _ in prompts]
    for phase in range(2):
        jobs, slices = [], []
        for i, (ids, first) in enumerate(zip(prompts, first_counts)):
            start, end = (0, first) if phase == 0 else (first, len(ids))
            if end == start:
                continue
            hidden = _input_hidden(model_dir, ids)[start:end]
            job = ForwardJob(b"owner", make_header(pb.FORWARD, f"s{i}", start=start, num_tokens=end - start),
                             hidden, sessions[i])
            worker.check(job)
            jobs.append(job)
            slices.append(i)
        assert len(jobs) >= 2
        for i, out in zip(slices, worker.run(jobs)):
            outputs[i].append(out)
    for ids, session, out in zip(prompts, sessions, outputs):
        want = reference(ids[None], output_hidden_states=True).hidden_states[part.last][0]
        got = torch.cat(out)
        assert session.cache.length == len(ids)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
