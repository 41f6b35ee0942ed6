#!/usr/bin/env python
"""Batching gain of the cloud's middle part: tokens per second of decode or verification rounds when the
rounds of B sessions run in one forward, against one session at a time, in one run.

Each session holds a --context-token prompt in its cache; a round is --round-tokens new positions (1: plain
decoding; 5: a verification of four draft tokens). For each batch size the same rounds run through
MiddleWorker.run (the cloud's own ragged forward), caches cut back after every round so the context stays
fixed. Prints ms per forward, middle-part tokens/s and the ratio to batch 1; the issue's figure is the
ratio at batch 16. --device cuda runs it on a GPU.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from hat.common.default_model import DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint folder (default: the reference model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu", help="torch device of the middle part (cpu, cuda)")
    p.add_argument("--batches", default="1,2,4,8,16", help="batch sizes (sessions per forward)")
    p.add_argument("--context-tokens", type=int, default=256, help="prompt positions in each session's cache")
    p.add_argument("--round-tokens", type=int, default=1, help="new positions per session per round")
    p.add_argument("--rounds", type=int, default=20, help="timed forwards per batch size")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    from hat.common.default_model import reference_model_dir
    from hat.common.split import split_checkpoint
    from hat.testbed.batching import measure_batching

    torch.set_num_threads(args.threads)
    batches = tuple(int(b) for b in args.batches.split(","))
    with tempfile.TemporaryDirectory(prefix="hat-bench-batch-") as tmp:
        _, cloud_dir = split_checkpoint(args.model or reference_model_dir(), DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS,
                                        Path(tmp) / "bundle", args.dtype)
        rows = measure_batching(cloud_dir, args.device, batches, args.context_tokens, args.round_tokens, args.rounds)
    print(f"middle part of {args.model or 'the reference model'} ({args.dtype}, {args.device}, {args.threads} "
          f"thread(s)); {args.context_tokens} cached positions per session, {args.round_tokens} new per round; "
          f"median of {args.rounds} forwards")
    print(f"{'batch':>6}{'ms/forward':>12}{'tokens/s':>11}{'x batch 1':>11}")
    for row in rows:
        print(f"{row.sessions:>6}{row.seconds * 1000:>12.2f}{row.tokens_per_s:>11.0f}{row.gain:>11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
