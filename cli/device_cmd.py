"""`hat device ACTION`: the device agent. `hat device serve --bundle BUNDLE/device --cloud HOST`: a local
OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions) until SIGINT or SIGTERM, reporting
telemetry to the cloud meanwhile."""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from .flash_cmd import add_flash_parser
from .generate_cmd import (add_chunking_args, add_cloud_args, add_speculation_args, connected_generator, link_config,
                           positive_int, set_threads)


def add_parser(commands) -> None:
    group = commands.add_parser("device", help="the device agent: serve a local OpenAI-compatible API; flash Jetsons")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    add_serve_parser(actions)
    add_flash_parser(actions)


def add_serve_parser(actions) -> None:
    from hat.device.openai_api import ServeConfig

    d = ServeConfig()
    p = actions.add_parser("serve", help="serve a local OpenAI-compatible HTTP API, generating with the cloud")
    p.add_argument("--bundle", required=True, help="device bundle folder (BUNDLE/device from `hat split`)")
    add_cloud_args(p)
    add_speculation_args(p)
    add_chunking_args(p)
    p.add_argument("--host", default=d.host,
                   help=f"address the API binds (default {d.host}: apps on this device only; 0.0.0.0 lets anyone "
                        "on the network use the model)")
    p.add_argument("--port", type=int, default=d.port, help="the API's TCP port (0: any free port)")
    p.add_argument("--model-name", default="", help="model id the API serves (default: the source checkpoint's name)")
    p.add_argument("--default-max-tokens", type=positive_int, default=d.default_max_tokens,
                   help="max_tokens of requests that leave it out")
    p.add_argument("--queue-timeout", type=float, default=d.queue_timeout_s,
                   help="seconds a request waits for the running generation (one at a time) before a 503")
    p.add_argument("--max-queue", type=positive_int, default=d.max_queue,
                   help="requests that may wait for the running generation; more get 503 at once")
    p.add_argument("--max-body-bytes", type=positive_int, default=d.max_body_bytes,
                   help="larger request bodies get 413")
    p.add_argument("--read-timeout", type=float, default=d.read_timeout_s,
                   help="seconds a request's head, its body, and each response write may take on a client connection")
    p.add_argument("--keep-alive", type=float, default=d.keep_alive_s,
                   help="seconds an idle kept-alive client connection stays open")
    p.add_argument("--shutdown-timeout", type=float, default=d.shutdown_s,
                   help="on SIGINT or SIGTERM, seconds running requests get to finish before their generation ends")
    p.add_argument("--telemetry-interval", type=float, default=5.0,
                   help="seconds between telemetry reports to the cloud (jetson-stats on a Jetson, psutil elsewhere; "
                        "a power-mode change re-profiles the device for the chunk planner); 0: none")
    p.set_defaults(run=run_serve)


def model_id(bundle: str, manifest) -> str:
    """The id apps name the model by: the source checkpoint's folder name, else the bundle folder's."""
    return manifest.source_name or Path(bundle).resolve().name


def run_serve(args) -> int:
    from hat.device.openai_api import LOOPBACK, OpenAIServer, ServeConfig

    if args.queue_timeout < 0 or args.read_timeout <= 0 or args.keep_alive <= 0 or args.shutdown_timeout < 0:
        raise ValueError("--queue-timeout and --shutdown-timeout must be >= 0, --read-timeout and --keep-alive > 0")
    set_threads(args.threads)
    config = ServeConfig(host=args.host, port=args.port, queue_timeout_s=args.queue_timeout, max_queue=args.max_queue,
                         max_body_bytes=args.max_body_bytes, read_timeout_s=args.read_timeout,
                         keep_alive_s=args.keep_alive, shutdown_s=args.shutdown_timeout,
                         default_max_tokens=args.default_max_tokens, model_name=args.model_name)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.telemetry_interval < 0:
        raise ValueError("--telemetry-interval must be >= 0")
    with connected_generator(args.bundle, link_config(args), args, args.backend, args.threads) as generator, \
            _telemetry(generator, args.telemetry_interval), \
            OpenAIServer(generator, model_id(args.bundle, generator.model.manifest), config) as server:
        if args.host not in (LOOPBACK, "localhost", "::1"):
            print(f"warning: the API is bound to {args.host}: anyone who can reach this address can use the model "
                  "(there is no authentication)", file=sys.stderr, flush=True)
        print(f"ready {server.url} model={server.model_id} backend={generator.model.backend}", flush=True)
        while not stop.wait(0.5):
            pass
    return 0


@contextmanager
def _telemetry(generator, interval_s: float):
    """Report telemetry to the cloud every `interval_s` (0: not at all) while the agent runs."""
    if not interval_s:
        yield None
        return
    from hat.device.telemetry import TelemetryReporter, TelemetrySource

    reporter = TelemetryReporter(TelemetrySource(), generator.link.report_telemetry, interval_s,
                                 lambda old, new: generator.request_reprofile()).start()
    try:
        yield reporter
    finally:
        reporter.stop()
