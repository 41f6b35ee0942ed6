#!/usr/bin/env python
"""Time to first token of chunked prefill over an emulated link: adaptive chunking against no chunking, every
fixed chunk size of a sweep, and the pipeline's lower bound, for each prompt length and uplink rate.

One run prints one table. Per cell (prompt length x uplink rate) the figures are medians over --repeats
runs of held-out prompts (modes interleaved, in an order that changes per prompt: a Williams design, each mode
runs right after each other mode equally often; so drift of the machine and the order itself hit every mode alike):
  adaptive  the chunk planner's cut (`ChunkingConfig()`), after one warm-up prompt on that link
  none      the whole prompt in one message (--no-chunking)
  best      the fastest fixed size of the sweep (--sizes), and which it was
  bound     the pipeline's lower bound from the stage times measured in the same cell: the busiest of
            device compute (input + output part), uplink (bytes / rate), cloud compute (as the replies
            report it) and downlink, each the least total any mode of the cell measured, plus one round trip
            (not for the device: it can work while the last chunk travels)
  paired    per baseline (none, best fixed), the median over prompts of adaptive's time / the baseline's on the
            same prompt, the larger of the two: a prompt's modes run back to back, so the machine's drift over a
            cell (on a shared VM, the same cut's median moves by 5-20% between modes of a cell) cancels out of
            each ratio; "x min" is the medians' ratio
Targets (issue 5): adaptive <= 1.05 x best fixed and <= 1.15 x bound in every cell; (issue 18) paired <= 1.05 and
the predicted time within 15% of the measured median in every cell, the loopback and cold-start ones included;
the cells that miss are listed. Every run's first token is checked against the unchunked
run's (greedy): chunking is lossless.

The loopback column (--loopback): no emulated link, default torch threads in both processes, nothing pinned: a
device and a cloud on one host, as a new user runs them (their compute shares the cores). The cold-start row
(--cold-tokens): on loopback, each run a fresh cloud process and a fresh device (start-up profiles, the device's
probe), and the first prompt after them, in each mode (adaptive, none and the fixed sizes of --cold-sizes).

The link: a LinkShim process (hat.testbed.link_shim) between device and cloud, the uplink at each rate of
--uplinks, the downlink at --downlink-ratio times it (HAT's Wi-Fi: 5-10 MB/s up, 10-15 down), --rtt-ms
round trip. The cloud is a `hat cloud serve` subprocess; the device is this process. Both run on this
machine's CPUs (the device's compute is this machine's, not a Jetson's); with two CPUs or more the device
is pinned to one and the cloud and the link emulator to the others. The reference model's context is
1024 positions: for longer prompts the benchmark runs a copy whose config allows --max-positions (the
weights are the same; past 1024 positions the text is nonsense, the timing is not).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from hat.common.default_model import DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS

BEST_FIXED_TARGET, BOUND_TARGET, PREDICTION_TARGET = 1.05, 1.15, 0.15
LOOPBACK = 0.0  # the uplink "rate" of the loopback cells (no emulated link)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="store name or checkpoint folder (default: the reference model)")
    p.add_argument("--input-layers", "-K", type=int, default=DEFAULT_INPUT_LAYERS)
    p.add_argument("--output-layers", "-M", type=int, default=DEFAULT_OUTPUT_LAYERS)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="weights and hidden states (default: %(default)s)")
    p.add_argument("--lengths", default="256,1024,2048", help="prompt lengths in tokens (default: %(default)s)")
    p.add_argument("--uplinks", default="1,5,10,50", help="uplink rates, MB/s (default: %(default)s)")
    p.add_argument("--downlink-ratio", type=float, default=1.5, help="downlink rate / uplink rate (default: %(default)s)")
    p.add_argument("--rtt-ms", type=float, default=20.0, help="round-trip propagation delay, ms (default: %(default)s)")
    p.add_argument("--sizes", default="32,64,128,256,512,1024", help="fixed chunk sizes swept (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="prompts per cell (default: %(default)s)")
    p.add_argument("--max-positions", type=int, default=4096,
                   help="context of the model copy used when a prompt is longer than the model's (default: %(default)s)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="torch threads, device and cloud each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-pin", action="store_true", help="do not pin the device to one CPU and the cloud and link emulator to another")
    p.add_argument("--no-loopback", dest="loopback", action="store_false",
                   help="leave out the loopback column (device and cloud on one host, default threads, no link)")
    p.add_argument("--cold-tokens", type=int, default=839,
                   help="prompt length of the cold-start row, 0 to leave it out (default: %(default)s)")
    p.add_argument("--cold-sizes", default="128,256", help="fixed chunk sizes of the cold-start row (default: %(default)s)")
    p.add_argument("--json", type=Path, help="write every cell's figures to this file")
    return p.parse_args(argv)


def long_context_copy(model_dir: Path, positions: int, out: Path) -> Path:
    """A copy of the checkpoint whose config allows `positions` (same weights, same tokenizer)."""
    out.mkdir(parents=True)
    for item in model_dir.iterdir():
        if item.is_file():
            shutil.copy2(item, out / item.name)
    config = json.loads((out / "config.json").read_text())
    config["max_position_embeddings"] = positions
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def heldout_prompt(tokenizer, length: int, index: int) -> list[int]:
    """`length` tokens of held-out text: held-out files joined, read from an offset that differs per index."""
    from hat.common.reference_corpus import heldout_files

    text = "".join(f.read() for f in heldout_files())
    ids = tokenizer(text[index * 5003 % (len(text) // 2):])["input_ids"]
    if len(ids) < length:
        raise SystemExit(f"the held-out text has {len(ids)} tokens, fewer than a {length}-token prompt needs")
    return ids[:length]


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


def stage_bound(results: dict[str, list], up_rate: float, down_rate: float, rtt_s: float) -> float:
    """The lower bound in ms: per stage, the least total any mode measured over the prompt (median over its runs);
    the busiest stage's, plus one round trip unless it is the device's (as `prefill_lower_bound`)."""
    def least(measure) -> float:
        return min(median([measure(r) for r in runs]) for runs in results.values())

    device = least(lambda r: sum(s.device_ms for s in r.steps if not s.decode))
    cloud = least(lambda r: sum(s.cloud_compute_ms for s in r.steps if not s.decode))
    up = least(lambda r: r.bytes_up) / up_rate * 1000
    down = least(lambda r: r.bytes_down) / down_rate * 1000
    return max(device, max(cloud, up, down) + rtt_s * 1000)


def main(argv=None) -> int:
    args = parse_args(argv)
    from hat.common.default_model import reference_model_dir
    from hat.common.sampling import SamplingParams
    from hat.common.split import split_checkpoint
    from hat.device.cloud_link import CloudLink, LinkConfig
    from hat.device.device_model import DeviceModel
    from hat.device.generator import SplitGenerator
    from hat.testbed.link_shim import LinkProfile, LinkShim
    from hat.testbed.local_cloud import local_cloud_process

    torch.set_num_threads(args.threads)
    lengths = [int(v) for v in args.lengths.split(",") if v]
    uplinks = [float(v) for v in args.uplinks.split(",") if v]
    sizes = [int(v) for v in args.sizes.split(",")]
    from hat.common.model_store import resolve_model

    model_dir = resolve_model(args.model, pull_missing=True) if args.model else reference_model_dir()
    greedy = SamplingParams()
    cells: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="hat-bench-chunk-") as tmp:
        context = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
        if max(lengths + [args.cold_tokens]) >= context:
            log(f"the model's context is {context}: using a copy allowing {args.max_positions} positions")
            model_dir = long_context_copy(model_dir, args.max_positions, Path(tmp) / "model")
        device_dir, cloud_dir = split_checkpoint(model_dir, args.input_layers, args.output_layers, Path(tmp) / "bundle",
                                                 args.dtype)
        model = DeviceModel.load(device_dir)
        model.adapter = None  # prefill only: the draft adapter's cache would add device time to every mode alike
        prompts = {n: [heldout_prompt(model.tokenizer, n, i) for i in range(args.repeats + 1)] for n in lengths}
        cpus = sorted(os.sched_getaffinity(0))
        pin = not args.no_pin and len(cpus) >= 2
        if pin:  # children inherit this: the cloud and the link emulator share the CPUs the device does not use
            os.sched_setaffinity(0, cpus[1:])
        with local_cloud_process(cloud_dir, args.threads) as cloud:
            for uplink in uplinks:
                profile = LinkProfile(uplink * 1e6, uplink * args.downlink_ratio * 1e6, args.rtt_ms / 1000)
                with LinkShim(f"tcp://127.0.0.1:{cloud.data_port}", profile) as shim:
                    if pin:
                        os.sched_setaffinity(0, cpus[:1])
                    config = LinkConfig(host="127.0.0.1", data_port=shim.port, control_port=cloud.control_port,
                                        device_id=f"bench-chunking-{uplink:g}")
                    with CloudLink(config) as link:
                        link.register(model.manifest)
                        generator = SplitGenerator(model, link)
                        generator.probe()
                        for length in lengths:
                            cells.append(run_cell(generator, prompts[length], length, uplink, profile, sizes, greedy))
                    if pin:
                        os.sched_setaffinity(0, cpus[1:])
        os.sched_setaffinity(0, cpus)  # the loopback cells: nothing pinned, default threads, no emulated link
        torch.set_num_threads(len(cpus))
        loopback = LinkProfile(1e12, 1e12, 0.0)
        if args.loopback:
            with local_cloud_process(cloud_dir, 0) as cloud, CloudLink(LinkConfig(
                    host="127.0.0.1", data_port=cloud.data_port, control_port=cloud.control_port,
                    device_id="bench-chunking-loopback")) as link:
                link.register(model.manifest)
                generator = SplitGenerator(model, link)
                generator.probe()
                for length in lengths:
                    cells.append(run_cell(generator, prompts[length], length, LOOPBACK, loopback, sizes, greedy))
        if args.cold_tokens:
            cold_prompts = [heldout_prompt(model.tokenizer, args.cold_tokens, 100 + i) for i in range(args.repeats)]
            cold_sizes = [int(v) for v in args.cold_sizes.split(",") if v]
            cells.append(cold_cell(cloud_dir, model, cold_prompts, cold_sizes, greedy, loopback))
    report(args, cells)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "cells": cells}, indent=1))
    return 0


def chunking_modes(sizes: list[int], length: int) -> dict:
    from hat.device.chunk_planner import ChunkingConfig

    modes = {"adaptive": ChunkingConfig(), "none": ChunkingConfig(enabled=False)}
    modes.update({f"fixed {s}": ChunkingConfig(fixed_size=s) for s in sizes if s < length})
    return modes


def balanced_order(modes: dict, index: int) -> list[str]:
    """The modes' names in the order prompt `index` runs them: rows of a Williams design, so that over the cell every
    mode runs right after every other mode equally often (over n prompts for n modes, 2n when n is odd) and at every
    place in the order; a plain rotation would keep each mode's predecessor the same on every prompt."""
    names, n = list(modes), len(modes)
    first = [0] + [(k + 1) // 2 if k % 2 else n - k // 2 for k in range(1, n)]  # 0, 1, n-1, 2, n-2, ...
    shift, mirrored = (index // 2, index % 2 == 1) if n % 2 else (index, False)
    row = [names[(x + shift) % n] for x in first]
    return row[::-1] if mirrored else row


def run_cell(generator, prompts: list[list[int]], length: int, uplink: float, profile, sizes: list[int],
             greedy) -> dict:
    modes = chunking_modes(sizes, length)
    generator.prefill.config = modes["adaptive"]
    generator.generate_ids(prompts[0], 1, greedy)  # warm-up: the link estimator learns this link
    results: dict[str, list] = {name: [] for name in modes}
    for index, prompt in enumerate(prompts[1:]):
        for name in balanced_order(modes, index):
            generator.prefill.config = modes[name]
            results[name].append(generator.generate_ids(prompt, 1, greedy))
        check_lossless(results, length, uplink)
    return summarize(results, length, uplink, profile)


def cold_cell(cloud_dir, model, prompts: list[list[int]], sizes: list[int], greedy, profile) -> dict:
    """The first prompt after start-up, on loopback: per run and mode a fresh cloud process and a fresh device
    (profiles and probe), modes interleaved."""
    from hat.device.cloud_link import CloudLink, LinkConfig
    from hat.device.generator import SplitGenerator
    from hat.testbed.local_cloud import local_cloud_process

    length = len(prompts[0])
    modes = chunking_modes(sizes, length)
    results: dict[str, list] = {name: [] for name in modes}
    for index, prompt in enumerate(prompts):
        for name in balanced_order(modes, index):
            config = modes[name]
            with local_cloud_process(cloud_dir, 0) as cloud, CloudLink(LinkConfig(
                    host="127.0.0.1", data_port=cloud.data_port, control_port=cloud.control_port,
                    device_id=f"bench-chunking-cold-{index}")) as link:
                link.register(model.manifest)
                generator = SplitGenerator(model, link, chunking=config)
                generator.probe()
                results[name].append(generator.generate_ids(prompt, 1, greedy))
        check_lossless(results, length, LOOPBACK)
    cell = summarize(results, length, LOOPBACK, profile)
    cell["cold"] = True
    return cell


def link_name(uplink: float) -> str:
    return "loopback" if uplink == LOOPBACK else f"{uplink:g} MB/s"


def check_lossless(results: dict[str, list], length: int, uplink: float) -> None:
    reference = results["none"][-1].token_ids
    for name in results:
        if results[name][-1].token_ids != reference:
            raise SystemExit(f"{length} tokens over {link_name(uplink)}: {name} gave a different first token")


def paired_ratio(adaptive: list[float], baselines: list[list[float]]) -> float:
    """The largest, over the baselines, of the median over prompts of adaptive's time / that baseline's time on the
    same prompt. Each prompt's modes ran back to back, so the machine's drift over the cell cancels out of every
    ratio; and adaptive <= r x min(baselines) is adaptive <= r x each baseline, judged one baseline at a time: a
    per-prompt least of two noisy baselines would be biased low (the least of two draws of one time is below both)."""
    if not adaptive or any(len(b) != len(adaptive) for b in baselines):
        raise ValueError("a paired ratio needs every mode timed on the same prompts")
    return max(median([a / b[i] for i, a in enumerate(adaptive)]) for b in baselines)


def summarize(results: dict[str, list], length: int, uplink: float, profile) -> dict:
    per_prompt = {name: [r.ttft_ms for r in runs] for name, runs in results.items()}
    ttft = {name: median(times) for name, times in per_prompt.items()}
    fixed = {name: t for name, t in ttft.items() if name.startswith("fixed")}
    best_name = min(fixed, key=fixed.get) if fixed else "none"
    best = fixed.get(best_name, ttft["none"])  # the fastest fixed size's time, as its label says ("x min" adds none)
    baselines = [per_prompt["none"]] + ([per_prompt[best_name]] if best_name != "none" else [])
    bound = stage_bound(results, profile.uplink_bytes_per_s, profile.downlink_bytes_per_s, profile.rtt_s)
    last = results["adaptive"][-1]
    cell = {"tokens": length, "uplink_mbps": uplink, "adaptive_ms": ttft["adaptive"], "none_ms": ttft["none"],
            "best_fixed_ms": best, "best_fixed": best_name, "bound_ms": bound, "ttft_ms": ttft,
            "paired_vs_min": paired_ratio(per_prompt["adaptive"], baselines),
            "paired_vs_none": paired_ratio(per_prompt["adaptive"], [per_prompt["none"]]),
            "adaptive_predicted_ms": median([r.ttft_predicted_ms for r in results["adaptive"]]),
            "runs_ms": per_prompt,  # every run's time, per mode in prompt order (the medians' raw material)
            "predicted_runs_ms": {name: [r.ttft_predicted_ms for r in runs] for name, runs in results.items()},
            "adaptive_cuts": [list(r.chunks) for r in results["adaptive"]],
            "adaptive_chunks": last.chunks, "replans": sum(r.replans for r in results["adaptive"]),
            "plan_ms": median([r.plan_ms for r in results["adaptive"]])}
    log(f"{length:>5} tokens over {link_name(uplink)}: adaptive {ttft['adaptive']:.0f} ms (predicted "
        f"{cell['adaptive_predicted_ms']:.0f}, {len(last.chunks)} chunks), none {ttft['none']:.0f}, best fixed "
        f"{best:.0f} ({best_name}), bound {bound:.0f}")
    return cell


def report(args, cells: list[dict]) -> None:
    print(f"\nTime to first token (ms, median of {args.repeats} held-out prompts), {args.model or 'reference'} model "
          f"K={args.input_layers} M={args.output_layers} {args.dtype}, downlink {args.downlink_ratio:g} x uplink, "
          f"{args.rtt_ms:g} ms RTT; loopback: no emulated link, default threads, nothing pinned; cold: the first "
          f"prompt after a fresh start (loopback)")
    header = (f"{'tokens':>7}{'link':>10}{'adaptive':>10}{'predicted':>10}{'pred err':>9}{'none':>8}"
              f"{'best fixed':>11}{'(size)':>8}{'bound':>8}{'x best':>8}{'x min':>7}{'paired':>8}{'x bound':>8}"
              f"{'x none':>8}{'chunks':>8}")
    print(header)
    print("-" * len(header))
    misses = []
    for c in cells:
        vs_best, vs_bound = c["adaptive_ms"] / c["best_fixed_ms"], c["adaptive_ms"] / c["bound_ms"]
        vs_min = c["adaptive_ms"] / min(c["best_fixed_ms"], c["none_ms"])
        error = c["adaptive_predicted_ms"] / c["adaptive_ms"] - 1
        cold = "cold " if c.get("cold") else ""
        link = cold + ("loopback" if c["uplink_mbps"] == LOOPBACK else f"{c['uplink_mbps']:g}")  # the table's column
        where = f"{c['tokens']} tokens over {cold}{link_name(c['uplink_mbps'])}"
        print(f"{c['tokens']:>7}{link:>10}{c['adaptive_ms']:>10.0f}{c['adaptive_predicted_ms']:>10.0f}{error:>+9.0%}"
              f"{c['none_ms']:>8.0f}{c['best_fixed_ms']:>11.0f}{c['best_fixed'].replace('fixed ', ''):>8}"
              f"{c['bound_ms']:>8.0f}{vs_best:>8.2f}{vs_min:>7.2f}{c['paired_vs_min']:>8.2f}{vs_bound:>8.2f}"
              f"{c['adaptive_ms'] / c['none_ms']:>8.2f}{len(c['adaptive_chunks']):>8}")
        if c["paired_vs_min"] > BEST_FIXED_TARGET or abs(error) > PREDICTION_TARGET:
            misses.append(f"{where}: {c['paired_vs_min']:.2f} x min(none, best fixed) paired, prediction {error:+.0%}")
        elif vs_bound > BOUND_TARGET and c["uplink_mbps"] != LOOPBACK:
            misses.append(f"{where}: {vs_bound:.2f} x bound (issue 5's target only)")
    print(f"\nx min: the medians' ratio; paired: per baseline (none, best fixed), the median over prompts of "
          f"adaptive / baseline on the same prompt, the larger.\nTargets: paired <= {BEST_FIXED_TARGET} and the "
          f"prediction within {PREDICTION_TARGET:.0%} of the measured median in every cell (issue 18); "
          f"<= {BOUND_TARGET} x bound (issue 5, emulated links).")
    print("Cells that miss: " + ("none" if not misses else "\n  " + "\n  ".join(misses)))


if __name__ == "__main__":
    sys.exit(main())
