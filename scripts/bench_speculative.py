#!/usr/bin/env python
"""Speculative versus plain split decoding over an emulated link, on the reference model and held-out prompts.

One run prints, per decoding mode (plain split decoding; then for each draft threshold: speculative,
drafting only before each round, and speculative with parallel drafting while a verification is in
flight):
  mean accepted length per round (the corrected or bonus token included), time between tokens (TBT:
  (time of the last token - time of the first) / (tokens - 1), median over prompts), its ratio to plain
  decoding's (the median over prompts of the ratio to plain decoding of the same prompt, run just before), and where a round's time goes (drafting, the round
  trip, verification on the device), plus wasted draft tokens.

The link: a LinkShim process (hat.testbed.link_shim) between the device and the cloud's data port,
10 MB/s up, 15 MB/s down, 20 ms round trip by default. The cloud is a `hat cloud serve` subprocess; the
device is this process. Both use --threads torch threads on this machine (the device's compute is this
machine's, not a Jetson's); with two CPUs or more the device is pinned to one and the cloud and the
link emulator to the others, so the device's drafting cannot slow the "remote" cloud (--no-pin
to share). Greedy by default; every speculative output is checked token for token
against plain decoding's (lossless), and the run fails if one differs.

Targets (issue 4): accepted length >= 3.0 per round, TBT <= 0.5 x plain split decoding.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from hat.common.default_model import DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS

ACCEPT_TARGET, TBT_RATIO_TARGET = 3.0, 0.5


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint folder (default: the reference model)")
    p.add_argument("--adapter", type=Path, help="adapter folder (default: the checkpoint's own for the split)")
    p.add_argument("--input-layers", "-K", type=int, default=DEFAULT_INPUT_LAYERS)
    p.add_argument("--output-layers", "-M", type=int, default=DEFAULT_OUTPUT_LAYERS)
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts")
    p.add_argument("--prompt-tokens", type=int, default=96, help="tokens per prompt")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--uplink-mbps", type=float, default=10.0, help="uplink, MB/s")
    p.add_argument("--downlink-mbps", type=float, default=15.0, help="downlink, MB/s")
    p.add_argument("--rtt-ms", type=float, default=20.0, help="round-trip propagation delay, ms")
    p.add_argument("--thresholds", default="0.6,0.4",
                   help="comma-separated draft thresholds (--draft-length threshold), each run with and without parallel drafting, after the cost-chosen lengths (default: %(default)s; "
                        "0.6 is the library's default)")
    p.add_argument("--max-draft", type=int, default=None, help="most draft tokens per round (default: SpeculationConfig's)")
    p.add_argument("--draft-vocab", type=int, default=0,
                   help="draft over this many most frequent tokens (the adapter's frequency table); 0 = all")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (outputs checked against plain decoding)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="torch threads, device and cloud each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-pin", action="store_true",
                   help="do not pin the device to one CPU and the cloud and link emulator to another")
    p.add_argument("--json", type=Path, help="write the figures to this file")
    return p.parse_args(argv)


def heldout_prompts(tokenizer, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` prompts of `length` tokens from held-out files, each starting at a line start."""
    from hat.common.reference_corpus import heldout_files

    rng = random.Random(seed)
    texts = [f.read() for f in heldout_files()]
    texts = [t for t in texts if len(t) > 8 * length]
    prompts = []
    while len(prompts) < count:
        text = rng.choice(texts)
        start = text.rfind("\n", 0, rng.randrange(len(text) // 2)) + 1
        ids = tokenizer(text[start:])["input_ids"][:length]
        if len(ids) == length:
            prompts.append(ids)
    return prompts


def mean_tbt(result) -> float:
    return statistics.fmean(result.tbt_ms) if result.tbt_ms else float("nan")


def summarize(results: list, plain: list) -> dict:
    """Figures of one mode; TBT as the median over prompts (one slow prompt on a noisy VM moves a mean a lot),
    its ratio as the median of per-prompt ratios to plain decoding of the same prompt, run just before it."""
    rounds = [s for r in results for s in r.decode_rounds]
    return {
        "tbt_ms": statistics.median(mean_tbt(r) for r in results),
        "tbt_ms_mean": statistics.fmean(mean_tbt(r) for r in results),
        "tbt_ratio": statistics.median(mean_tbt(r) / mean_tbt(p) for r, p in zip(results, plain)),
        "ttft_ms": statistics.fmean(r.ttft_ms for r in results),
        "accept_len": sum(s.accepted + 1 for s in rounds) / len(rounds),
        "rounds": len(rounds),
        "draft_ms_per_round": statistics.fmean(s.draft_ms for s in rounds),
        "round_ms": statistics.fmean(s.round_ms for s in rounds),
        "cloud_ms": statistics.fmean(s.cloud_compute_ms for s in rounds),
        "verify_ms": statistics.fmean(s.device_ms for s in rounds),
        "drafted_per_round": statistics.fmean(s.drafted for s in rounds),
        "wasted_draft_tokens": sum(r.to_json()["wasted_draft_tokens"] for r in results),
        "predraft_reused_tokens": sum(s.predraft_reused for s in rounds),
        "bytes_up_per_token": sum(r.bytes_up for r in results) / sum(len(r.token_ids) for r in results),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    from hat.common.default_model import reference_model_dir
    from hat.common.sampling import SamplingParams
    from hat.common.split import split_checkpoint
    from hat.device.cloud_link import CloudLink, LinkConfig
    from hat.device.device_model import DeviceModel
    from hat.device.speculation import SpeculationConfig
    from hat.device.generator import SplitGenerator
    from hat.testbed.link_shim import LinkProfile, LinkShim
    from hat.testbed.local_cloud import local_cloud_process

    torch.set_num_threads(args.threads)
    model_dir = args.model or reference_model_dir()
    profile = LinkProfile(args.uplink_mbps * 1e6, args.downlink_mbps * 1e6, args.rtt_ms / 1000)
    base = SpeculationConfig()
    max_draft = base.max_draft if args.max_draft is None else args.max_draft
    modes: dict = {"plain": None}
    for parallel in (False, True):  # lengths chosen from measured costs (the default)
        modes["spec cost" + (" +parallel" if parallel else "")] = SpeculationConfig(
            max_draft=max_draft, parallel=parallel, draft_vocab=args.draft_vocab)
    for threshold in (float(t) for t in args.thresholds.split(",") if t):
        for parallel in (False, True):
            name = f"spec t={threshold:g}" + (" +parallel" if parallel else "")
            modes[name] = SpeculationConfig(threshold=threshold, max_draft=max_draft, parallel=parallel,
                                            length="threshold", draft_vocab=args.draft_vocab)
    sampling = SamplingParams(args.temperature, 1.0, args.seed)
    log(f"model {model_dir}, K={args.input_layers} M={args.output_layers}; link up {args.uplink_mbps} MB/s, down "
        f"{args.downlink_mbps} MB/s, rtt {args.rtt_ms} ms; {args.prompts} held-out prompts of {args.prompt_tokens} "
        f"tokens, {args.tokens} new tokens; {args.threads} threads each for device and cloud")
    with tempfile.TemporaryDirectory(prefix="hat-bench-spec-") as tmp:
        device_dir, cloud_dir = split_checkpoint(model_dir, args.input_layers, args.output_layers, Path(tmp) / "bundle",
                                                 "float32", args.adapter)
        model = DeviceModel.load(device_dir)
        if model.adapter is None:
            raise SystemExit("the device bundle has no adapter: pass --adapter or train one with `hat train-adapter`")
        model.stop_ids = ()  # every generation runs its full length
        prompts = heldout_prompts(model.tokenizer, args.prompts, args.prompt_tokens, args.seed)
        cpus = sorted(os.sched_getaffinity(0))
        pin = not args.no_pin and len(cpus) >= 2
        if pin:  # children inherit this: the cloud and the link emulator (every thread of theirs) share one CPU
            os.sched_setaffinity(0, cpus[1:])
        with local_cloud_process(cloud_dir, args.threads) as cloud, \
                LinkShim(f"tcp://127.0.0.1:{cloud.data_port}", profile) as shim:
            if pin:  # the device (this process) gets the other: drafting never slows the "remote" cloud
                os.sched_setaffinity(0, cpus[:1])
                log(f"device pinned to CPU {cpus[0]}, cloud and link emulator to CPUs {cpus[1:]}")
            link_config = LinkConfig(host="127.0.0.1", data_port=shim.port, control_port=cloud.control_port,
                                     device_id="bench-speculative")
            with CloudLink(link_config) as link:
                link.register(model.manifest)
                generator = SplitGenerator(model, link)
                log("warm-up")
                for speculation in modes.values():
                    generator.speculation = speculation
                    generator.generate_ids(prompts[0][:32], 16, sampling)
                results: dict[str, list] = {name: [] for name in modes}
                for i, prompt in enumerate(prompts):
                    for name, speculation in modes.items():  # interleaved: drift of the machine hits every mode alike
                        generator.speculation = speculation
                        results[name].append(generator.generate_ids(prompt, args.tokens, sampling))
                    if sampling.greedy:
                        for name in modes:
                            if results[name][-1].token_ids != results["plain"][-1].token_ids:
                                raise SystemExit(f"prompt {i}: {name} output differs from plain decoding: not lossless")
                    log(f"prompt {i + 1}/{len(prompts)}: " + ", ".join(
                        f"{name} TBT {mean_tbt(results[name][-1]):.1f} ms" for name in modes))
    figures = {name: summarize(runs, results["plain"]) for name, runs in results.items()}
    report(args, figures)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "figures": figures}, indent=1))
    return 0


def report(args, figures: dict) -> None:
    print(f"\nSpeculative decoding, reference model K={args.input_layers} M={args.output_layers}, link "
          f"{args.uplink_mbps:g}/{args.downlink_mbps:g} MB/s up/down, {args.rtt_ms:g} ms RTT, "
          f"{'greedy' if args.temperature == 0 else f'temperature {args.temperature}'}, {args.prompts} held-out prompts "
          f"x {args.tokens} tokens")
    header = (f"{'mode':<24}{'accept len':>11}{'TBT ms':>9}{'mean':>7}{'x plain':>9}{'TTFT ms':>9}{'draft ms':>10}{'round ms':>10}"
              f"{'cloud ms':>10}{'verify ms':>10}{'drafted':>9}{'wasted':>8}{'reused':>8}")
    print(header)
    print("-" * len(header))
    for name, f in figures.items():
        print(f"{name:<24}{f['accept_len']:>11.2f}{f['tbt_ms']:>9.1f}{f['tbt_ms_mean']:>7.1f}{f['tbt_ratio']:>9.2f}{f['ttft_ms']:>9.0f}"
              f"{f['draft_ms_per_round']:>10.1f}{f['round_ms']:>10.1f}{f['cloud_ms']:>10.1f}{f['verify_ms']:>10.1f}"
              f"{f['drafted_per_round']:>9.2f}{f['wasted_draft_tokens']:>8}{f['predraft_reused_tokens']:>8}")
    print("\n(TBT ms: median over prompts, mean: their mean; x plain: median of per-prompt ratios; draft, round, cloud "
          "and verify ms are per decode round; drafted = draft tokens per round; wasted = drafted "
          "and never accepted; reused = tokens drafted during a round and kept)")
    for name, f in figures.items():
        if name != "plain":
            print(f"{name}: accepted length {f['accept_len']:.2f} (target >= {ACCEPT_TARGET}: "
                  f"{'met' if f['accept_len'] >= ACCEPT_TARGET else 'missed'}), TBT {f['tbt_ratio']:.2f} x plain (target <= "
                  f"{TBT_RATIO_TARGET}: {'met' if f['tbt_ratio'] <= TBT_RATIO_TARGET else 'missed'})")


if __name__ == "__main__":
    sys.exit(main())
