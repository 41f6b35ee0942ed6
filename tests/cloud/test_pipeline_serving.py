"""A cloud whose middle part is a 2-stage pipeline (torch.distributed, gloo) serves eight devices at once,
plain and speculative, each getting exactly transformers' greedy tokens while consecutive batches overlap in
the pipeline; its KV budget covers every stage's layers; devices plan for its stages; its stage processes
end with the server."""
from __future__ import annotations

from contextlib import ExitStack

import pytest

from cluster import running_cloud
from hat.cloud.config import CloudConfig
from eight_devices import FAMILY, K, M, SPECULATION, run_concurrently

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipelined(tiny_checkpoint, tmp_path_factory, one_torch_thread):
    with running_cloud(tiny_checkpoint(FAMILY), K, M, tmp_path_factory.mktemp("pipelined"), pipeline_stages=2,
                       profile_on_start=False) as cluster:
        yield cluster
    assert all(not cluster.server.part._procs[i].is_alive() for i in range(len(cluster.server.part._procs)))


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_eight_devices_on_a_two_stage_pipeline(eight_devices, reference, pipelined, speculative):
    models, prompts = eight_devices
    part = pipelined.server.part
    assert part.stages == 2 and len(part.pids) == 1
    assert part.kv_bytes_per_position == 3 * 4 * 16 * 2 * 4  # all 3 middle layers, not stage 0's alone
    with ExitStack() as stack:
        gens = [stack.enter_context(pipelined.generator(model, device_id=f"p{i}")) for i, model in enumerate(models)]
        for gen in gens:
            gen.speculation = SPECULATION if speculative else None
        # the devices' chunk planners learn the cloud's stages from its published predictor
        assert gens[0].link.cloud_latency.pipeline_stages == 2 and gens[0].prefill.costs().cloud_stages == 2
        results = run_concurrently(gens, prompts)
    assert [r.token_ids for r in results] == reference
    assert pipelined.server.stats.max_batch_sessions > 1
    assert len(pipelined.server.store) == 0


def test_a_pipelined_worker_cannot_hand_off():
    with pytest.raises(ValueError, match="pipeline-parallel"):
        CloudConfig(bundle="x", role="decode", router_address="tcp://127.0.0.1:1", pipeline_stages=2)
