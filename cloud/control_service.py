"""The control plane: gRPC registration, health, statistics, the latency predictor and device telemetry."""
from __future__ import annotations

import time

import grpc

from hat.common.bundle import BundleManifest
from hat.common.proto import hat_pb2 as pb
from hat.common.proto import hat_pb2_grpc

from .config import CloudConfig
from .device_registry import DeviceRegistry
from .security import peer_mismatch
from .latency_model import CloudLatencyModel
from .session_store import SessionStore
from .stats import CloudStats


class ControlService(hat_pb2_grpc.HatControlServicer):
    def __init__(self, config: CloudConfig, manifest: BundleManifest, max_context: int, registry: DeviceRegistry,
                 store: SessionStore, stats: CloudStats, latency: CloudLatencyModel):
        self.config, self.manifest, self.max_context = config, manifest, max_context
        self.registry, self.store, self.stats, self.latency = registry, store, stats, latency
        self.pending_work = lambda: (0, 0.0)  # tokens and query-key pairs waiting in the data plane (set by the server)
        self.started = time.monotonic()
        self.draining = False

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
        return pb.HealthReply(status="draining" if self.draining else "serving",
                              uptime_s=time.monotonic() - self.started, sessions=len(self.store))

    def Stats(self, request, context):
        s = self.stats
        return pb.StatsReply(sessions=len(self.store), registered_devices=len(self.registry),
                             kv_cache_bytes=self.store.kv_bytes(), forward_batches=s.forward_batches,
                             forward_tokens=s.forward_tokens, errors=s.errors,
                             expired_sessions=self.store.expired_total, max_batch_sessions=s.max_batch_sessions,
                             kv_blocks_used=self.store.budget.used_blocks, kv_blocks_total=self.store.budget.total_blocks,
                             admission_refusals=self.store.budget.refusals)

    def Latency(self, request, context):
        return self.latency.reply(*self.pending_work())
