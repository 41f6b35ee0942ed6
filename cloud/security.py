"""The cloud's side of encrypted, authenticated links: CURVE on the devices' ZeroMQ socket with a ZAP handler that
admits the allow-list's keys, TLS on gRPC that admits the allow-list's certificates, and a per-message check that
a connected device is still allowed (a revocation applies to the next message, not only the next connection).

Security is on whenever the cloud is given a key folder, and required whenever an address devices reach is not
loopback (`require_keys`), unless the operator says --insecure.
"""
from __future__ import annotations

import logging
from concurrent import futures
from pathlib import Path

import grpc
import zmq

from hat.common.keys import is_loopback, load_identity, require_keys
from hat.common.proto import hat_pb2 as pb
from hat.common.proto import hat_pb2_grpc
from hat.common.wire import WireError

from .allow_list import AllowList

log = logging.getLogger(__name__)
ZAP_DOMAIN = "hat"  # the ZAP domain the devices' socket asks the handler about
CLUSTER_ZAP_DOMAIN = "hat-cluster"  # the router's worker socket and the workers' KV sockets: the cloud's own key only
OPERATOR_RPCS = frozenset({"Scale"})  # control RPCs only the cloud's own key (its operators) may make


class CloudSecurity:
    """The server identity and allow-list of KEYS, applied to a ZeroMQ context, a ROUTER socket and a gRPC server."""

    def __init__(self, keys_dir: str | Path):
        self.identity = load_identity(keys_dir)
        self.allowed = AllowList(keys_dir)
        self._authenticator = None
        self._refused: set[bytes] = set()  # keys already logged as refused (once each)

    # --- ZeroMQ ---

    def start(self, context: zmq.Context) -> "CloudSecurity":
        """Run the ZAP handler on `context` (one per context): it admits the allow-list's CURVE keys."""
        from zmq.auth.thread import ThreadAuthenticator

        self._authenticator = ThreadAuthenticator(context, log=logging.getLogger("hat.cloud.zap"))
        self._authenticator.start()
        self._authenticator.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self)
        self._authenticator.configure_curve_callback(domain=CLUSTER_ZAP_DOMAIN, credentials_provider=_OwnKeyOnly(self))
        return self

    def callback(self, domain: str, client_key: bytes) -> bool:
        """ZAP: admit an allowed key; log a refused one (once per key)."""
        if self.allowed.by_curve_key(client_key) is not None:
            return True
        self.log_refusal(client_key, "a data-plane connection", "not on the allow-list", "device_refused")
        return False

    def log_refusal(self, client_key: bytes, what: str, why: str, event: str) -> None:
        """Warn of a refused key once: a peer retrying its handshake must not flood the log."""
        if client_key not in self._refused:
            self._refused.add(client_key)
            log.warning("refused %s from key %s: %s", what, client_key.decode()[:12], why, extra={"event": event})

    def protect(self, socket: zmq.Socket) -> None:
        """Make a socket that devices connect to a CURVE server (call before bind)."""
        socket.curve_secretkey = self.identity.curve_secret
        socket.curve_publickey = self.identity.public.curve_public
        socket.curve_server = True
        socket.zap_domain = ZAP_DOMAIN.encode()

    def protect_cluster_server(self, socket: zmq.Socket) -> None:
        """A socket other cloud processes connect to (the router's worker socket, a worker's KV socket): CURVE,
        admitting only the cloud's own key, which every process of the cloud holds (call before bind)."""
        self.protect(socket)
        socket.zap_domain = CLUSTER_ZAP_DOMAIN.encode()

    def protect_cluster_client(self, socket: zmq.Socket) -> None:
        """A socket that connects to another process of the cloud (call before connect)."""
        own = self.identity.public.curve_public
        socket.curve_serverkey, socket.curve_publickey = own, own
        socket.curve_secretkey = self.identity.curve_secret

    def device_of(self, frame: zmq.Frame) -> str | None:
        """The allowed device a received frame came from (ZAP's User-Id is its CURVE key), None once revoked."""
        try:
            key = frame.get("User-Id")
        except (zmq.ZMQError, KeyError):
            return None
        device = self.allowed.by_curve_key(key.encode() if isinstance(key, str) else key)
        return None if device is None else device.name

    def authorize(self, frame: zmq.Frame, device_id: str | None = None) -> str:
        """The device a data-plane message came from; WireError UNAUTHORIZED once its key is revoked, or when the
        message names another device (`device_id`: an OPEN's)."""
        device = self.device_of(frame)
        if device is None:
            raise WireError(pb.UNAUTHORIZED, "this device's key is not (or no longer) on the cloud's allow-list "
                                             "(`hat keys add` on the cloud)")
        if device_id is not None and device_id != device:
            raise WireError(pb.UNAUTHORIZED, f"device id {device_id!r} is not the id of this device's key ({device!r})")
        return device

    def stop(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None

    # --- gRPC ---

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """TLS with client certificates: the trust store is the allow-list's certificates, re-read per handshake."""
        def configuration(roots: bytes):
            # the cloud's own certificate is always trusted: its operators hold its key (`hat cloud scale`); so the
            # trust store is never empty (gRPC would then trust the system's public CAs)
            own = self.identity.public.certificate
            return grpc.ssl_server_certificate_configuration([(self.identity.tls_key, own)],
                                                             root_certificates=roots + own)

        current = {"roots": self.allowed.certificates()}

        def fetch():  # None: nothing changed since the last handshake
            roots = self.allowed.certificates()
            if roots == current["roots"]:
                return None
            current["roots"] = roots
            return configuration(roots)

        return grpc.dynamic_ssl_server_credentials(configuration(current["roots"]), fetch,
                                                   require_client_authentication=True)


class _OwnKeyOnly:
    """ZAP credentials for the cluster's sockets: the cloud's own CURVE key, nothing else."""

    def __init__(self, security: CloudSecurity):
        self.security = security

    def callback(self, domain: str, client_key: bytes) -> bool:
        if client_key == self.security.identity.public.curve_public:
            return True
        self.security.log_refusal(client_key, "a cluster connection", "not this cloud's key", "cluster_refused")
        return False


def cluster_security(keys_dir: str, insecure: bool, addresses: list[str], context: zmq.Context) -> CloudSecurity | None:
    """The security of a worker's links to its router and its peers (the same cloud identity as the router's)."""
    require_keys(addresses, keys_dir, insecure, "this worker's links")
    return CloudSecurity(keys_dir).start(context) if keys_dir else None


def device_plane_security(keys_dir: str, insecure: bool, addresses: list[str],
                          context: zmq.Context) -> CloudSecurity | None:
    """The security of the planes devices reach at `addresses`: CloudSecurity running on `context` when there are
    keys, None on loopback without them; SecurityConfigError for an exposed address without keys or --insecure."""
    require_keys(addresses, keys_dir, insecure, "the cloud")
    if not keys_dir:
        if any(not is_loopback(a) for a in addresses):
            log.warning("serving devices WITHOUT encryption on %s (--insecure)", ", ".join(addresses))
        return None
    security = CloudSecurity(keys_dir).start(context)
    log.info("devices' planes encrypted (CURVE, TLS) as %s; %d devices allowed", security.identity.name,
             len(security.allowed.names()))
    return security


def start_control_plane(servicer, address: str, workers: int,
                        security: CloudSecurity | None) -> tuple[grpc.Server, str]:
    """The gRPC control plane on `address` (TLS with client certificates when `security`), started; and the address
    it bound (port 0 resolved)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    hat_pb2_grpc.add_HatControlServicer_to_server(servicer if security is None else _AllowedCallers(servicer, security),
                                                  server)
    if security is not None:
        port = server.add_secure_port(address, security.grpc_credentials())
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind the control plane to {address}")
    server.start()
    return server, f"{address.rsplit(':', 1)[0]}:{port}"


class _AllowedCallers:
    """The control servicer behind a check that the caller's certificate is still on the allow-list: a TLS
    connection outlives a revocation, so each RPC is checked, as each data-plane message is."""

    def __init__(self, servicer, security: CloudSecurity):
        self._servicer, self._security = servicer, security

    def __getattr__(self, name: str):
        method = getattr(self._servicer, name)
        if not name[:1].isupper():  # not an RPC
            return method

        def checked(request, context):
            if name in OPERATOR_RPCS:
                if not is_own_certificate(context, self._security):
                    context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                  f"{name} is for the cloud's operators: call it with the cloud's own keys")
            elif caller_name(context) not in self._security.allowed.names():
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              "this device's key is not (or no longer) on the cloud's allow-list")
            return method(request, context)

        return checked


def is_own_certificate(context: grpc.ServicerContext, security: CloudSecurity) -> bool:
    """Whether an RPC's client certificate is the cloud's own (the whole certificate: a device's key may share its
    name)."""
    certificates = context.auth_context().get("x509_pem_cert") or []
    return bool(certificates) and certificates[0].strip() == security.identity.public.certificate.strip()


def caller_name(context: grpc.ServicerContext) -> str | None:
    """The common name of an RPC's client certificate (the device's key name), None without TLS."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if names else None


def peer_mismatch(context: grpc.ServicerContext, device_id: str) -> str | None:
    """Why an RPC may not speak for `device_id`: its client certificate names another device. None when it may
    (or without TLS, where nothing names the caller)."""
    caller = caller_name(context)
    if caller is not None and caller != device_id:
        return f"device id {device_id!r} is not the id of this device's key ({caller!r})"
    return None
