#!/usr/bin/env python
"""Why `common/layers.py` calls scaled_dot_product_attention with a leading batch axis and, for a span from
position 0, with is_causal instead of a mask: this times both ways of calling it on this machine.

For the reference model's attention shape (8 query heads, 4 key/value heads, head size 32; override with
flags) it prints, per case, milliseconds per call for 3-D inputs with a boolean mask (how the runtime called
it before), 4-D inputs with the same mask, and for a whole prompt 4-D with is_causal, and the ratios.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def per_call_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - began) / repeats * 1000)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gqa = args.kv_heads != args.heads
    print(f"scaled_dot_product_attention, {args.heads} heads ({args.kv_heads} kv), head size {args.head_dim}, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print(f"{'case':<34}{'3-D mask':>10}{'4-D mask':>10}{'4-D causal':>12}{'3-D/4-D':>9}")
    for queries, start in ((1024, 0), (2048, 0), (256, 768), (128, 1920)):
        end = start + queries
        q = torch.randn(args.heads, queries, args.head_dim)
        k = torch.randn(args.kv_heads, end, args.head_dim)
        v = torch.randn(args.kv_heads, end, args.head_dim)
        mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
        three = per_call_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa),
                            args.repeats)
        four = per_call_ms(lambda: F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask,
                                                                  enable_gqa=gqa), args.repeats)
        fastest = four
        causal = ""
        if start == 0:
            c = per_call_ms(lambda: F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True,
                                                                   enable_gqa=gqa), args.repeats)
            fastest, causal = min(four, c), f"{c:.1f}"
        name = f"{queries} queries after {start} cached"
        print(f"{name:<34}{three:>10.1f}{four:>10.1f}{causal:>12}{three / fastest:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
