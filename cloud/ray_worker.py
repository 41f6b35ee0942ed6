"""A prefill or decode worker inside a Ray actor (created by cloud/ray_pool.py as a named detached actor).

Ray carries this worker's lifecycle only: where it runs, restarting it when its process dies, stopping it.
Its traffic is the same as a hand-started worker's: ZeroMQ to the router and to peers (KV handoff),
CURVE-protected with the cloud's keys.

Construction only records the role and the name: an exception in an actor's __init__ is final (Ray
never restarts such an actor), so the server starts in `serve`, which the pool calls at every round;
after Ray restarts a dead actor, the next round starts its server again. The worker id is the actor's
name, so a restarted actor registers under the same id from a new process, which the router admits at
once (cloud/worker_fence.py).
"""
from __future__ import annotations

import os

from .ray_config import WorkerSettings


class WorkerActor:
    def __init__(self, role: str, name: str):
        self.role, self.name = role, name
        self.server = None  # the CloudServer, once `serve` started it
        self.serving_as: tuple[str, WorkerSettings] | None = None  # (router address, settings) it was started with

    def serve(self, router_address: str, settings: WorkerSettings) -> dict:
        """Start the worker's server (registered with the router at `router_address`) unless it already serves there
        with these settings; its status."""
        current = self.server
        if current is not None and self.serving_as == (router_address, settings) and current.agent.accepted:
            return self.status()
        self.stop()
        import torch

        from .config import CloudConfig
        from .server import CloudServer

        torch.set_num_threads(settings.threads)  # explicit: Ray sets OMP_NUM_THREADS=1 where an actor reserves no CPU
        host = settings.kv_host or _node_address()
        config = CloudConfig(bundle=settings.bundle, role=self.role, router_address=router_address,
                             worker_id=self.name, kv_address=f"tcp://{host}:0", device=settings.device,
                             kv_budget_bytes=settings.kv_budget_bytes, max_sessions=settings.max_sessions,
                             session_idle_timeout_s=settings.session_idle_timeout_s, keys_dir=settings.keys_dir,
                             insecure=settings.insecure, profile_on_start=settings.profile_on_start,
                             heartbeat_interval_s=settings.heartbeat_interval_s)
        server = CloudServer(config).start()
        try:
            server.wait_registered(settings.register_timeout_s)
        except BaseException:
            server.stop(grace_s=0.1)
            raise
        self.server, self.serving_as = server, (router_address, settings)
        return self.status()

    def status(self) -> dict:
        server = self.server
        return {"name": self.name, "role": self.role, "pid": os.getpid(), "serving": server is not None,
                "routing_id": server.agent.routing_id if server else b"", "kv_address": server.kv_address if server
                else "", "sessions": len(server.store) if server else 0}

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop the server (its sessions were drained first: the router moves them off before asking)."""
        server, self.server, self.serving_as = self.server, None, None
        if server is not None:
            server.stop(grace_s=grace_s)


def _node_address() -> str:
    """The address of the Ray node this actor runs on (the one its peers and the router reach it at)."""
    import ray

    return ray.util.get_node_ip_address()
