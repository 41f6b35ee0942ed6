"""`hat cloud scale --control HOST:PORT [--prefill-workers N] [--decode-workers M] [--wait SECONDS]`.

Asks a router that keeps its workers on Ray (`--ray-address`) to keep N prefill and M decode workers,
over its gRPC control plane (an operator's call: with keys, made with the cloud's own key folder).
Scaling down drains first: the router hands the leaving workers' sessions to the others by KV
handoff, so none is lost. Prints `prefill=SERVING/TARGET decode=SERVING/TARGET draining=K`.
"""
from __future__ import annotations

import json
import sys
import time

POLL_S = 0.5  # --wait: how often the router is asked again


def add_parser(actions) -> None:
    p = actions.add_parser("scale", help="change the numbers of workers a router keeps on Ray")
    p.add_argument("--control", required=True, metavar="HOST:PORT", help="the router's control-plane address")
    p.add_argument("--prefill-workers", type=int, default=None, metavar="N", help="prefill workers to keep")
    p.add_argument("--decode-workers", type=int, default=None, metavar="M", help="decode workers to keep")
    p.add_argument("--keys", default="", metavar="DIR", help="the cloud's own key folder (its control plane's TLS)")
    p.add_argument("--insecure", action="store_true", help="an unencrypted control plane not on loopback")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait until the pool serves the numbers asked for and drains nothing (exit 1 if it does not "
                        "within SECONDS)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds one call to the router may take")
    p.add_argument("--json", action="store_true", help="print the state as one JSON object")
    p.set_defaults(run=run_scale)


def run_scale(args) -> int:
    import grpc

    from hat.common.keys import load_identity, require_keys
    from hat.common.proto import hat_pb2 as pb
    from hat.common.proto import hat_pb2_grpc
    from hat.device.cloud_link import control_channel

    for name in ("prefill_workers", "decode_workers"):
        if (getattr(args, name) or 0) < 0:
            raise SystemExit(f"hat cloud scale: error: --{name.replace('_', '-')} must not be negative")
    require_keys([args.control], args.keys, args.insecure, "the call to the router")
    identity = load_identity(args.keys) if args.keys else None
    fields = {k: v for k in ("prefill_workers", "decode_workers") if (v := getattr(args, k)) is not None}
    with control_channel(args.control, (identity, identity.public) if identity else None) as channel:
        stub = hat_pb2_grpc.HatControlStub(channel)
        deadline = time.monotonic() + args.wait
        try:
            reply = stub.Scale(pb.ScaleRequest(**fields), timeout=args.timeout)
            while not settled(reply) and time.monotonic() < deadline:
                time.sleep(POLL_S)
                reply = stub.Scale(pb.ScaleRequest(), timeout=args.timeout)
        except grpc.RpcError as exc:
            raise SystemExit(f"hat cloud scale: error: {exc.details() or exc.code().name}") from None
    state = {"prefill_serving": reply.prefill_serving, "prefill_target": reply.prefill_target,
             "decode_serving": reply.decode_serving, "decode_target": reply.decode_target, "draining": reply.draining}
    if args.json:
        print(json.dumps(state))
    else:
        print(f"prefill={reply.prefill_serving}/{reply.prefill_target} decode={reply.decode_serving}/"
              f"{reply.decode_target} draining={reply.draining}")
    if args.wait and not settled(reply):
        print(f"hat cloud scale: the pool did not settle within {args.wait:g} s", file=sys.stderr)
        return 1
    return 0


def settled(reply) -> bool:
    """The pool serves exactly the numbers asked for and drains nothing."""
    return (reply.prefill_serving, reply.decode_serving, reply.draining) == (reply.prefill_target,
                                                                            reply.decode_target, 0)
