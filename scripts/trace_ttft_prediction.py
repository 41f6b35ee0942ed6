#!/usr/bin/env python
"""How well the chunk planner predicts the time to first token, prompt by prompt, and which of its costs is off.

The reference model is split (K=2, M=1, float32) and served by an in-process cloud on loopback, as the tests do
(its start-up profile runs beside the device's); the device's start-up profile is taken while --busy processes
spin on the CPU, which stay on for the whole run. The same prompt is then generated --prompts times in each
chunking mode (none, adaptive, fixed 4 unless --modes says otherwise) on one device, whose estimators carry over
from prompt to prompt and mode to mode. Each line shows the prediction, the measurement, their ratio, and what the
planner assumed for the whole prompt: the device's input and output parts, the cloud's middle part, the link rates,
the round trip and the head's time.

Prints a summary per mode: the median ratio predicted/measured over the prompts after --warmup.

    python scripts/trace_ttft_prediction.py [--prompt-tokens 200] [--prompts 6] [--warmup 2] [--busy 1]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
from pathlib import Path

MODES = ("none", "adaptive", "fixed4")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-tokens", type=int, default=200, help="tokens in the prompt")
    p.add_argument("--prompts", type=int, default=6, help="prompts per mode")
    p.add_argument("--warmup", type=int, default=2, help="first prompts of each mode left out of its summary")
    p.add_argument("--busy", type=int, default=1, help="busy-loop processes beside the run (0: a quiet machine)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="chunking modes, in order")
    args = p.parse_args(argv)
    if args.prompt_tokens < 1 or args.prompts < 1 or not 0 <= args.warmup < args.prompts or args.busy < 0:
        p.error("--prompt-tokens and --prompts must be at least 1, --warmup below --prompts, --busy at least 0")
    return args


def spin(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


def chunking(mode: str):
    from hat.device.chunk_planner import ChunkingConfig

    return {"none": ChunkingConfig(enabled=False), "adaptive": ChunkingConfig(),
            "fixed4": ChunkingConfig(fixed_size=4)}[mode]


def main(argv=None) -> int:
    args = parse_args(argv)
    from hat.cloud.config import CloudConfig
    from hat.cloud.server import CloudServer
    from hat.common.default_model import DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS, reference_model_dir
    from hat.common.reference_corpus import heldout_files, read_text
    from hat.common.split import split_checkpoint
    from hat.device.cloud_link import CloudLink, LinkConfig
    from hat.device.device_model import DeviceModel
    from hat.device.generator import SplitGenerator

    stop = mp.Event()
    spinners = [mp.Process(target=spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for process in spinners:
        process.start()
    ratios: dict[str, list[float]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="hat-ttft-trace-") as tmp:
            device_dir, cloud_dir = split_checkpoint(reference_model_dir(), DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS,
                                                     Path(tmp) / "bundle", dtype="float32")
            config = CloudConfig(bundle=str(cloud_dir), data_address="tcp://127.0.0.1:0",
                                 control_address="127.0.0.1:0")
            with CloudServer(config) as server:
                link_config = LinkConfig(host="127.0.0.1", data_port=int(server.data_address.rsplit(":", 1)[1]),
                                         control_port=int(server.control_address.rsplit(":", 1)[1]))
                model = DeviceModel.load(device_dir)
                with CloudLink(link_config) as link:
                    link.register(model.manifest)
                    generator = SplitGenerator(model, link)
                    text = " ".join(read_text(f.path) for f in heldout_files()[:8])
                    ids = generator.encode(text)[:args.prompt_tokens]
                    if len(ids) < args.prompt_tokens:
                        raise SystemExit(f"the held-out text has only {len(ids)} tokens")
                    print(f"{'mode':<9} {'#':>2} {'predicted':>9} {'measured':>9} {'ratio':>6}   planner's costs "
                          f"for the whole prompt (ms; link MB/s)")
                    for mode in args.modes:
                        generator.prefill.config = chunking(mode)
                        for index in range(args.prompts):
                            costs = generator.prefill.costs()
                            result = generator.generate_ids(ids, 2)
                            ratio = result.ttft_predicted_ms / result.ttft_ms
                            if index >= args.warmup:
                                ratios.setdefault(mode, []).append(ratio)
                            n = len(ids)
                            print(f"{mode:<9} {index:>2} {result.ttft_predicted_ms:9.1f} {result.ttft_ms:9.1f} "
                                  f"{ratio:6.2f}   input {costs.device_input.predict(n) * 1e3:.1f}, "
                                  f"output {costs.device_output.predict(n) * 1e3:.1f}, "
                                  f"cloud {costs.cloud.predict(n) * 1e3:.1f}, "
                                  f"up {costs.uplink_bytes_per_s / 1e6:.0f}, down {costs.downlink_bytes_per_s / 1e6:.0f}, "
                                  f"rtt {costs.rtt_s * 1e3:.2f}, head {costs.final_s * 1e3:.2f}", flush=True)
    finally:
        stop.set()
        for process in spinners:
            process.join()
    print(f"\npredicted/measured TTFT, median over prompts {args.warmup}..{args.prompts - 1} "
          f"({args.prompt_tokens} tokens, {args.busy} busy process(es)):")
    for mode, values in ratios.items():
        print(f"  {mode:<9} {statistics.median(values):.2f}  (range {min(values):.2f}-{max(values):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
