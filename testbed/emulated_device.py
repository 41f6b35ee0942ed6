"""One emulated device: a process running the real device agent (its model parts, drafting, chunking and
cloud link) through an emulated link, with its compute slowed to its device class and power schedule.

It replays its share of the workload: each request starts at its arrival time, or when the device has
finished its previous one (a device runs one request at a time), and one JSON line per request goes to
its result file (ExperimentRecord). Before the run it generates once, unrecorded, so its link and cost
estimators start warm; the "per-device" chunking of the `hat` system is chosen then.
"""
from __future__ import annotations

import json
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hat.common.sampling import SamplingParams
from hat.device.chunk_planner import ChunkingConfig, ChunkPlanner
from hat.device.cloud_link import CloudLink, LinkConfig
from hat.device.device_model import DeviceModel
from hat.device.generator import SplitGenerator
from hat.device.speculation import SpeculationConfig

from .device_profiles import ComputeThrottle, PowerSchedule
from .records import ExperimentRecord, TimelineStep
from .systems import SystemConfig

WARMUP_PROMPT = list(range(10, 74))  # 64 tokens
REPLY_TIMEOUT_S = 120.0  # longest wait for one cloud reply


@dataclass(frozen=True, slots=True)
class DeviceJob:
    index: int  # the device's number in the run
    device_dir: str  # device bundle
    schedule: PowerSchedule  # device class and power modes
    system: SystemConfig
    data_port: int  # the emulated link's port on 127.0.0.1 (in front of the cloud's data plane)
    control_port: int  # the cloud's control plane
    requests: tuple[tuple[int, float, tuple[int, ...], int], ...]  # (index, arrival_s, prompt ids, max_new_tokens)
    mean_prompt_tokens: int  # the workload's mean, for per-device chunking
    result_path: str  # JSON lines, one per request
    threads: int = 1  # torch threads


def _chunking(system: SystemConfig, fixed: int = 0) -> ChunkingConfig:
    """The system's chunking; an emulated device stands for hardware of its own (its compute slowed by padding), so
    its planner does not model sharing the cloud's cores."""
    if system.chunking == "none":
        return ChunkingConfig(enabled=False, shared_host=False)
    if system.chunking == "fixed":
        return ChunkingConfig(fixed_size=system.fixed_size, shared_host=False)
    if system.chunking == "per-device" and fixed:
        return ChunkingConfig(fixed_size=fixed, shared_host=False)
    return ChunkingConfig(shared_host=False)


def _record(job: DeviceJob, start_at: float, request: int, arrival_s: float, started_s: float, began: float,
            result) -> ExperimentRecord:
    timeline = [TimelineStep("decode" if s.decode else "prefill", s.tokens, (s.sent_s - began) * 1000, s.round_ms,
                             s.cloud_compute_ms, s.device_ms, s.accepted, s.drafted, s.draft_ms, s.predraft_reused,
                             s.in_cloud_ms, s.batch_sessions) for s in result.steps]
    finished_s = time.time() - start_at
    return ExperimentRecord(job.system.name, request, job.index, job.schedule.device.name, arrival_s, started_s,
                            finished_s, result.prompt_tokens, len(result.token_ids),
                            (started_s - arrival_s) * 1000 + result.ttft_ms, result.ttft_ms, result.tbt_ms,
                            result.accept_len if result.decode_rounds else 1.0, result.bytes_up, result.bytes_down,
                            result.chunks, timeline, output_ids=result.token_ids)


def device_main(job: DeviceJob, ready, go, start_at) -> None:
    """The process's body (forked: testbed/process_context.py): set up and warm up, put its index on `ready`, wait
    for `go`, then replay the requests with arrivals counted from `start_at.value` (time.time())."""
    torch.set_num_threads(job.threads)
    model = DeviceModel.load(job.device_dir)
    ComputeThrottle(model, job.schedule)
    system = job.system
    speculation = SpeculationConfig(parallel=system.parallel_draft) if system.speculation else None
    config = LinkConfig(host="127.0.0.1", data_port=job.data_port, control_port=job.control_port,
                        device_id=f"emulated-{job.index}-{system.name}", reply_timeout_s=REPLY_TIMEOUT_S)
    with CloudLink(config) as link, open(job.result_path, "a") as out:
        link.register(model.manifest)
        generator = SplitGenerator(model, link, speculation, _chunking(system))
        generator.generate_ids(WARMUP_PROMPT, 4)
        if system.chunking == "per-device":  # HAT: one size per device from its cost model, for a typical prompt
            plan = ChunkPlanner(_chunking(system)).plan(job.mean_prompt_tokens, generator.prefill.costs(),
                                                       generator.max_message_tokens)
            generator.prefill.config = _chunking(system, max(plan.sizes))
        ready.put(job.index)
        go.wait()
        start = start_at.value
        for request, arrival_s, prompt, max_new in job.requests:
            time.sleep(max(0.0, start + arrival_s - time.time()))
            started_s = time.time() - start
            began = time.perf_counter()
            try:
                result = generator.generate_ids(list(prompt), max_new, SamplingParams())
                record = _record(job, start, request, arrival_s, started_s, began, result)
            except Exception as exc:  # one failed request is recorded and the device goes on
                record = ExperimentRecord(system.name, request, job.index, job.schedule.device.name, arrival_s,
                                          started_s, time.time() - start, len(prompt), 0, float("nan"),
                                          float("nan"), error=f"{type(exc).__name__}: {exc}")
                traceback.print_exc()
            out.write(json.dumps(record.to_json()) + "\n")
            out.flush()
        _write_costs(job, generator, time.time() - start)


def _write_costs(job: DeviceJob, generator: SplitGenerator, elapsed_s: float) -> None:
    """The device's own cost models at the end of the run, for the simulator's calibration (testbed.calibration):
    its fitted input and output parts, head, measured round trip, and the cloud's published predictor."""
    prefill = generator.prefill
    cloud = prefill.cloud.published()
    costs = {"device": job.index, "device_class": job.schedule.device.name, "system": job.system.name,
             "mode_factor": job.schedule.factor_at(elapsed_s) / job.schedule.device.slowdown,
             "input": asdict(prefill.profile.input.cost), "output": asdict(prefill.profile.output.cost),
             "final_s": prefill.profile.final_s, "rtt_s": generator.link_estimator.estimate.rtt_s,
             "cloud": asdict(cloud[0]) if cloud else None}
    Path(job.result_path).with_suffix(".costs.json").write_text(json.dumps(costs))
