#!/usr/bin/env python
"""How long one data-plane decode takes hot (back to back) and cold (right after other work or a sleep).

Explains the decode benchmark's overhead on small VMs: the per-round Python of the data path runs
after several ms of model compute or of waiting, and is then many times slower than in a tight loop.
Usage: python scripts/bench_wire_cold.py [--gap-ms 5] [--rounds 300]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from hat.common import wire
from hat.common.proto import hat_pb2 as pb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gap-ms", type=float, default=5.0, help="other work or sleep before each decode")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    frames = [bytes(f) for f in wire.encode(wire.make_header(pb.FORWARD, "abcdef123456", 5, start=100),
                                            torch.randn(1, args.hidden))]
    a, b = torch.randn(64, 2048), torch.randn(2048, 688)

    def busy() -> None:
        until = time.perf_counter() + args.gap_ms / 1000
        while time.perf_counter() < until:
            a @ b

    gaps = {"none (hot loop)": lambda: None, f"{args.gap_ms:g} ms of matmuls": busy,
            f"{args.gap_ms:g} ms of sleep": lambda: time.sleep(args.gap_ms / 1000)}
    results = {}
    for name, gap in gaps.items():
        samples = []
        for _ in range(args.rounds):
            gap()
            began = time.perf_counter()
            wire.decode(frames)
            samples.append((time.perf_counter() - began) * 1e6)
        results[name] = statistics.median(samples)
    hot = results["none (hot loop)"]
    print(f"wire.decode of a [1, {args.hidden}] float32 FORWARD, median of {args.rounds}:")
    for name, us in results.items():
        print(f"  after {name:<22} {us:8.1f} us   ({us / hot:4.1f}x hot)")


if __name__ == "__main__":
    main()
