"""`hat demo [--model DIR] [--prompt TEXT]`: a cloud server and a device on loopback, one streamed generation."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hat.common.default_model import DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS, reference_model_dir
from hat.testbed.local_cloud import local_cloud_process

from .generate_cmd import add_chunking_args, add_sampling_args, add_speculation_args, set_threads


DEMO_TEMPERATURE, DEMO_TOP_P, DEMO_SEED = 0.7, 0.95, 0  # the demo's sampling unless flags say otherwise


def add_parser(commands) -> None:
    p = commands.add_parser("demo", help="split a model, start a cloud and a device on loopback, stream a generation")
    p.add_argument("--model", help="checkpoint folder (default: the project's reference model)")
    p.add_argument("--prompt", default="def fibonacci(n):", help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=48, help="most tokens to generate")
    p.add_argument("--input-layers", "-K", type=int, default=DEFAULT_INPUT_LAYERS,
                   help="decoder layers on the device before the cloud")
    p.add_argument("--output-layers", "-M", type=int, default=DEFAULT_OUTPUT_LAYERS,
                   help="decoder layers on the device after the cloud")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="compute dtype of both parts (float32: CPUs without native bfloat16 emulate it slowly)")
    add_sampling_args(p)
    add_speculation_args(p)
    add_chunking_args(p)
    # greedy decoding of a model this small loops on one line; seeded sampling reads as code and stays reproducible
    p.set_defaults(run=run, temperature=DEMO_TEMPERATURE, top_p=DEMO_TOP_P, seed=DEMO_SEED)


def run(args) -> int:
    from hat.common.sampling import SamplingParams
    from hat.common.split import split_checkpoint
    from hat.device.cloud_link import LinkConfig

    from .generate_cmd import generate_once

    model_dir = Path(args.model) if args.model else reference_model_dir()
    print(f"model: {model_dir}" + ("" if args.model else " (the project's reference model: see its MODEL_CARD.md)"))
    threads = max(1, (os.cpu_count() or 2) // 2)  # cloud and device share this machine: half the cores each
    set_threads(threads)
    with tempfile.TemporaryDirectory(prefix="hat-demo-") as tmp:
        device_dir, cloud_dir = split_checkpoint(model_dir, args.input_layers, args.output_layers, Path(tmp) / "bundle",
                                                  args.dtype)
        print(f"split: device runs layers [0, {args.input_layers}) and the last {args.output_layers}; "
              f"the cloud runs the rest")
        if args.no_speculation or not (device_dir / "adapter").is_dir():
            print("decoding: plain split decoding, one cloud round per token"
                  + ("" if args.no_speculation else " (the checkpoint ships no draft adapter for this split)"))
        else:
            print(f"decoding: speculative, the device drafts with its adapter (threshold {args.draft_threshold}, "
                  f"up to {args.max_draft} tokens per round) and the cloud verifies")
        with local_cloud_process(cloud_dir, threads) as cloud:
            print(f"cloud: pid {cloud.pid}, data port {cloud.data_port}, control port {cloud.control_port}")
            print(f"prompt: {args.prompt!r} (temperature {args.temperature}, top-p {args.top_p}, seed {args.seed})\n---")
            link = LinkConfig(host="127.0.0.1", data_port=cloud.data_port, control_port=cloud.control_port,
                              device_id="demo-device")
            generate_once(str(device_dir), link, args.prompt, args.max_new_tokens,
                          SamplingParams(args.temperature, args.top_p, args.seed), stream=True, speculation_args=args)
    return 0
