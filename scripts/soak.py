#!/usr/bin/env python
"""Soak test on loopback: many emulated devices generate against one cloud for minutes; every output is checked
against a reference decode, and the cloud's memory is sampled all along.

The reference model is split (K=2, M=1, float32); the cloud is a `hat cloud serve` process (one torch thread);
each device is a process of its own (one torch thread) that takes held-out prompts round-robin and generates
greedily (speculation on for even-numbered devices, off for odd ones) until the time is up. Each output is
compared with transformers' greedy `generate` for the same prompt, computed before the run. A divergence at a
float32 near-tie (the reference's top two logits within 1e-4 at that position: batching across devices may sum in
another order) is counted apart, not as corruption. Lost = a generation that raised; corrupted = any other
difference. --secure runs the planes with keys (CURVE, TLS): one identity per device, all allowed.

Prints generations, tokens, lost, corrupted, near-tie divergences, the cloud's resident memory (first, peak, last,
and its growth over the second half in MB per minute) and writes soak.json (+ soak.png, memory over time) to --out.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

TIE = 1e-4  # logits closer than this are a tie in float32


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=8, help="device processes")
    p.add_argument("--minutes", type=float, default=5.0, help="how long each device keeps generating once it has registered")
    p.add_argument("--prompts", type=int, default=24, help="held-out prompts in the pool")
    p.add_argument("--prompt-tokens", type=int, default=48, help="tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--secure", action="store_true", help="CURVE and TLS with a key per device")
    p.add_argument("--out", type=Path, default=Path("soak-results"), help="folder for soak.json and soak.png")
    return p.parse_args(argv)


def reference_decodes(model_dir: Path, prompts: list[list[int]], new_tokens: int):
    """transformers' greedy continuation of each prompt, and the model to judge ties with."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=new_tokens)
            outs.append(out[0, len(ids):].tolist())
    return outs, model


def explained_by_tie(model, prompt: list[int], got: list[int], want: list[int]) -> bool:
    """Whether got and want part at a position where the reference's best two logits are within TIE."""
    import torch

    i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if i is None:  # one is a prefix of the other: a stop token decided differently, no tie to blame
        return False
    with torch.no_grad():
        logits = model(torch.tensor([prompt + want[:i]])).logits[0, -1]
    return float(logits[want[i]] - logits[got[i]]) < TIE


def device_main(index: int, device_dir: str, port: tuple[int, int], keys_dir: str, prompts, new_tokens: int,
                duration_s: float, results) -> None:
    """One device process: once registered, generate for `duration_s`, reporting every output."""
    import torch

    from hat.device.cloud_link import CloudLink, LinkConfig
    from hat.device.device_model import DeviceModel
    from hat.device.generator import SplitGenerator
    from hat.device.speculation import SpeculationConfig

    torch.set_num_threads(1)
    model = DeviceModel.load(device_dir)
    config = LinkConfig(host="127.0.0.1", data_port=port[0], control_port=port[1], keys_dir=keys_dir,
                        device_id="" if keys_dir else f"soak-{index}", reply_timeout_s=120.0)
    speculation = SpeculationConfig() if index % 2 == 0 and model.adapter is not None else None
    n = index
    with CloudLink(config) as link:
        link.register(model.manifest)
        generator = SplitGenerator(model, link, speculation)
        deadline = time.time() + duration_s
        while time.time() < deadline:
            k = n % len(prompts)
            n += 1
            try:
                got = generator.generate_ids(prompts[k], new_tokens).token_ids
                results.put((index, k, got, ""))
            except Exception as exc:  # noqa: BLE001 (a lost generation is what is counted)
                results.put((index, k, None, f"{type(exc).__name__}: {exc}"))


def main(argv=None) -> int:
    args = parse_args(argv)
    import psutil
    from transformers import AutoTokenizer

    from hat.common.default_model import DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS, reference_model_dir
    from hat.cli.keys_cmd import install_public
    from hat.common.keys import ALLOWED_DIR, PUBLIC_CURVE, SERVER_DIR, generate_identity
    from hat.common.reference_corpus import heldout_files, read_text
    from hat.common.split import split_checkpoint
    from hat.testbed.local_cloud import local_cloud_process

    model_dir = reference_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = []
    for f in heldout_files():
        ids = tokenizer(read_text(f.path))["input_ids"]
        if len(ids) >= args.prompt_tokens:
            prompts.append(ids[:args.prompt_tokens])
        if len(prompts) == args.prompts:
            break
    print(f"reference decodes of {len(prompts)} prompts ...", file=sys.stderr, flush=True)
    references, hf = reference_decodes(model_dir, prompts, args.new_tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hat-soak-") as tmp:
        device_dir, cloud_dir = split_checkpoint(model_dir, DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS,
                                                 Path(tmp) / "bundle", dtype="float32")
        extra, device_keys = (), [""] * args.devices
        if args.secure:
            cloud_folder = Path(tmp) / "cloud"
            cloud = generate_identity(cloud_folder, "cloud").public
            for i in range(args.devices):  # `hat keys add`, both ways
                folder = Path(tmp) / f"device-{i}"
                device = generate_identity(folder, f"soak-{i}").public
                install_public(device, folder / (device.name + PUBLIC_CURVE), cloud_folder / ALLOWED_DIR)
                install_public(cloud, cloud_folder / (cloud.name + PUBLIC_CURVE), folder / SERVER_DIR)
                device_keys[i] = str(folder)
            extra = ("--keys", str(Path(tmp) / "cloud"))
        with local_cloud_process(cloud_dir, threads=1, extra_args=extra) as cloud_process:
            process = psutil.Process(cloud_process.pid)
            results = mp.get_context("spawn").Queue()
            began = time.time()
            devices = [mp.get_context("spawn").Process(
                target=device_main, args=(i, str(device_dir), (cloud_process.data_port, cloud_process.control_port),
                                          device_keys[i], prompts, args.new_tokens, args.minutes * 60, results))
                for i in range(args.devices)]
            for d in devices:
                d.start()
            memory, outcomes, first_output = [], [], None
            while any(d.is_alive() for d in devices) or not results.empty():
                memory.append((time.time() - began, process.memory_info().rss / 2**20))
                while not results.empty():
                    outcomes.append(results.get())
                    first_output = first_output or memory[-1][0]
                time.sleep(1.0)
                print(f"\r{time.time() - began:5.0f} s  {len(outcomes)} generations  cloud RSS {memory[-1][1]:.0f} MB",
                      end="", file=sys.stderr, flush=True)
            print(file=sys.stderr)
            for d in devices:
                d.join()
    lost = [o for o in outcomes if o[2] is None]
    ties = corrupted = 0
    for _, k, got, _ in outcomes:
        if got is None or got == references[k]:
            continue
        if explained_by_tie(hf, prompts[k], got, references[k]):
            ties += 1
        else:
            corrupted += 1
    # growth over the second half of the generating time (the devices' start-up and the first batches excluded)
    middle = (first_output or 0.0) + (memory[-1][0] - (first_output or 0.0)) / 2
    half = [(t, m) for t, m in memory if t >= middle]
    growth = (half[-1][1] - half[0][1]) / ((half[-1][0] - half[0][0]) / 60) if len(half) > 1 else 0.0
    summary = {"devices": args.devices, "minutes": args.minutes, "secure": args.secure,
               "generations": len(outcomes), "tokens": sum(len(o[2]) for o in outcomes if o[2]),
               "lost": len(lost), "corrupted": corrupted, "near_tie_divergences": ties,
               "cloud_rss_mb": {"first": memory[0][1], "peak": max(m for _, m in memory), "last": memory[-1][1],
                                "second_half_growth_mb_per_min": growth, "median": statistics.median(m for _, m in memory)},
               "errors": sorted({o[3] for o in lost})[:10], "memory": memory}
    (args.out / "soak.json").write_text(json.dumps(summary, indent=2) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot([t / 60 for t, _ in memory], [m for _, m in memory])
        ax.set_xlabel("minutes")
        ax.set_ylabel("cloud resident memory, MB")
        ax.set_title(f"soak: {args.devices} devices, {len(outcomes)} generations, {len(lost)} lost, {corrupted} corrupted")
        fig.tight_layout()
        fig.savefig(args.out / "soak.png", dpi=120)
    except ImportError:
        pass
    r = summary["cloud_rss_mb"]
    print(f"{args.devices} devices for {args.minutes:g} min{' (CURVE + TLS)' if args.secure else ''}: "
          f"{summary['generations']} generations, {summary['tokens']} tokens; lost {len(lost)}, corrupted {corrupted}, "
          f"near-tie divergences {ties}")
    print(f"cloud RSS: first {r['first']:.0f} MB, peak {r['peak']:.0f} MB, last {r['last']:.0f} MB, "
          f"second-half growth {growth:+.1f} MB/min; {args.out}/soak.json")
    return 0 if not lost and not corrupted else 1


if __name__ == "__main__":
    sys.exit(main())
