"""The cloud-only baseline system ("cloud-only"): the device sends the prompt's token ids once and the cloud runs
the WHOLE model (no privacy: the cloud sees the tokens, in and out), streaming each new token back.

Server (`CloudOnlyServer`, in a process of its own for the testbed): the device bundle's input part (embedding,
layers [0, K)) and output part (layers [N-M, N), norm, head), and the cloud bundle's middle part, chained in one
process: that is the whole model. A ZeroMQ ROUTER on 127.0.0.1 serves many clients at once with continuous
batching: each engine iteration runs every active request in one ragged forward of the three parts (a request in
prefill its prompt, cut to what is left of a per-iteration token budget as Sarathi does; a decoding request its one
newest token), with a KV cache per request per part, and takes the greedy argmax of each request's last position.
Every new token goes to its client at once. A request ends at a stop id, its max_new_tokens, or the context; its
caches are freed. Wire format: testbed/cloud_only_protocol.py.

Client (`cloud_only_device_main`, one process per emulated device, like emulated_device.device_main): a DEALER
through the device's LinkShim port. No device compute is emulated for this system: the device only tokenizes, and
the workload's prompts come tokenized already.
"""
from __future__ import annotations

import json
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import zmq

from hat.cloud.middle_worker import load_middle_part
from hat.common.bundle import check_compatible
from hat.common.layers import SequenceSpan
from hat.common.model_part import ModelPart
from hat.device.device_model import DeviceModel

from .cloud_only_config import CloudOnlyConfig
from .cloud_only_protocol import (Error, ProtocolError, ProtocolLimits, Request, Token, decode, encode,
                                  request_tokens)
from .device_replay import replay_on_devices
from .emulated_device import REPLY_TIMEOUT_S, WARMUP_PROMPT, DeviceJob
from .process_context import DEVICE_PRELOAD, process_context
from .records import ExperimentRecord, TimelineStep

SERVER_READY_TIMEOUT_S = 120.0  # longest wait for the server process to load both bundles and bind
SERVER_STOP_TIMEOUT_S = 10.0  # longest wait for it to exit when told to, before it is terminated, then killed
GO_TIMEOUT_S = 900.0  # longest wait of a ready client for the run's start
WARMUP_ID = (1 << 64) - 1  # the request id of a client's unrecorded warm-up request


@dataclass(slots=True)
class ServerStats:
    iterations: int = 0  # engine iterations (ragged forwards)
    max_batch: int = 0  # most requests in one forward
    completed: int = 0  # requests that ended with a final token
    refused: int = 0  # messages answered with an ERROR


@dataclass(slots=True, eq=False)
class _Active:
    owner: bytes  # the client's routing id
    request: Request
    budget: int  # tokens to generate at most
    caches: tuple  # KV caches of the input, middle and output parts
    fed: int = 0  # positions in the caches
    generated: list[int] = field(default_factory=list)


class WholeModel:
    """Input part, middle part and output part of one split, run as the whole model."""

    def __init__(self, device: DeviceModel, middle: ModelPart):
        self.parts = (device.input_part, middle, device.output_part)
        self.spec, self.stop_ids = device.spec, frozenset(device.stop_ids)

    @classmethod
    def load(cls, device_dir: str | Path, cloud_dir: str | Path) -> "WholeModel":
        device = DeviceModel.load(device_dir)
        middle, cloud = load_middle_part(cloud_dir)
        m = device.manifest
        check_compatible(fingerprint=m.source_fingerprint, num_layers=m.num_layers, input_layers=m.input_layers,
                         output_layers=m.output_layers, cloud=cloud)
        return cls(device, middle)

    def new_caches(self) -> tuple:
        return tuple(part.new_cache() for part in self.parts)

    @torch.inference_mode()
    def last_logits(self, work: list[tuple[_Active, list[int]]]) -> torch.Tensor:
        """One ragged forward of every (request, new tokens); float32 logits [len(work), vocab] of each one's last."""
        hidden = self.parts[0].embed(torch.tensor([t for _, tokens in work for t in tokens]))
        for slot, part in enumerate(self.parts):
            hidden = part.forward_layers(hidden, [SequenceSpan(r.caches[slot], r.fed, len(t)) for r, t in work])
        ends = torch.tensor([len(t) for _, t in work]).cumsum(0) - 1
        return self.parts[2].logits(hidden[ends])


class CloudOnlyServer:
    """Binds at construction (`.port`); `serve(stop)` runs until `stop()` is true; `close()`."""

    def __init__(self, model: WholeModel, config: CloudOnlyConfig = CloudOnlyConfig(),
                 address: str = "tcp://127.0.0.1:0"):
        self.model, self.config, self.stats = model, config, ServerStats()
        self.limits = ProtocolLimits(model.spec.max_context - 1, model.spec.vocab_size)
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 0)  # never drop a token: memory is bounded by the active generations
        # a frame far beyond any prompt (4 bytes a token) makes ZeroMQ drop its sender's connection, unread
        self.socket.setsockopt(zmq.MAXMSGSIZE, max(1 << 20, 16 * model.spec.max_context + 64))
        self.socket.bind(address)
        self.port = int(self.socket.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self.active: list[_Active] = []  # in admission order

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()

    def serve(self, stop) -> None:
        while not stop():
            if self.socket.poll(0 if self.active else self.config.idle_poll_ms):
                self._take_in()
            if self.active:
                self._step()

    def _send(self, owner: bytes, message: Token | Error) -> None:
        self.socket.send_multipart([owner, encode(message)])

    def _refuse(self, owner: bytes, request_id: int, why: str) -> None:
        self.stats.refused += 1
        self._send(owner, Error(request_id, why))

    def _take_in(self) -> None:
        for _ in range(self.config.max_drain):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            owner = frames[0]
            if len(frames) != 2:
                self._refuse(owner, 0, f"expected one frame per message, got {len(frames) - 1}")
                continue
            try:
                request = decode(frames[1], self.limits)
                if not isinstance(request, Request):
                    raise ProtocolError(f"a client sends REQUEST messages, not {type(request).__name__}",
                                        request.request_id)
            except ProtocolError as exc:
                self._refuse(owner, exc.request_id, str(exc))
                continue
            if any(a.owner == owner and a.request.request_id == request.request_id for a in self.active):
                self._refuse(owner, request.request_id, f"request {request.request_id} is already running")
            elif len(self.active) >= self.config.max_active:
                self._refuse(owner, request.request_id, f"server busy: {len(self.active)} requests running")
            else:
                budget = min(request.max_new_tokens, self.model.spec.max_context - len(request.prompt))
                self.active.append(_Active(owner, request, budget, self.model.new_caches()))

    def _step(self) -> None:
        """One engine iteration: every decoding request's newest token, then prompt chunks within the budget."""
        left = self.config.token_budget - sum(a.fed >= len(a.request.prompt) for a in self.active)
        work = []
        for a in self.active:
            prompt = a.request.prompt
            if a.fed >= len(prompt):
                work.append((a, [a.generated[-1]]))
            elif left > 0:
                take = min(len(prompt) - a.fed, left)
                left -= take
                work.append((a, list(prompt[a.fed: a.fed + take])))
        if not work:
            return
        self.stats.iterations += 1
        self.stats.max_batch = max(self.stats.max_batch, len(work))
        for (a, tokens), logits in zip(work, self._forward(work)):
            if isinstance(logits, Exception):
                self._finish(a)
                self._refuse(a.owner, a.request.request_id, f"the server failed to run this request: {logits}")
                continue
            a.fed += len(tokens)
            if a.fed < len(a.request.prompt):
                continue  # a prompt chunk that is not the last: nothing to sample yet
            token = int(torch.argmax(logits))
            a.generated.append(token)
            final = token in self.model.stop_ids or len(a.generated) >= a.budget
            self._send(a.owner, Token(a.request.request_id, token, len(a.generated) - 1, final))
            if final:
                self.stats.completed += 1
                self._finish(a)

    def _forward(self, work) -> list:
        try:
            return list(self.model.last_logits(work))
        except Exception as exc:  # one bad request must not fail the batch: retry each alone (caches cut to start)
            if len(work) == 1:
                traceback.print_exc()
                return [exc]
            return [out for item in work for out in self._forward([item])]

    def _finish(self, a: _Active) -> None:
        self.active.remove(a)  # its caches go with it


def _server_main(device_dir: str, cloud_dir: str, threads: int, config: CloudOnlyConfig, conn) -> None:
    """The server process: load, report ("ready", port), serve until the pipe says stop (or the parent is gone)."""
    try:
        if threads:
            torch.set_num_threads(threads)
        server = CloudOnlyServer(WholeModel.load(device_dir, cloud_dir), config)
    except Exception:  # reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", server.port))
    try:
        server.serve(conn.poll)
    finally:
        server.close()


@contextmanager
def cloud_only_server(device_dir: str | Path, cloud_dir: str | Path, threads: int = 1,
                      config: CloudOnlyConfig = CloudOnlyConfig()):
    """A CloudOnlyServer process on 127.0.0.1; yields its port, stops it on exit."""
    context = process_context(DEVICE_PRELOAD)
    parent, child = context.Pipe()
    process = context.Process(target=_server_main, args=(str(device_dir), str(cloud_dir), threads, config, child),
                              name="hat-cloud-only", daemon=True)
    process.start()
    child.close()
    try:
        if not parent.poll(SERVER_READY_TIMEOUT_S):
            raise RuntimeError(f"the cloud-only server did not start within {SERVER_READY_TIMEOUT_S:g} s")
        try:
            kind, value = parent.recv()
        except EOFError:
            raise RuntimeError(f"the cloud-only server died while starting (exit code {process.exitcode})") from None
        if kind != "ready":
            raise RuntimeError(f"the cloud-only server failed to start:\n{value}")
        yield value
    finally:
        try:
            parent.send(("stop", None))
        except OSError:
            pass
        process.join(SERVER_STOP_TIMEOUT_S)
        for end in (process.terminate, process.kill):
            if process.is_alive():
                end()
                process.join(SERVER_STOP_TIMEOUT_S)
        parent.close()


def cloud_only_device_main(job: DeviceJob, ready, go, start_at) -> None:
    """The process's body (forked: testbed/process_context.py): connect, warm up once (unrecorded), put its index on
    `ready`, wait for `go`, then replay the requests with arrivals counted from `start_at.value` (time.time()), one
    at a time."""
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(f"tcp://127.0.0.1:{job.data_port}")
    try:
        request_tokens(socket, WARMUP_ID, WARMUP_PROMPT, 4, REPLY_TIMEOUT_S)
        ready.put(job.index)
        if not go.wait(GO_TIMEOUT_S):
            raise RuntimeError(f"the run did not start within {GO_TIMEOUT_S:g} s")
        start = start_at.value
        with open(job.result_path, "a") as out:
            for request, arrival_s, prompt, max_new in job.requests:
                time.sleep(max(0.0, start + arrival_s - time.time()))
                started_s = time.time() - start
                record = _replay(socket, job, start, request, arrival_s, started_s, list(prompt), max_new)
                out.write(json.dumps(record.to_json()) + "\n")
                out.flush()
    finally:
        socket.close(linger=0)
        context.term()


def _replay(socket, job: DeviceJob, start: float, request: int, arrival_s: float, started_s: float,
            prompt: list[int], max_new: int) -> ExperimentRecord:
    name, device_class = job.system.name, job.schedule.device.name
    began = time.perf_counter()
    try:
        tokens, times, up, down = request_tokens(socket, request, prompt, max_new, REPLY_TIMEOUT_S)
    except Exception as exc:  # one failed request is recorded and the device goes on
        traceback.print_exc()
        return ExperimentRecord(name, request, job.index, device_class, arrival_s, started_s, time.time() - start,
                                len(prompt), 0, float("nan"), float("nan"), error=f"{type(exc).__name__}: {exc}")
    ttft_ms = (times[0] - began) * 1000
    tbt_ms = [(b - a) * 1000 for a, b in zip(times, times[1:])]
    timeline = [TimelineStep("prefill", len(prompt), 0.0, ttft_ms, 0.0, 0.0)]
    timeline += [TimelineStep("decode", 1, (a - began) * 1000, gap, 0.0, 0.0) for a, gap in zip(times, tbt_ms)]
    return ExperimentRecord(name, request, job.index, device_class, arrival_s, started_s, time.time() - start,
                            len(prompt), len(tokens), (started_s - arrival_s) * 1000 + ttft_ms, ttft_ms, tbt_ms, 1.0,
                            up, down, [len(prompt)], timeline, output_ids=tokens)


def run_cloud_only_system(scenario, name: str, requests, device_dir: Path, cloud_dir: Path, work: Path,
                          bar) -> list[ExperimentRecord]:
    """experiment.run_system for the cloud-only system: a whole-model server process, then the devices (client
    processes) behind their links as for any system; the records in workload order."""
    with cloud_only_server(device_dir, cloud_dir, scenario.cloud_threads) as port:
        return replay_on_devices(scenario, name, requests, device_dir, work, bar, cloud_only_device_main,
                                 f"tcp://127.0.0.1:{port}")
