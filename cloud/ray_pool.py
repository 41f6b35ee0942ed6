"""A router's prefill and decode workers kept alive by Ray Core (`hat cloud serve --role router --ray-address`).

What Ray owns: where each worker runs (its CPUs, GPUs and, with `pool_resources`, the custom resource
hat_prefill or hat_decode of its pool), restarting its process when it dies (`max_restarts`), and
finding it again by name. Workers are named detached actors, "prefill-0", "decode-1", ... in the pool's
namespace, so they outlive the router: a restarted router (the Ray driver) finds them again by name.

What stays the project's: registration, heartbeats, placement of every session and KV handoff, over
ZeroMQ (CURVE with the cloud's keys), exactly as for hand-started workers; Ray carries no tensor.

The pool's thread reconciles every `reconcile_interval_s`: each wanted worker is created if missing and
asked to `serve` (a no-op while it serves; after Ray restarted it, it starts again); a worker beyond the
wanted numbers is drained by the router (its sessions handed off by KV to the others, none lost), then
stopped and killed for good. `scale` changes the wanted numbers (`hat cloud scale`, over gRPC).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, replace

import ray
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

from hat.common.keys import is_loopback
from hat.common.proto import hat_pb2 as pb

from .ray_config import POOL_RESOURCE, POOL_ROLES, RayPoolConfig
from .ray_worker import WorkerActor

log = logging.getLogger("hat.cloud")
WORKER_NAME = re.compile(r"(prefill|decode)-(\d+)")  # the pool's actor names
RETRY_AFTER_FAILURE_S = 5.0  # a worker whose `serve` failed (its error logged) is asked again after this
LOCAL_POOL_UNITS = 1000  # "local" with pool_resources: units of hat_prefill and hat_decode the cluster declares


@dataclass(slots=True)
class Retiring:
    """A worker beyond the wanted numbers, on its way out."""
    since: float  # when its drain was asked
    stop_ref: object = None  # its `stop` call, once drained (or the drain timed out)
    stop_since: float = 0.0


def ray_environment(config: RayPoolConfig) -> tuple[dict[str, str], str]:
    """The environment Ray is started or joined with, set explicitly (Ray 2.60 would otherwise turn token auth on
    with a token of its own choosing in ~/.ray): token auth with the given token file, or a fresh one for "local";
    usage statistics off. Also the temporary folder it made for a fresh token ("" if none)."""
    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    if config.auth_disabled:
        return {**env, "RAY_AUTH_MODE": "disabled"}, ""
    folder, path = "", config.auth_token_path
    if not path:  # "local": a token of this cluster's own, readable by this user only
        folder = tempfile.mkdtemp(prefix="hat-ray-")
        path = os.path.join(folder, "token")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            out.write(os.urandom(32).hex())
    return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": os.path.abspath(path)}, folder


def connect_ray(config: RayPoolConfig) -> tuple[bool, str]:
    """Join the cluster at config.address, or start a local one ("local"), with `ray_environment`; a process already
    connected stays as it is. Whether this call connected, and the token folder it made ("" if none)."""
    if ray.is_initialized():
        return False, ""
    env, folder = ray_environment(config)
    os.environ.update(env)
    # Ray reads RAY_AUTH_MODE into its config when it is imported: refresh that as Ray itself does when it turns token
    # auth on (ray._private.authentication.authentication_token_setup), and drop any token it read before
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    local = config.address == "local"
    resources = {POOL_RESOURCE.format(role=r): LOCAL_POOL_UNITS for r in POOL_ROLES} if (
        local and config.pool_resources) else None
    # a local cluster (one host) stays on loopback: its processes talk to nothing outside this machine
    ray.init(address=None if local else config.address, namespace=config.namespace, resources=resources,
             include_dashboard=False, log_to_driver=config.log_to_driver,
             **({"_node_ip_address": "127.0.0.1"} if local else {}))
    return True, folder


def disconnect_ray(token_folder: str) -> None:
    """Leave the cluster (which ends, with every actor on it, if this process started it) and remove the token."""
    ray.shutdown()
    if token_folder:
        shutil.rmtree(token_folder, ignore_errors=True)


class RayWorkerPool:
    def __init__(self, config: RayPoolConfig, router):
        self.config, self.router = config, router
        self._targets = {"prefill": config.prefill_workers, "decode": config.decode_workers}
        self._lock = threading.Lock()  # guards _targets (scale() runs on gRPC threads)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._owns_ray = False  # this pool started Ray (so ray.shutdown() ends the cluster and its workers)
        self._token_folder = ""
        self._actor = None  # the ray.remote actor class
        self._handles: dict[str, object] = {}  # name -> actor handle
        self._pending: dict[str, tuple[object, float]] = {}  # name -> (its `serve` call in flight, since when)
        self._since: dict[str, float] = {}  # name -> when the pool first wanted it and it did not serve yet
        self._retry_at: dict[str, float] = {}  # name -> when to ask again after a failed `serve`
        self._errors: dict[str, str] = {}  # name -> the latest failure logged (each logged once)
        self._retiring: dict[str, Retiring] = {}
        self._retiring_names: frozenset[str] = frozenset()  # a snapshot of _retiring's names, for scale()
        self.statuses: dict[str, dict] = {}  # name -> its latest status (pid, routing id, KV address, sessions)
        self.router_address = ""  # the router's worker address as the workers reach it
        self.settings = config.worker  # what the workers run with

    # --- life ---

    def start(self) -> "RayWorkerPool":
        """Join (or, for "local", start) the Ray cluster, then reconcile on a thread of its own."""
        self._owns_ray, self._token_folder = connect_ray(self.config)
        self.router_address = self._reachable(self.router.worker_address)
        if not self.settings.kv_host and is_loopback(self.router_address):  # one host: KV stays on loopback too
            self.settings = replace(self.settings, kv_host="127.0.0.1")
        self._actor = ray.remote(WorkerActor)
        self._thread = threading.Thread(target=self._run, name="hat-ray-pool", daemon=True)
        self._thread.start()
        log.info("keeping %d prefill and %d decode workers on Ray (namespace %s) for the router at %s",
                 *self._targets.values(), self.config.namespace, self.router_address)
        return self

    def stop(self) -> None:
        """Stop reconciling. Detached workers stay up (a restarted router finds them again), unless this pool started
        the cluster ("local"): then the cluster ends, its workers with it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._owns_ray:
            disconnect_ray(self._token_folder)

    def scale(self, request: pb.ScaleRequest) -> pb.ScaleReply:
        """Set the numbers asked for (a field left unset keeps its number); the state now."""
        with self._lock:
            for role in POOL_ROLES:
                if request.HasField(f"{role}_workers"):
                    self._targets[role] = getattr(request, f"{role}_workers")
            targets = dict(self._targets)
        if request.HasField("prefill_workers") or request.HasField("decode_workers"):
            log.info("scaling to %d prefill and %d decode workers", targets["prefill"], targets["decode"])
        table = self.router.table
        draining = self._retiring_names | {w.name for w in list(table.workers.values()) if w.draining}
        return pb.ScaleReply(prefill_target=targets["prefill"], decode_target=targets["decode"],
                             prefill_serving=len(table.serving("prefill")), decode_serving=len(table.serving("decode")),
                             draining=len(draining))

    # --- reconciling ---

    def _run(self) -> None:
        failure = ""
        while not self._stop.is_set():
            try:
                self._round()
                failure = ""
            except Exception as exc:  # a failed round (e.g. the cluster briefly unreachable) must not end the pool
                if str(exc) != failure:  # (logged once while it keeps failing the same way)
                    failure = str(exc)
                    log.exception("the Ray pool's round failed; trying again every %g s",
                                  self.config.reconcile_interval_s)
            self._stop.wait(self.config.reconcile_interval_s)

    def _round(self) -> None:
        with self._lock:
            wanted = {f"{role}-{i}": role for role, count in self._targets.items() for i in range(count)}
        present = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["namespace"] == self.config.namespace and WORKER_NAME.fullmatch(a["name"])}
        for name in sorted(present | set(self._handles) | set(self._retiring)):
            if name not in wanted:
                self._retire(name)
        for name, role in wanted.items():
            state = self._retiring.get(name)
            if state is not None and state.stop_ref is None:  # wanted again while draining: it stays
                del self._retiring[name]
                self.router.drain.cancel(name)
            elif state is None:
                self._keep(name, role)
        self._harvest()
        self._retiring_names = frozenset(self._retiring)

    def _keep(self, name: str, role: str) -> None:
        """Create the worker if missing; ask it to serve unless a call is in flight or it failed moments ago."""
        now = time.monotonic()
        if name in self._pending or now < self._retry_at.get(name, 0.0):
            return
        handle = self._handles.get(name)
        if handle is None:
            c = self.config
            resources = {POOL_RESOURCE.format(role=role): 1} if c.pool_resources else {}
            handle = self._handles[name] = self._actor.options(
                name=name, namespace=c.namespace, lifetime="detached", get_if_exists=True,
                max_restarts=c.max_restarts, num_cpus=c.worker_cpus, num_gpus=c.worker_gpus,
                resources=resources).remote(role, name)
        if name not in self.statuses:  # not serving yet (or again): reported once it does
            self._since.setdefault(name, now)
        self._pending[name] = (handle.serve.remote(self.router_address, self.settings), now)

    def _harvest(self) -> None:
        """Collect the `serve` calls that finished; report workers that do not come up."""
        refs = {ref: name for name, (ref, _) in self._pending.items()}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0) if refs else ([], [])
        now = time.monotonic()
        for ref in done:
            name = refs[ref]
            del self._pending[name]
            try:
                status = ray.get(ref)
            except RayTaskError as exc:  # the server did not start (bad bundle, refused by the router, ...)
                self._report(name, str(exc.cause if exc.cause is not None else exc))
                self._retry_at[name] = now + RETRY_AFTER_FAILURE_S
                continue
            except ActorDiedError:  # dead for good (restarts used up): created afresh next round
                self._report(name, "its actor died and Ray will not restart it; creating it again")
                self._handles.pop(name, None)
                self.statuses.pop(name, None)
                continue
            except RayActorError:  # its process died and Ray is restarting it: asked again next round
                self.statuses.pop(name, None)
                continue
            before, self.statuses[name] = self.statuses.get(name), status
            self._since.pop(name, None)
            if before is None or before["routing_id"] != status["routing_id"]:  # (re)started
                self._errors.pop(name, None)
                log.info("worker %s serves (pid %d, KV at %s)", name, status["pid"], status["kv_address"])
        for name, since in self._since.items():  # not serving, and no failure of its own says why
            if now - since > self.config.placement_warning_s and name not in self._errors:
                self._errors[name] = "not placed"
                log.warning("worker %s is not serving after %.0f s: is there room for it in the Ray cluster (%g CPUs, "
                            "%g GPUs%s)?", name, now - since, self.config.worker_cpus, self.config.worker_gpus,
                            ", 1 " + POOL_RESOURCE.format(role=name.split("-")[0]) if self.config.pool_resources else "")

    def _report(self, name: str, error: str) -> None:
        if self._errors.get(name) != error:
            self._errors[name] = error
            log.error("worker %s: %s", name, error, extra={"event": "ray_worker_failed"})

    def _retire(self, name: str) -> None:
        """Drain, then stop, then kill a worker beyond the wanted numbers, one step per round."""
        now = time.monotonic()
        state = self._retiring.get(name)
        if state is None:
            state = self._retiring[name] = Retiring(now)
            self._pending.pop(name, None)
            self._since.pop(name, None)
            self.router.drain.drain(name)
            log.info("draining worker %s", name)
        handle = self._handle(name)
        if handle is not None and state.stop_ref is None:
            drained = self.router.drain.is_drained(name)
            if not drained and now - state.since < self.config.drain_timeout_s:
                return
            if not drained:
                log.warning("worker %s still holds sessions after %.0f s of draining; stopping it anyway", name,
                            self.config.drain_timeout_s)
            state.stop_ref, state.stop_since = handle.stop.remote(), now
            return
        if handle is not None:
            if not ray.wait([state.stop_ref], timeout=0)[0] and now - state.stop_since < self.config.stop_timeout_s:
                return
            ray.kill(handle, no_restart=True)
        self.router.drain.stopped(name)
        for table in (self._handles, self.statuses, self._retiring, self._retry_at, self._errors):
            table.pop(name, None)
        log.info("worker %s stopped", name)

    def _handle(self, name: str):
        handle = self._handles.get(name)
        if handle is None:
            try:
                handle = self._handles[name] = ray.get_actor(name, namespace=self.config.namespace)
            except ValueError:  # no such actor (any more)
                return None
        return handle

    def _reachable(self, address: str) -> str:
        """The router's worker address as workers on any node reach it: a wildcard host becomes this node's address."""
        scheme, _, rest = address.partition("://")
        host, _, port = rest.rpartition(":")
        if host in ("0.0.0.0", "*", "[::]", "::"):
            host = ray.util.get_node_ip_address()
        return f"{scheme}://{host}:{port}"
