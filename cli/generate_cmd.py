"""`hat generate --bundle BUNDLE/device --cloud HOST --prompt TEXT --max-new-tokens N [--json]`."""
from __future__ import annotations

import json
import statistics
import sys
from contextlib import contextmanager


def add_parser(commands) -> None:
    p = commands.add_parser("generate", help="generate text on this device with the cloud's middle layers")
    p.add_argument("--bundle", required=True, help="device bundle folder (BUNDLE/device from `hat split`)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the model's chat template, ready for its answer")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate")
    add_sampling_args(p)
    add_speculation_args(p)
    add_chunking_args(p)
    add_cloud_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(run=run)


def add_cloud_args(p) -> None:
    """The cloud link's flags (--cloud, ports, device id, timeouts, SLOs) and --threads; see link_config."""
    p.add_argument("--cloud", required=True, help="cloud host name or address")
    p.add_argument("--data-port", type=int, default=5555, help="cloud's ZeroMQ data-plane port")
    p.add_argument("--control-port", type=int, default=5556, help="cloud's gRPC control-plane port")
    p.add_argument("--device-id", default="", help="this device's id (default: host name and process id)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for any one cloud reply")
    p.add_argument("--ttft-slo-ms", type=int, default=0, help="time-to-first-token target told to the cloud (0: its default)")
    p.add_argument("--tbt-slo-ms", type=int, default=0,
                   help="time-between-rounds target told to the cloud, which keeps batches with this device's rounds "
                        "within it (0: its default)")
    p.add_argument("--keys", default="", metavar="DIR",
                   help="encrypt and authenticate the link (CURVE, TLS) with this device's identity and the cloud's "
                        "public key (server/) in DIR (`hat keys generate`, `hat keys add --server`); required for a "
                        "cloud that is not on loopback")
    p.add_argument("--insecure", action="store_true",
                   help="talk to a cloud that is not on loopback unencrypted (trusted networks only)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of torch or onnxruntime (0 = their default)")
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                   help="what runs the device's parts: torch, or onnxruntime on the graphs `hat export-onnx` wrote "
                        "into the bundle (TensorRT, then CUDA, then CPU: the first this onnxruntime offers)")


def link_config(args):
    """The LinkConfig add_cloud_args' flags ask for."""
    from hat.device.cloud_link import LinkConfig

    return LinkConfig(host=args.cloud, data_port=args.data_port, control_port=args.control_port,
                      device_id=args.device_id, reply_timeout_s=args.timeout, ttft_slo_ms=args.ttft_slo_ms,
                      tbt_slo_ms=args.tbt_slo_ms, keys_dir=args.keys, insecure=args.insecure)


def add_sampling_args(p) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")


def add_speculation_args(p) -> None:
    from hat.device.speculation import DEFAULT_SPECULATION as S

    p.add_argument("--no-speculation", action="store_true",
                   help="plain split decoding, one token per cloud round (default: speculate when the bundle has an adapter)")
    p.add_argument("--draft-length", choices=("cost", "threshold"), default=None,
                   help="cost: each round drafts the length (0 = plain decoding) that maximizes expected tokens per "
                        "second from measured draft, round and acceptance figures; threshold: draft while the draft is "
                        "confident (default: threshold when --draft-threshold is given, else cost)")
    p.add_argument("--draft-threshold", type=float, default=S.threshold,
                   help="with --draft-length threshold: stop drafting when the draft's confidence (its top probability "
                        "at the adapter's fitted confidence temperature) falls below this")
    p.add_argument("--draft-vocab", type=int, default=S.draft_vocab, metavar="N",
                   help="draft logits over the N most frequent tokens of the adapter's frequency table (FR-Spec; "
                        "verification keeps the full vocabulary); 0 = all")
    p.add_argument("--max-draft", type=int, default=S.max_draft, help="most draft tokens verified per round")
    p.add_argument("--no-parallel-draft", action="store_true", help="do not draft while a verification is in flight")


def add_chunking_args(p) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--chunk-size", type=positive_int, default=0, metavar="N",
                       help="send the prompt in chunks of N tokens (default: sizes chosen per prompt by the chunk planner "
                            "from this device's, the link's and the cloud's measured costs)")
    group.add_argument("--no-chunking", action="store_true", help="send the prompt whole, in one message")


def positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def chunking_config(args):
    from hat.device.chunk_planner import ChunkingConfig

    return ChunkingConfig(enabled=not args.no_chunking, fixed_size=args.chunk_size)


def speculation_config(args, model):
    """The SpeculationConfig the flags ask for, or None for plain decoding."""
    from hat.device.speculation import DEFAULT_SPECULATION, SpeculationConfig

    if args.no_speculation or model.adapter is None:
        return None
    length = args.draft_length or ("threshold" if args.draft_threshold != DEFAULT_SPECULATION.threshold else "cost")
    return SpeculationConfig(threshold=args.draft_threshold, max_draft=args.max_draft,
                             parallel=not args.no_parallel_draft, length=length, draft_vocab=args.draft_vocab)


def run(args) -> int:
    from hat.common.sampling import SamplingParams

    set_threads(args.threads)
    sampling = SamplingParams(args.temperature, args.top_p, args.seed)
    result = generate_once(args.bundle, link_config(args), args.prompt, args.max_new_tokens, sampling,
                           stream=not args.json, speculation_args=args, backend=args.backend, threads=args.threads,
                           chat=args.chat)
    if args.json:
        print(json.dumps(result.to_json()))
    return 0


def set_threads(threads: int) -> None:
    if threads > 0:
        import torch
        torch.set_num_threads(threads)


@contextmanager
def connected_generator(bundle: str, link_config, speculation_args, backend: str = "torch", threads: int = 0):
    """A SplitGenerator over the device bundle, its parts run by `backend` (DeviceModel.load), registered with the
    cloud; the link closes on exit. `speculation_args`: the parsed add_speculation_args and add_chunking_args flags."""
    from hat.device.cloud_link import CloudLink
    from hat.device.device_model import DeviceModel
    from hat.device.generator import SplitGenerator

    model = DeviceModel.load(bundle, backend=backend, threads=threads,
                             with_adapter=not speculation_args.no_speculation)
    print(f"device backend: {model.backend}", file=sys.stderr, flush=True)
    with CloudLink(link_config) as link:
        link.register(model.manifest, backend=model.backend)
        generator = SplitGenerator(model, link, speculation_config(speculation_args, model),
                                   chunking_config(speculation_args))
        generator.probe()  # the link and the cloud measured before the first prompt, so its plan is right
        yield generator


def generate_once(bundle: str, link_config, prompt: str, max_new_tokens: int, sampling, stream: bool, speculation_args,
                  backend: str = "torch", threads: int = 0, chat: bool | None = False):
    """One generation; `chat`: through the chat template (None: when the model has one)."""
    with connected_generator(bundle, link_config, speculation_args, backend, threads) as generator:
        on_text = (lambda text: print(text, end="", flush=True)) if stream else None
        result = generator.generate(prompt, max_new_tokens, sampling, on_text=on_text, chat=chat)
    if stream:
        print()
        print(summary_line(result), file=sys.stderr)
    return result


def summary_line(result) -> str:
    tbt = f"{statistics.mean(result.tbt_ms):.1f} ms mean time between tokens" if result.tbt_ms else "one token"
    info = result.to_json()
    if result.speculative:
        decoding = (f"speculative: {info['rounds']} rounds, {info['accept_len']:.2f} tokens per round, "
                    f"{info['draft_ms']:.0f} ms drafting, {info['wasted_draft_tokens']} draft tokens wasted")
    else:
        decoding = f"plain split decoding: {info['rounds']} rounds"
    prefill = (f"in {len(result.chunks)} chunk{'s' * (len(result.chunks) != 1)} ({result.chunking}"
               + (f", {result.replans} re-plans" if result.replans else "") + ")")
    return (f"[{len(result.token_ids)} tokens ({result.finish_reason}) from a {result.prompt_tokens}-token prompt "
            f"{prefill}: first token {result.ttft_ms:.0f} ms (predicted {result.ttft_predicted_ms:.0f}), {tbt}; "
            f"{decoding}; {result.bytes_up / 1024:.1f} KiB up, {result.bytes_down / 1024:.1f} KiB down]")
