#!/usr/bin/env python
"""The device API's serving layer: `hat device serve`'s FastAPI-on-uvicorn server against the old standard-library
server (http.server, loaded at run time from git at OLD_REV, so product code holds none), in one run, on one
generator (the reference model split 2/1 in float32: this CPU has no native bf16, the cloud in this process).

Figures, each new/old as a ratio (medians over --rounds, old and new alternating within a round):
  /health req/s          GET /health from --clients threads, a new connection per request (the old server's
                         HTTP/1.0 allows no other); the new one's also with keep-alive (one connection a client)
  completions req/s      POST /v1/completions (--max-tokens, temperature 0) from --clients threads: they queue
                         for the one generation; a new connection per request
  p50 added latency      one client, sequential completions: the client's latency minus the generation's own
                         time (generate_ids, measured inside), the part the API layer adds; and the same for a
                         streamed completion up to its last byte
  API layer alone        the same p50 with a stand-in generator that returns --max-tokens tokens at once (the
                         model's tokenizer; no cloud, no torch): what the serving layer costs by itself
Timing on a shared 2-core machine is noisy: read the ratios, and rerun before trusting a small difference.
"""
from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

OLD_REV = "dc723ecf9b35b43f0e5ab6c248646e8b9ab7a1d5"  # main before issue 22: the http.server API
PROMPT = "def fibonacci(n):"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint folder (default: the reference model)")
    p.add_argument("--clients", type=int, default=4, help="concurrent client threads (default: %(default)s)")
    p.add_argument("--health-requests", type=int, default=600, help="per server and round (default: %(default)s)")
    p.add_argument("--completions", type=int, default=40, help="per server and round (default: %(default)s)")
    p.add_argument("--sequential", type=int, default=30, help="sequential completions per server and round, "
                                                              "plain and streamed (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=4, help="tokens per completion (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="(default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    return p.parse_args(argv)


def load_old_server():
    """The old OpenAIServer class and its ServeConfig, from git (its openai_schema from the same revision)."""
    root = Path(__file__).resolve().parents[1]

    def load(path: str, name: str, code_edit=lambda code: code) -> types.ModuleType:
        try:
            code = subprocess.run(["git", "-C", str(root), "show", f"{OLD_REV}:{path}"], check=True,
                                  capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            raise SystemExit(f"the old server is read from git ({OLD_REV[:10]}:{path}); this needs the repository's "
                             f"history: {exc}") from None
        module = types.ModuleType(name)
        module.__package__ = "hat.device"
        sys.modules[name] = module  # (dataclasses look their module up)
        exec(compile(code_edit(code), f"{OLD_REV[:10]}:{path}", "exec"), module.__dict__)
        return module

    load("device/openai_schema.py", "hat.device._old_openai_schema")
    old = load("device/openai_api.py", "hat.device._old_openai_api",
               lambda code: code.replace("from .openai_schema import", "from ._old_openai_schema import"))
    return old.OpenAIServer, old.ServeConfig


class Timed:
    """The generator's generate_ids, each call's duration recorded (the generation's own time)."""

    def __init__(self, generator):
        self.generator, self.plain, self.seconds = generator, generator.generate_ids, []

    def __call__(self, *args, **kwargs):
        began = time.perf_counter()
        try:
            return self.plain(*args, **kwargs)
        finally:
            self.seconds.append(time.perf_counter() - began)


def call(address, method: str, path: str, body: dict | None = None, conn=None) -> bytes:
    """One request; on `conn` (kept alive) or a connection of its own."""
    own = conn is None
    conn = conn or http.client.HTTPConnection(*address, timeout=120)
    conn.request(method, path, body=None if body is None else json.dumps(body),
                 headers={"Content-Type": "application/json"} if body is not None else {})
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"{method} {path}: {response.status} {data[:200]!r}")
    if own:
        conn.close()
    return data


def rate(address, clients: int, count: int, method: str, path: str, body=None, keep_alive=False) -> float:
    """Requests/s of `count` requests from `clients` threads."""
    per_client = [count // clients + (i < count % clients) for i in range(clients)]

    def client(n: int) -> None:
        conn = http.client.HTTPConnection(*address, timeout=120) if keep_alive else None
        for _ in range(n):
            call(address, method, path, body, conn)
        if conn is not None:
            conn.close()

    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, per_client))
    return count / (time.perf_counter() - began)


def added_latency(address, timed: Timed, count: int, body: dict) -> float:
    """p50 over `count` sequential requests of the client's latency minus the generation's own time, seconds."""
    added = []
    for _ in range(count):
        before = len(timed.seconds)
        began = time.perf_counter()
        call(address, "POST", "/v1/completions", body)
        latency = time.perf_counter() - began
        assert len(timed.seconds) == before + 1
        added.append(latency - timed.seconds[-1])
    return statistics.median(added)


class InstantGenerator:
    """A stand-in for SplitGenerator that generates `tokens` tokens at once: the API layer's cost alone."""
    max_context, speculation = 1 << 20, None

    def __init__(self, model, tokens: int):
        self.model = types.SimpleNamespace(tokenizer=model.tokenizer, backend=model.backend)
        self.link = types.SimpleNamespace(bytes_up=0, bytes_down=0)
        self.tokens = tokens

    def generate_ids(self, ids, max_new_tokens, sampling, on_text=None, started=None, cancel=None):
        from hat.device.results import GenerationResult

        for _ in range(self.tokens):
            if on_text is not None:
                on_text(" x")
        return GenerationResult(token_ids=[0] * self.tokens, text=" x" * self.tokens, prompt_tokens=len(ids),
                                finish_reason="length", ttft_ms=0.0, tbt_ms=[0.0] * (self.tokens - 1))


def measure(server, timed: Timed, args, keep_alive_too: bool) -> dict:
    address = server.address if hasattr(server, "address") else server.httpd.server_address[:2]
    body = {"prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 0}
    for _ in range(3):  # warm-up
        call(address, "POST", "/v1/completions", body)
        call(address, "GET", "/health")
    figures = {"health": rate(address, args.clients, args.health_requests, "GET", "/health"),
               "completions": rate(address, args.clients, args.completions, "POST", "/v1/completions", body),
               "added": added_latency(address, timed, args.sequential, body),
               "added_stream": added_latency(address, timed, args.sequential, {**body, "stream": True})}
    if keep_alive_too:
        figures["health_keep_alive"] = rate(address, args.clients, args.health_requests, "GET", "/health",
                                            keep_alive=True)
    return figures


def main(argv=None) -> int:
    args = parse_args(argv)
    from hat.cloud.config import CloudConfig
    from hat.cloud.server import CloudServer
    from hat.common.default_model import DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS, reference_model_dir
    from hat.common.split import split_checkpoint
    from hat.device.cloud_link import CloudLink, LinkConfig
    from hat.device.device_model import DeviceModel
    from hat.device.generator import SplitGenerator
    from hat.device.openai_api import OpenAIServer, ServeConfig

    torch.set_num_threads(args.threads)
    OldServer, OldConfig = load_old_server()
    model_dir = args.model or reference_model_dir()
    log(f"model {model_dir} (float32), {args.clients} clients, {args.rounds} rounds, old server from "
        f"{OLD_REV[:10]}")
    with tempfile.TemporaryDirectory(prefix="hat-bench-api-") as tmp:
        device_dir, cloud_dir = split_checkpoint(model_dir, DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS,
                                                 Path(tmp) / "bundle", "float32")
        with CloudServer(CloudConfig(bundle=str(cloud_dir), data_address="tcp://127.0.0.1:0",
                                     control_address="127.0.0.1:0")) as cloud:
            model = DeviceModel.load(device_dir)
            link = CloudLink(LinkConfig(host="127.0.0.1", data_port=int(cloud.data_address.rsplit(":", 1)[1]),
                                        control_port=int(cloud.control_address.rsplit(":", 1)[1]),
                                        device_id="bench-api"))
            try:
                link.register(model.manifest)
                generator = SplitGenerator(model, link)
                timed = Timed(generator)
                generator.generate_ids = timed
                instant = InstantGenerator(model, args.max_tokens)
                instant_timed = Timed(instant)
                instant.generate_ids = instant_timed
                rows = {"old": [], "new": []}
                for i in range(args.rounds):
                    for name in ("old", "new"):
                        make, config = (OldServer, OldConfig) if name == "old" else (OpenAIServer, ServeConfig)
                        server = make(generator, "bench", config(port=0, queue_timeout_s=600.0)).start()
                        try:
                            figures = measure(server, timed, args, keep_alive_too=name == "new")
                        finally:
                            server.stop()
                        server = make(instant, "bench", config(port=0, queue_timeout_s=600.0)).start()
                        try:
                            address = server.address if name == "new" else server.httpd.server_address[:2]
                            body = {"prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 0}
                            figures["alone"] = added_latency(address, instant_timed, 3 * args.sequential, body)
                        finally:
                            server.stop()
                        rows[name].append(figures)
                        log(f"round {i + 1}/{args.rounds} {name}: {figures}")
            finally:
                link.close()
    median = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in rows.items()}
    old, new = median["old"], median["new"]
    print(f"device API, new (FastAPI+uvicorn) vs old (http.server @{OLD_REV[:10]}), medians of {args.rounds} rounds, "
          f"{args.clients} clients, reference model float32, max_tokens {args.max_tokens}")
    print(f"/health req/s, new connection each: old {old['health']:.0f}  new {new['health']:.0f}  "
          f"ratio new/old {new['health'] / old['health']:.2f}")
    print(f"/health req/s, new with keep-alive: {new['health_keep_alive']:.0f}  ratio to old "
          f"{new['health_keep_alive'] / old['health']:.2f}")
    print(f"completions req/s (queued): old {old['completions']:.1f}  new {new['completions']:.1f}  "
          f"ratio new/old {new['completions'] / old['completions']:.2f}")
    for key, what in (("added", "plain completion"), ("added_stream", "streamed completion"),
                      ("alone", "plain completion, stand-in generator")):
        print(f"p50 latency the API layer adds, {what}: old {old[key] * 1000:.2f} ms  new "
              f"{new[key] * 1000:.2f} ms  ratio new/old {new[key] / old[key]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
