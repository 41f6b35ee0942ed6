"""The device's connection to the cloud: gRPC registration and a ZeroMQ DEALER for hidden states.

Every wait is bounded: a reply that does not come within `reply_timeout_s` raises CloudTimeoutError.
Bytes sent and received on the data plane are counted per link. Several requests may be out at once
(a pipelined prefill): a reply that comes before the one waited for is kept until it is asked for,
and a late reply to a request given up on is dropped. Replies carry the device's send and receive
times (perf_counter) for the link estimator.
"""
from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass

import grpc
import torch
import zmq

from hat.common import wire
from hat.common.bundle import BundleManifest
from hat.common.proto import hat_pb2 as pb
from hat.common.proto import hat_pb2_grpc

log = logging.getLogger("hat.device")


class CloudError(RuntimeError):
    """The cloud refused a request; `code` is the wire ErrorCode (or None for control-plane refusals)."""

    def __init__(self, message: str, code: int | None = None, retry_after_s: float = 0.0):
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s  # OVERLOADED: when the cloud says a retry may succeed (0 = it will not)


class CloudTimeoutError(CloudError):
    """No reply within the configured time."""


@dataclass(frozen=True, slots=True)
class LinkConfig:
    host: str = "127.0.0.1"  # cloud host name or address
    data_port: int = 5555  # cloud's ZeroMQ data-plane port
    control_port: int = 5556  # cloud's gRPC control-plane port
    device_id: str = ""  # this device's id; empty = derived from the host name
    reply_timeout_s: float = 60.0  # longest wait for one data-plane reply
    admission_timeout_s: float = 30.0  # longest wait for a busy cloud (OVERLOADED) to take a new session
    ttft_slo_ms: int = 0  # this device's time-to-first-token target, sent with each OPEN (0 = the cloud's default)
    tbt_slo_ms: int = 0  # its time-between-rounds target: the cloud keeps batches with its rounds within it
    control_timeout_s: float = 10.0  # longest wait for one control-plane call (includes connecting)
    # a cloud that stops answering (a stalled link, a restart): how long a generation keeps re-registering and
    # re-sending its history, with backoff, before it gives up with an error
    recovery_timeout_s: float = 60.0
    keys_dir: str = ""  # `hat keys` folder: this device's identity and its cloud's public key (server/); "" = none
    insecure: bool = False  # allow an unencrypted link to a cloud that is not on loopback (trusted networks only)

    def resolved_device_id(self, key_name: str = "") -> str:
        """The id the device registers as: the configured one, else its key's name, else host name and pid."""
        return self.device_id or key_name or f"{platform.node() or 'device'}-{os.getpid()}"


def device_keys(config: LinkConfig):
    """(identity, cloud's public keys) from config.keys_dir, or None; SecurityConfigError for a cloud that is not on
    loopback with neither keys nor --insecure."""
    from hat.common.keys import load_identity, load_server, require_keys

    require_keys([f"{config.host}:{config.control_port}"], config.keys_dir, config.insecure, "the link to the cloud")
    if not config.keys_dir:
        return None
    return load_identity(config.keys_dir), load_server(config.keys_dir)


def control_channel(target: str, keys) -> grpc.Channel:
    """gRPC to the cloud: TLS with this device's certificate, the cloud's pinned (the only trusted root, checked
    under the cloud key's name whatever address it is reached at), or plain without keys."""
    if keys is None:
        return grpc.insecure_channel(target)
    identity, server = keys
    credentials = grpc.ssl_channel_credentials(root_certificates=server.certificate, private_key=identity.tls_key,
                                               certificate_chain=identity.public.certificate)
    return grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", server.name)])


class CloudLink:
    def __init__(self, config: LinkConfig):
        self.config = config
        self.keys = device_keys(config)  # (own identity, the cloud's public keys), or None for a plain link
        self.device_id = config.resolved_device_id(self.keys[0].name if self.keys else "")
        self.bytes_up = 0
        self.bytes_down = 0
        self.registration: pb.RegisterReply | None = None
        self._registered_as = None  # (manifest, backend) of the last register(), for register_again
        self.cloud_latency: pb.LatencyReply | None = None  # the cloud's latency predictor, newest fetched
        self._latency_future = None
        self._sequence = 0
        self._awaited: dict[int, float] = {}  # sequence -> perf_counter when sent, for requests not yet answered
        self._stash: dict[int, wire.DataMessage] = {}  # replies that came before the one being waited for
        self._channel = control_channel(f"{config.host}:{config.control_port}", self.keys)
        self._control = hat_pb2_grpc.HatControlStub(self._channel)
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        if self.keys is not None:  # CURVE client: the cloud proves it holds the pinned key, and admits ours or not
            identity, server = self.keys
            self._socket.curve_serverkey = server.curve_public
            self._socket.curve_publickey = identity.public.curve_public
            self._socket.curve_secretkey = identity.curve_secret
        self._socket.setsockopt(zmq.ROUTING_ID, os.urandom(16))
        self._socket.connect(f"tcp://{config.host}:{config.data_port}")

    def register(self, manifest: BundleManifest, backend: str = "torch") -> pb.RegisterReply:
        self._registered_as = (manifest, backend)
        request = pb.RegisterRequest(
            device_id=self.device_id, fingerprint=manifest.source_fingerprint, num_layers=manifest.num_layers,
            input_layers=manifest.input_layers, output_layers=manifest.output_layers,
            capabilities=pb.Capabilities(backend=backend, compute_dtype=manifest.dtype,
                                         platform=f"{platform.machine()} {platform.system()}"))
        try:
            reply = self._control.Register(request, timeout=self.config.control_timeout_s, wait_for_ready=True)
        except grpc.RpcError as exc:
            hint = (f" (with keys: is {self.device_id!r} on the cloud's allow-list, `hat keys add`, and is "
                    f"{self.config.keys_dir}/server the cloud's key?)" if self.keys else "")
            raise CloudError(f"cannot register with the cloud's control plane at {self.config.host}:"
                             f"{self.config.control_port}: {exc.code().name} {exc.details()}{hint}") from None
        if not reply.accepted:
            raise CloudError(f"the cloud refused this device: {reply.reason}")
        self.registration = reply
        try:
            self.cloud_latency = self._control.Latency(pb.LatencyRequest(), timeout=self.config.control_timeout_s)
        except grpc.RpcError:  # a cloud without a predictor: the device plans from the compute times it reports
            self.cloud_latency = None
        return reply

    def register_again(self) -> pb.RegisterReply:
        """Register as before (after the cloud restarted and forgot this device); CloudError if it cannot."""
        if self._registered_as is None:
            raise CloudError("this link never registered")
        return self.register(*self._registered_as)

    def refresh_latency(self) -> pb.LatencyReply | None:
        """The newest predictor fetched; asks the cloud for a fresh one in the background (never blocks)."""
        future = self._latency_future
        if future is not None and future.done():
            try:
                self.cloud_latency = future.result()
            except grpc.RpcError:
                pass
            future = None
        if future is None and self.registration is not None:
            self._latency_future = self._control.Latency.future(pb.LatencyRequest(),
                                                                 timeout=self.config.control_timeout_s)
        return self.cloud_latency

    def report_telemetry(self, sample) -> bool:
        """Send a TelemetrySample over the control plane; True when the cloud took it (False: not registered there,
        or a cloud without telemetry, or unreachable within the control timeout)."""
        try:
            ack = self._control.Telemetry(sample.to_proto(self.device_id), timeout=self.config.control_timeout_s)
        except grpc.RpcError as exc:
            log.debug("telemetry not sent: %s", exc.code().name)
            return False
        return ack.registered

    def stats(self) -> pb.StatsReply:
        return self._control.Stats(pb.StatsRequest(), timeout=self.config.control_timeout_s)

    def open_session(self, session_id: str, max_positions: int = 0) -> wire.DataMessage:
        """Open (or re-open, empty) a session; the OPENED reply's times measure the round trip."""
        return self.receive(self.send_open(session_id, max_positions))

    def send_open(self, session_id: str, max_positions: int = 0) -> int:
        """Send an OPEN without waiting (FORWARDs sent after it are taken after it); returns its sequence number.
        `max_positions`: the most positions the session will hold (the cloud reserves KV memory for them;
        0 = the whole context)."""
        return self._send(wire.make_header(pb.OPEN, session_id, device_id=self.device_id, max_positions=max_positions,
                                           ttft_slo_ms=self.config.ttft_slo_ms, tbt_slo_ms=self.config.tbt_slo_ms))

    def close_session(self, session_id: str, timeout_s: float = 5.0) -> wire.DataMessage:
        return self._request(wire.make_header(pb.CLOSE, session_id),
                             timeout_s=min(timeout_s, self.config.reply_timeout_s))

    def forward(self, session_id: str, start: int, hidden: torch.Tensor, return_last: int = 0) -> wire.DataMessage:
        """Send positions [start, start + len(hidden)); the RESULT holds the middle part's output for the last
        `return_last` positions (0 = all) and, in its header, the cloud's compute time."""
        return self.receive(self.send_forward(session_id, start, hidden, return_last))

    def send_forward(self, session_id: str, start: int, hidden: torch.Tensor, return_last: int = 0,
                     append_only: bool = False) -> int:
        """Send a FORWARD without waiting; returns the sequence number to `receive` its reply with.
        `append_only`: a prompt chunk, refused unless it starts exactly at the end of the session's cache."""
        return self._send(wire.make_header(pb.FORWARD, session_id, start=start, return_last=return_last,
                                           append_only=append_only), hidden)

    def reply_ready(self) -> bool:
        """Whether a reply is waiting to be received (never blocks)."""
        return bool(self._stash) or bool(self._socket.poll(0, zmq.POLLIN))

    def receive(self, sequence: int, timeout_s: float | None = None) -> wire.DataMessage:
        """The reply to request `sequence`; CloudError if it is an ERROR, CloudTimeoutError (and the request is
        given up) if it does not come within the timeout."""
        reply = self._stash.pop(sequence, None)
        if reply is not None:
            return self._checked(reply)
        timeout_s = self.config.reply_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            punctual = not self._socket.poll(0, zmq.POLLIN)
            remaining_ms = max(0.0, deadline - time.monotonic()) * 1000
            if punctual and not self._socket.poll(remaining_ms, zmq.POLLIN):
                self._awaited.pop(sequence, None)
                raise CloudTimeoutError(f"no reply from the cloud at {self.config.host}:{self.config.data_port} "
                                        f"within {timeout_s:g} s")
            reply_frames = self._socket.recv_multipart(copy=False)
            received = time.perf_counter()
            self.bytes_down += wire.frame_bytes(reply_frames)
            reply = wire.decode(reply_frames)
            sent = self._awaited.pop(reply.header.sequence, None)
            if sent is None:
                continue  # a late reply to a request given up on
            reply.request_sent_s, reply.received_s, reply.punctual = sent, received, punctual
            if reply.header.sequence == sequence:
                return self._checked(reply)
            self._stash[reply.header.sequence] = reply

    def forget(self, sequence: int) -> None:
        """Give up on request `sequence`: its reply, now or later, is dropped."""
        self._awaited.pop(sequence, None)
        self._stash.pop(sequence, None)

    @staticmethod
    def _checked(reply: wire.DataMessage) -> wire.DataMessage:
        if reply.header.kind == pb.ERROR:
            code = reply.header.error_code
            raise CloudError(f"cloud error {pb.ErrorCode.Name(code)}: {reply.header.error_message}", code,
                             reply.header.retry_after_ms / 1000)
        return reply

    def _send(self, header: pb.DataHeader, tensor: torch.Tensor | None = None) -> int:
        self._sequence += 1
        header.sequence = self._sequence
        frames = wire.encode(header, tensor)
        self._socket.send_multipart(frames, copy=False)
        self._awaited[self._sequence] = time.perf_counter()
        self.bytes_up += wire.frame_bytes(frames)
        return self._sequence

    def _request(self, header: pb.DataHeader, tensor: torch.Tensor | None = None,
                 timeout_s: float | None = None) -> wire.DataMessage:
        return self.receive(self._send(header, tensor), timeout_s)

    def close(self) -> None:
        self._socket.close(linger=0)
        self._context.term()
        self._channel.close()

    def __enter__(self) -> "CloudLink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
