#!/usr/bin/env python
"""Speculative versus plain split decoding, per prompt category, over an emulated link and over loopback.

    python scripts/bench_speculative.py [--model smollm2-135m-instruct] [--per-category 2] [--tokens 96]
        [--temperatures 0,0.7] [--links emulated,loopback] [--draft-vocab N] [--json FILE]

Prompts (`--prompts-from specbench`, the default): MT-Bench first turns (one row per MT-Bench category) and
HumanEval prompts (row "humaneval"), each a user turn in the model's chat template, --per-category of each in a
seeded order (prompts over --max-prompt-tokens are passed over); `--prompts-from heldout`: the reference corpus's
held-out files, cut to --prompt-tokens (row "heldout"). Generation stops at the model's end of turn or after
--tokens tokens. Evaluation sets only: none of these prompts is in the adapter's training data.

Per link and temperature, every prompt runs in every mode, interleaved (plain split decoding just before the
speculative modes, so drift hits all alike): "plain"; "spec", the library's defaults (draft lengths chosen from
measured costs, parallel drafting guarded); then for each --thresholds value, threshold lengths. Columns:
accepted length per round (bonus token included), time between tokens (TBT: (last token - first) / (tokens - 1),
median over prompts), x plain (median of per-prompt ratios to plain decoding of the same prompt), draft ms per
round, and draft tokens wasted (drafted, never accepted) per generated token. Greedy outputs are checked token for
token against plain decoding's (lossless); the run fails if one differs.

Links: "emulated" puts a LinkShim (hat.testbed.link_shim) between the device and the cloud's data port, 10 MB/s
up, 15 MB/s down, 20 ms round trip by default; "loopback" connects them directly. The cloud is a `hat cloud
serve` subprocess; the device is this process, both with --threads torch threads, float32. With two CPUs or
more the device is pinned to one and the cloud and link emulator to the others (--no-pin to share).

Targets (issue 19): accepted length >= 2.5 on MT-Bench first turns, greedy; TBT <= 0.6 x plain over the emulated
link; on no category and no link is speculative TBT more than 5% worse than plain (x plain <= 1.05).
"""
from __future__ import annotations

import argparse
import contextlib
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

ACCEPT_TARGET, TBT_RATIO_TARGET, WORST_RATIO = 2.5, 0.6, 1.05
LINKS = ("emulated", "loopback")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="store name or checkpoint folder (default: the default model)")
    p.add_argument("--adapter", type=Path, help="adapter folder (default: the checkpoint's own for the split)")
    p.add_argument("--input-layers", "-K", type=int, default=DEFAULT_INPUT_LAYERS)
    p.add_argument("--output-layers", "-M", type=int, default=DEFAULT_OUTPUT_LAYERS)
    p.add_argument("--prompts-from", choices=("specbench", "heldout"), default="specbench",
                   help="MT-Bench first turns + HumanEval, per category (default), or held-out corpus files")
    p.add_argument("--per-category", type=int, default=2, help="prompts per category (specbench)")
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts (heldout)")
    p.add_argument("--prompt-tokens", type=int, default=96, help="tokens per held-out prompt (heldout)")
    p.add_argument("--max-prompt-tokens", type=int, default=1024, help="longer prompts are passed over (specbench)")
    p.add_argument("--tokens", type=int, default=96, help="most tokens generated per prompt")
    p.add_argument("--temperatures", default="0", help="comma-separated sampling temperatures (0 = greedy, checked "
                                                       "against plain decoding); e.g. 0,0.7")
    p.add_argument("--links", default="emulated", help=f"comma-separated, of {', '.join(LINKS)}")
    p.add_argument("--uplink-mbps", type=float, default=10.0, help="emulated uplink, MB/s")
    p.add_argument("--downlink-mbps", type=float, default=15.0, help="emulated downlink, MB/s")
    p.add_argument("--rtt-ms", type=float, default=20.0, help="emulated round-trip propagation delay, ms")
    p.add_argument("--thresholds", default="",
                   help="comma-separated draft thresholds, each an extra mode with --draft-length threshold "
                        "(default: none; 0.6 is the library's default threshold)")
    p.add_argument("--no-parallel", action="store_true", help="the spec modes draft only before each round")
    p.add_argument("--max-draft", type=int, default=None, help="most draft tokens per round (default: SpeculationConfig's)")
    p.add_argument("--draft-vocab", type=int, default=0,
                   help="draft over this many most frequent tokens (the adapter's frequency table); 0 = all")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="torch threads, device and cloud each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-pin", action="store_true",
                   help="do not pin the device to one CPU and the cloud and link emulator to another")
    p.add_argument("--json", type=Path, help="write the figures to this file")
    args = p.parse_args(argv)
    args.temperature_list = [float(t) for t in args.temperatures.split(",") if t.strip()]
    args.link_list = [name.strip() for name in args.links.split(",") if name.strip()]
    if not args.temperature_list or any(t < 0 for t in args.temperature_list):
        p.error(f"--temperatures {args.temperatures!r}: give one or more temperatures >= 0")
    if not args.link_list or any(name not in LINKS for name in args.link_list):
        p.error(f"--links {args.links!r}: give one or more of {', '.join(LINKS)}")
    return args


def heldout_prompts(tokenizer, count: int, length: int, seed: int) -> list[tuple[str, list[int]]]:
    """`count` ("heldout", prompt) of `length` tokens from held-out files, each starting at a line start."""
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
            prompts.append(("heldout", ids))
    return prompts


def specbench_prompts(tokenizer, per_category: int, max_tokens: int, seed: int) -> list[tuple[str, list[int]]]:
    """(category, prompt ids): `per_category` MT-Bench first turns of each MT-Bench category and HumanEval
    prompts, in the chat template, seeded, categories interleaved; prompts over `max_tokens` are passed over."""
    from hat.common.datasets import humaneval_prompts, mt_bench_questions
    from hat.testbed.prompt_sets import chat_prompt_ids

    rng = random.Random(seed)
    pools: dict[str, list[str]] = {}
    for q in mt_bench_questions():
        pools.setdefault(q.category, []).append(q.turns[0])
    pools["humaneval"] = [q.turns[0] for q in humaneval_prompts()]
    chosen: dict[str, list[list[int]]] = {}
    for category, texts in pools.items():
        rng.shuffle(texts)
        ids = (chat_prompt_ids(tokenizer, t) for t in texts)
        chosen[category] = [p for p in ids if len(p) <= max_tokens][:per_category]
    return [(c, chosen[c][i]) for i in range(per_category) for c in chosen if i < len(chosen[c])]


def mean_tbt(result) -> float:
    return statistics.fmean(result.tbt_ms) if result.tbt_ms else float("nan")


def summarize(results: list, plain: list) -> dict:
    """Figures of one mode over some prompts; TBT as the median over prompts (one slow prompt on a noisy VM moves a
    mean a lot), its ratio as the median of per-prompt ratios to plain decoding of the same prompt, run just before."""
    pairs = [(r, p) for r, p in zip(results, plain) if r.tbt_ms and p.tbt_ms]  # one-token answers have no TBT
    rounds = [s for r in results for s in r.decode_rounds]
    tokens = sum(len(r.token_ids) for r in results)
    return {
        "prompts": len(results),
        "tbt_ms": statistics.median(mean_tbt(r) for r, _ in pairs) if pairs else float("nan"),
        "tbt_ratio": statistics.median(mean_tbt(r) / mean_tbt(p) for r, p in pairs) if pairs else float("nan"),
        "ttft_ms": statistics.fmean(r.ttft_ms for r in results),
        "accept_len": sum(s.accepted + 1 for s in rounds) / len(rounds) if rounds else float("nan"),
        "rounds": len(rounds),
        "draft_ms_per_round": statistics.fmean(s.draft_ms for s in rounds) if rounds else 0.0,
        "round_ms": statistics.fmean(s.round_ms for s in rounds) if rounds else 0.0,
        "cloud_ms": statistics.fmean(s.cloud_compute_ms for s in rounds) if rounds else 0.0,
        "drafted_per_round": statistics.fmean(s.drafted for s in rounds) if rounds else 0.0,
        "wasted_draft_tokens": sum(r.to_json()["wasted_draft_tokens"] for r in results),
        "wasted_per_token": sum(r.to_json()["wasted_draft_tokens"] for r in results) / max(1, tokens),
        "tokens": tokens,
    }


def modes_for(args) -> dict:
    from hat.device.speculation import SpeculationConfig

    base = SpeculationConfig()
    max_draft = base.max_draft if args.max_draft is None else args.max_draft
    modes: dict = {"plain": None, "spec": SpeculationConfig(max_draft=max_draft, parallel=not args.no_parallel,
                                                            draft_vocab=args.draft_vocab)}
    for threshold in (float(t) for t in args.thresholds.split(",") if t.strip()):
        modes[f"spec t={threshold:g}"] = SpeculationConfig(threshold=threshold, max_draft=max_draft,
                                                           parallel=not args.no_parallel, length="threshold",
                                                           draft_vocab=args.draft_vocab)
    return modes


def run_link(args, link: str, model, cloud_dir: Path, prompts: list, modes: dict) -> dict:
    """{temperature: {mode: [results per prompt]}} over one link."""
    from hat.common.sampling import SamplingParams
    from hat.device.cloud_link import CloudLink, LinkConfig
    from hat.device.generator import SplitGenerator
    from hat.testbed.link_shim import LinkProfile, LinkShim
    from hat.testbed.local_cloud import local_cloud_process

    cpus = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cpus) >= 2
    if pin:  # children inherit this: the cloud and the link emulator (every thread of theirs) share one CPU
        os.sched_setaffinity(0, cpus[1:])
    profile = LinkProfile(args.uplink_mbps * 1e6, args.downlink_mbps * 1e6, args.rtt_ms / 1000)
    out: dict = {}
    with contextlib.ExitStack() as stack:
        cloud = stack.enter_context(local_cloud_process(cloud_dir, args.threads))
        port = cloud.data_port
        if link == "emulated":
            port = stack.enter_context(LinkShim(f"tcp://127.0.0.1:{cloud.data_port}", profile)).port
        if pin:  # the device (this process) gets the other: drafting never slows the "remote" cloud
            os.sched_setaffinity(0, cpus[:1])
        log(f"link {link}: " + (f"device pinned to CPU {cpus[0]}, cloud to {cpus[1:]}" if pin else "nothing pinned"))
        config = LinkConfig(host="127.0.0.1", data_port=port, control_port=cloud.control_port,
                            device_id=f"bench-speculative-{link}")
        with CloudLink(config) as cloud_link:
            cloud_link.register(model.manifest)
            generator = SplitGenerator(model, cloud_link)
            generator.probe()
            for temperature in args.temperature_list:
                sampling = SamplingParams(temperature, 1.0, args.seed)
                for speculation in modes.values():  # warm-up: caches, the cost models' first rounds
                    generator.speculation = speculation
                    generator.generate_ids(prompts[0][1][:32], 16, sampling)
                results: dict[str, list] = {name: [] for name in modes}
                for i, (category, prompt) in enumerate(prompts):
                    for name, speculation in modes.items():  # interleaved: drift of the machine hits every mode alike
                        generator.speculation = speculation
                        results[name].append(generator.generate_ids(prompt, args.tokens, sampling))
                    if sampling.greedy:
                        for name in modes:
                            if results[name][-1].token_ids != results["plain"][-1].token_ids:
                                raise SystemExit(f"{link}, prompt {i} ({category}): {name} output differs from plain "
                                                 "decoding: not lossless")
                    log(f"{link} T={temperature:g} prompt {i + 1}/{len(prompts)} ({category}): " + ", ".join(
                        f"{name} TBT {mean_tbt(results[name][-1]):.1f} ms" for name in modes))
                out[temperature] = results
    os.sched_setaffinity(0, cpus)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from hat.common.model_store import resolve_model
    from hat.common.split import split_checkpoint
    from hat.device.device_model import DeviceModel

    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model, pull_missing=True)
    modes = modes_for(args)
    with tempfile.TemporaryDirectory(prefix="hat-bench-spec-") as tmp:
        device_dir, cloud_dir = split_checkpoint(model_dir, args.input_layers, args.output_layers, Path(tmp) / "bundle",
                                                 "float32", args.adapter)
        model = DeviceModel.load(device_dir)
        if model.adapter is None:
            raise SystemExit("the device bundle has no adapter: pass --adapter or train one with `hat train-adapter`")
        if args.prompts_from == "specbench":
            prompts = specbench_prompts(model.tokenizer, args.per_category, args.max_prompt_tokens, args.seed)
        else:
            prompts = heldout_prompts(model.tokenizer, args.prompts, args.prompt_tokens, args.seed)
        log(f"model {model_dir}, K={args.input_layers} M={args.output_layers}, float32; {len(prompts)} prompts "
            f"({args.prompts_from}), up to {args.tokens} new tokens; links {args.link_list}; temperatures "
            f"{args.temperature_list}; {args.threads} threads each for device and cloud")
        runs = {link: run_link(args, link, model, cloud_dir, prompts, modes) for link in args.link_list}
    categories = list(dict.fromkeys(c for c, _ in prompts))
    figures: dict = {}
    for link, by_temperature in runs.items():
        for temperature, results in by_temperature.items():
            key = f"{link} T={temperature:g}"
            figures[key] = {}
            for category in categories + ["all"]:
                picked = [i for i, (c, _) in enumerate(prompts) if category in ("all", c)]
                figures[key][category] = {name: summarize([results[name][i] for i in picked],
                                                          [results["plain"][i] for i in picked])
                                          for name in modes}
    report(args, model_dir, figures, modes)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "figures": figures}, indent=1))
    return 0


def report(args, model_dir: Path, figures: dict, modes: dict) -> None:
    for key, by_category in figures.items():
        link = (f" ({args.uplink_mbps:g}/{args.downlink_mbps:g} MB/s up/down, {args.rtt_ms:g} ms RTT)"
                if key.startswith("emulated") else "")  # a loopback table has no emulated link
        print(f"\nSpeculative decoding, {Path(model_dir).name} K={args.input_layers} M={args.output_layers}, "
              f"{key}{link}, float32")
        header = (f"{'category':<14}{'mode':<16}{'prompts':>8}{'accept len':>11}{'TBT ms':>9}{'x plain':>9}"
                  f"{'draft ms':>10}{'cloud ms':>10}{'drafted':>9}{'wasted/tok':>11}")
        print(header)
        print("-" * len(header))
        for category, by_mode in by_category.items():
            for name, f in by_mode.items():
                accept = "" if name == "plain" else f"{f['accept_len']:.2f}"
                print(f"{category:<14}{name:<16}{f['prompts']:>8}{accept:>11}{f['tbt_ms']:>9.1f}{f['tbt_ratio']:>9.2f}"
                      f"{f['draft_ms_per_round']:>10.1f}{f['cloud_ms']:>10.1f}{f['drafted_per_round']:>9.2f}"
                      f"{f['wasted_per_token']:>11.2f}")
    print("\n(TBT ms: median over prompts; x plain: median of per-prompt ratios to plain decoding; draft and cloud ms "
          "per decode round; drafted = draft tokens per round; wasted/tok = draft tokens never accepted per token)")
    for key, by_category in figures.items():
        for name in modes:
            if name == "plain":
                continue
            mt = [f[name] for c, f in by_category.items() if c not in ("all", "humaneval", "heldout")]
            accept = (sum(f["accept_len"] * f["rounds"] for f in mt) / max(1, sum(f["rounds"] for f in mt))) if mt else float("nan")
            overall = by_category["all"][name]["tbt_ratio"]
            worst = max(f[name]["tbt_ratio"] for c, f in by_category.items() if c != "all")
            line = f"{key} {name}: worst category {worst:.2f} x plain (target <= {WORST_RATIO}: {'met' if worst <= WORST_RATIO else 'missed'})"
            if key.endswith("T=0") and mt:
                line += f"; MT-Bench accepted length {accept:.2f} (target >= {ACCEPT_TARGET}: {'met' if accept >= ACCEPT_TARGET else 'missed'})"
            if key.startswith("emulated"):
                line += f"; all prompts {overall:.2f} x plain (target <= {TBT_RATIO_TARGET}: {'met' if overall <= TBT_RATIO_TARGET else 'missed'})"
            print(line)


if __name__ == "__main__":
    sys.exit(main())
