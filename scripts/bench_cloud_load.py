#!/usr/bin/env python
"""Cloud load benchmark: emulated devices arriving as a Poisson process against each serving mode, one table.

Modes (--modes):
  all       one `hat cloud serve` process, --threads 1
  all-2t    the same with --threads 2 (as many cores as the two workers below)
  always    a router, one prefill and one decode worker (1 thread each); every session's KV is handed to the
            decode worker at its first round
  auto      the same cluster; a session moves only when the prefill worker's predictor says a round would miss
            its time-between-rounds target
  pipe2     one process whose middle part is a 2-stage pipeline (torch.distributed), 1 thread per stage
Every mode replays the same seeded workload (`hat.testbed.load_requests`): --requests arrivals at each rate of
--rates (requests/s), prompts of --prompt-tokens, --rounds verification rounds of 4 positions (3 kept), 5 ms of
emulated device compute per round, SLO targets --ttft-slo-ms and --tbt-slo-ms sent with each OPEN.
Per mode and rate it prints throughput (completed requests/s and kept tokens/s over the makespan), goodput
(requests/s meeting both targets: TTFT, and the mean time between rounds) and attainment, TTFT and TBT medians
and 90th percentiles, and for the disaggregated modes the KV handoffs and their time per prefilled token (from
the router's metrics). Then the batching gain of the middle part (tokens/s of 1-token rounds at batch 16 over
batch 1, `hat.testbed.batching`). --device cuda runs the cloud's workers on a GPU.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

from hat.common.default_model import DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS
from hat.testbed.records import percentile

MODES = {  # name: (disaggregation policy or None for one process, torch threads per process, pipeline stages)
    "all": (None, 1, 1), "all-2t": (None, 2, 1), "always": ("always", 1, 1), "auto": ("auto", 1, 1),
    "pipe2": (None, 1, 2)}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint folder (default: the reference model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu", help="torch device of the cloud's middle part (cpu, cuda)")
    p.add_argument("--modes", default="all,all-2t,always,auto,pipe2", help=f"of {', '.join(MODES)} (default: %(default)s)")
    p.add_argument("--rates", default="3,6", help="arrival rates, requests/s (default: %(default)s)")
    p.add_argument("--requests", type=int, default=32, help="arrivals per mode and rate (default: %(default)s)")
    p.add_argument("--prompt-tokens", default="64,512", help="prompt length range, tokens (default: %(default)s)")
    p.add_argument("--rounds", default="8,24", help="verification rounds per request, range (default: %(default)s)")
    p.add_argument("--ttft-slo-ms", type=int, default=1000, help="time-to-first-token target (default: %(default)s)")
    p.add_argument("--tbt-slo-ms", type=int, default=60, help="mean time-between-rounds target (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


def run_workload(cloud, manifest, hidden_size: int, workload, args) -> list:
    from hat.device.cloud_link import LinkConfig
    from hat.testbed.load_requests import run_request

    config = LinkConfig(host="127.0.0.1", data_port=cloud.data_port, control_port=cloud.control_port,
                        reply_timeout_s=120.0, ttft_slo_ms=args.ttft_slo_ms, tbt_slo_ms=args.tbt_slo_ms)
    records: list = [None] * len(workload)
    started = time.perf_counter()

    def one(i: int) -> None:
        records[i] = run_request(config, manifest, hidden_size, workload[i], f"load{i}-{id(records):x}", started)

    threads = []
    for i, shape in enumerate(workload):
        time.sleep(max(0.0, started + shape.arrival_s - time.perf_counter()))
        threads.append(threading.Thread(target=one, args=(i,), daemon=True))
        threads[-1].start()
    for t in threads:
        t.join(600)
    return records


def summarize(mode: str, rate: float, records: list, args, metrics: dict) -> dict:
    done = [r for r in records if r is not None and not r.error]
    makespan = max(r.finished_s for r in done) - min(r.shape.arrival_s for r in records) if done else float("nan")
    good = [r for r in done if r.meets(args.ttft_slo_ms / 1000, args.tbt_slo_ms / 1000)]
    tokens = sum(1 + r.shape.rounds * r.shape.accepted for r in done)
    ttfts = [r.ttft_s * 1000 for r in done]
    tbts = [r.mean_tbt_s * 1000 for r in done]
    positions = metrics.get("hat_handoff_positions_total", 0)
    return {
        "mode": mode, "rate": rate, "done": len(done), "errors": len(records) - len(done),
        "req_s": len(done) / makespan, "tok_s": tokens / makespan, "goodput": len(good) / makespan,
        "attain": len(good) / len(records), "ttft50": percentile(ttfts, 50),
        "ttft90": percentile(ttfts, 90), "tbt50": percentile(tbts, 50), "tbt90": percentile(tbts, 90), "handoffs": int(metrics.get("hat_handoffs_total", 0)),
        "handoff_us_tok": metrics.get("hat_handoff_seconds_sum", 0) / positions * 1e6 if positions else float("nan"),
        "waits": sum(r.admission_waits for r in done)}


def main(argv=None) -> int:
    args = parse_args(argv)
    from hat.common.bundle import load_manifest
    from hat.common.default_model import reference_model_dir
    from hat.common.model_spec import load_model_spec
    from hat.common.split import split_checkpoint
    from hat.testbed.batching import measure_batching
    from hat.testbed.load_requests import RequestShape, poisson_workload
    from hat.testbed.local_cloud import local_cloud_process, local_disaggregated_cloud

    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    low, high = (int(x) for x in args.prompt_tokens.split(","))
    rounds = tuple(int(x) for x in args.rounds.split(","))
    rows = []
    with tempfile.TemporaryDirectory(prefix="hat-bench-load-") as tmp:
        device_dir, cloud_dir = split_checkpoint(args.model or reference_model_dir(), DEFAULT_INPUT_LAYERS,
                                                 DEFAULT_OUTPUT_LAYERS, Path(tmp) / "bundle", args.dtype)
        manifest = load_manifest(device_dir, part="device")
        hidden_size = load_model_spec(cloud_dir).hidden_size
        for rate in (float(r) for r in args.rates.split(",")):
            workload = poisson_workload(args.requests, rate, args.seed, (low, high), rounds)
            for mode in modes:
                policy, threads, stages = MODES[mode]
                worker_args = ("--device", args.device)
                if policy is None:
                    cloud_context = local_cloud_process(cloud_dir, threads, (
                        *worker_args, "--metrics", "127.0.0.1:0", "--pipeline-stages", str(stages)))
                else:
                    cloud_context = local_disaggregated_cloud(cloud_dir, 1, 1, policy, threads, worker_args)
                log(f"{mode} at {rate:g} requests/s: {len(workload)} requests")
                with cloud_context as cloud:
                    warm = [RequestShape(0.0, 128, 4)]
                    run_workload(cloud, manifest, hidden_size, warm, args)
                    before = scrape(cloud.metrics_url)
                    records = run_workload(cloud, manifest, hidden_size, workload, args)
                    after = scrape(cloud.metrics_url)
                metrics = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                rows.append(summarize(mode, rate, records, args, metrics))
                failed = [r.error for r in records if r is not None and r.error]
                if failed:
                    log(f"{len(failed)} requests failed, e.g. {failed[0]}")
        log("batching gain of the middle part")
        torch.set_num_threads(1)  # as each worker process above
        batching = measure_batching(cloud_dir, args.device, (1, 16), 256, 1, 20)
    print(f"\nemulated devices, Poisson arrivals; prompts {low}-{high} tokens in 128-token chunks, {rounds[0]}-{rounds[1]} "
          f"rounds of 4 positions (3 kept); SLO: TTFT <= {args.ttft_slo_ms} ms, mean TBT <= {args.tbt_slo_ms} ms; "
          f"cloud on {args.device}")
    head = (f"{'mode':<8}{'rate':>5}{'done':>6}{'req/s':>7}{'tok/s':>7}{'goodput':>8}{'attain':>7}{'ttft50':>8}"
            f"{'ttft90':>8}{'tbt50':>7}{'tbt90':>7}{'waits':>6}{'handoffs':>9}{'us/tok':>8}")
    print(head)
    for r in rows:
        print(f"{r['mode']:<8}{r['rate']:>5g}{r['done']:>6}{r['req_s']:>7.2f}{r['tok_s']:>7.1f}{r['goodput']:>8.2f}"
              f"{r['attain']:>7.0%}{r['ttft50']:>8.0f}{r['ttft90']:>8.0f}{r['tbt50']:>7.1f}{r['tbt90']:>7.1f}"
              f"{r['waits']:>6}{r['handoffs']:>9}{r['handoff_us_tok']:>8.1f}")
    print(f"batching gain (middle part, 1-token rounds, 256 cached positions): batch 16 = "
          f"{batching[-1].gain:.2f}x the tokens/s of batch 1 ({batching[-1].tokens_per_s:.0f} vs "
          f"{batching[0].tokens_per_s:.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
