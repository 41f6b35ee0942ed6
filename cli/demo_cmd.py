"""`hat demo [--model DIR] [--prompt TEXT]`: a cloud server and a device on loopback, one streamed generation."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hat.common.default_model import DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS
from hat.common.model_store import DEFAULT_MODEL, REFERENCE_NAME
from hat.testbed.local_cloud import local_cloud_process

from .generate_cmd import add_chunking_args, add_sampling_args, add_speculation_args, set_threads

DEMO_QUESTION = "What is the capital of France?"  # asked of chat models (through their chat template)
REFERENCE_PROMPT = "def fibonacci(n):"  # the reference model knows only Python source
# the reference model's sampling: greedy decoding of a model that small loops on one line; seeded sampling reads as
# code and stays reproducible. Real models answer greedily unless flags say otherwise
REFERENCE_TEMPERATURE, REFERENCE_TOP_P, REFERENCE_SEED = 0.7, 0.95, 0


def add_parser(commands) -> None:
    p = commands.add_parser("demo", help="split a model, start a cloud and a device on loopback, stream a generation")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a store name (pulled first if missing), `{REFERENCE_NAME}` (the small model shipped in the "
                        f"package) or a checkpoint folder (default: {DEFAULT_MODEL})")
    p.add_argument("--prompt", help=f"prompt text (default: {DEMO_QUESTION!r}, or {REFERENCE_PROMPT!r} for the "
                                    "reference model)")
    p.add_argument("--raw", action="store_true",
                   help="send the prompt as it is, without the model's chat template (models without one always are)")
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
    p.set_defaults(run=run, temperature=None, top_p=None)


def run(args) -> int:
    from hat.common.sampling import SamplingParams
    from hat.common.split import split_checkpoint
    from hat.device.cloud_link import LinkConfig

    from hat.common.model_store import resolve_model

    from .generate_cmd import generate_once

    reference = args.model == REFERENCE_NAME
    model_dir = resolve_model(args.model, pull_missing=True)
    print(f"model: {args.model} ({model_dir})" + (", the project's reference model: see its MODEL_CARD.md" * reference))
    prompt = args.prompt or (REFERENCE_PROMPT if reference else DEMO_QUESTION)
    if reference and args.temperature is None:
        seed = REFERENCE_SEED if args.seed is None else args.seed
        sampling = SamplingParams(REFERENCE_TEMPERATURE, REFERENCE_TOP_P if args.top_p is None else args.top_p, seed)
    else:
        sampling = SamplingParams(args.temperature or 0.0, 1.0 if args.top_p is None else args.top_p, args.seed)
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
            how = "greedy" if sampling.temperature == 0 else (f"temperature {sampling.temperature}, top-p "
                                                              f"{sampling.top_p}, seed {sampling.seed}")
            print(f"prompt: {prompt!r} ({how})\n---")
            link = LinkConfig(host="127.0.0.1", data_port=cloud.data_port, control_port=cloud.control_port,
                              device_id="demo-device")
            generate_once(str(device_dir), link, prompt, args.max_new_tokens, sampling, stream=True,
                          speculation_args=args, chat=False if args.raw else None)
    return 0
