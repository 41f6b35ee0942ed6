"""The router's control plane: devices register, report telemetry, ask for health, statistics and the latency
predictor.

The predictor published is that of the prefill worker a new session would go to now, with its queue.
"""
from __future__ import annotations

import time

import grpc

from hat.common.bundle import BundleManifest
from hat.common.proto import hat_pb2 as pb
from hat.common.proto import hat_pb2_grpc

from .config import RouterConfig
from .ray_config import MAX_POOL_WORKERS
from .device_registry import DeviceRegistry
from .security import peer_mismatch
from .router_policy import WorkerTable


class RouterControl(hat_pb2_grpc.HatControlServicer):
    def __init__(self, config: RouterConfig, manifest: BundleManifest, max_context: int, registry: DeviceRegistry,
                 table: WorkerTable):
        self.config, self.manifest, self.max_context, self.registry, self.table = (
            config, manifest, max_context, registry, table)
        self.started = time.monotonic()
        self.draining = False
        self.errors = lambda: 0  # ERROR replies the router sent (set by the router)
        self.pool = None  # the Ray pool keeping the router's workers (cloud/ray_pool.py), if it has one

    def Register(self, request, context):
        c = self.config
        mismatch = peer_mismatch(context, request.device_id)
        if mismatch:
            return pb.RegisterReply(accepted=False, reason=mismatch)
        return self.registry.reply(request, self.max_context, c.max_tokens_per_message, c.session_idle_timeout_s)

    def Telemetry(self, request, context):
        mismatch = peer_mismatch(context, request.device_id)
        if mismatch:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, mismatch)
        return self.registry.record_telemetry(request)

    def Health(self, request, context):
        status = "draining" if self.draining else ("serving" if self.table.workers else "no workers")
        return pb.HealthReply(status=status, uptime_s=time.monotonic() - self.started,
                              sessions=len(self.table.sessions))

    def Stats(self, request, context):
        return pb.StatsReply(sessions=len(self.table.sessions), registered_devices=len(self.registry),
                             errors=self.errors())

    def Latency(self, request, context):
        worker = self.table.pick_prefill(0)
        if worker is None:
            return pb.LatencyReply()
        reply = pb.LatencyReply()
        reply.CopyFrom(worker.latency)
        reply.queue_us = worker.queue_s() * 1e6
        return reply

    def Scale(self, request, context):
        if self.pool is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this router keeps no pool of workers to scale: start "
                                                                "it with --ray-address")
        for name in ("prefill_workers", "decode_workers"):
            if request.HasField(name) and getattr(request, name) > MAX_POOL_WORKERS:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name} is at most {MAX_POOL_WORKERS}, got "
                                                                f"{getattr(request, name)}")
        return self.pool.scale(request)
