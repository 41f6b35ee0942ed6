#!/usr/bin/env python
"""Decode benchmark of split inference on loopback: cost of the split against the unsplit model.

One run prints:
  (a) split median time between tokens / unsplit median per-token decode latency (same process, same
      checkpoint, same thread count as the device, greedy, same number of tokens);
  (b) overhead per decode round = time between tokens - device compute (embedding + input part, output
      part + final norm/head, sampling) - cloud compute (RESULT header compute_us): median and p90, with
      the overhead split into "link" (round trip minus cloud compute: wire encode/decode, ZeroMQ, the
      cloud's loop) and "device glue" (the rest of the device's per-token Python);
  (c) data-plane bytes per generated token (decode rounds only, prefill excluded), per direction, against
      hidden_size x dtype itemsize;
  (d) the memory floor: the unsplit decode step against the time to read the model's weights once at the memory
      bandwidth measured in this run (a streaming read of a buffer larger than any cache, same thread count):
      a decode step reads every weight once, so no implementation on this machine beats that time.

Method for (c): per-round accounting. The benchmark wraps the CloudLink instance's `send_forward` and
`receive` and reads the link's own byte counters (wire.frame_bytes: header + tensor payloads, no ZeroMQ
framing, no TCP/IP) around every round; decode rounds are the rounds after the prefill round. A cross-check by difference
of two generations of different lengths (same prompt) is printed next to it.

Targets: overhead <= 0.5 ms median per round; bytes within 5% of the hidden-state size per direction.

The cloud runs as a subprocess (`python -m hat.cli.main cloud serve ... --threads T`) unless
--cloud-in-process is given (then it shares this process and its GIL: for comparison only).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from hat.common.default_model import DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS

OVERHEAD_TARGET_MS = 0.5
BYTES_TARGET_RATIO = 1.05
PROMPT = "Write a short story about a robot who learns to paint."  # sent through the chat template where there is one
WARMUP_TOKENS = 16
BANDWIDTH_BUFFER_BYTES = 1 << 30  # the streaming read's buffer: far larger than any last-level cache


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="a store name (`hat pull --list`), `reference`, or a checkpoint folder (default: the store's "
                        "default real model, pulled if missing)")
    p.add_argument("--input-layers", "-K", type=int, default=DEFAULT_INPUT_LAYERS)
    p.add_argument("--output-layers", "-M", type=int, default=DEFAULT_OUTPUT_LAYERS)
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per measured generation")
    p.add_argument("--repeats", type=int, default=3, help="measured generations (split and unsplit each)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="torch threads for the cloud and for the device each (default: half the cores)")
    p.add_argument("--cloud-in-process", action="store_true",
                   help="run the cloud in this process (shares the GIL; for comparison)")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype of both parts and of the unsplit baseline (the reference model is stored in bfloat16)")
    p.add_argument("--json", type=Path, help="write the figures to this file")
    args = p.parse_args(argv)
    if args.tokens < 4:
        p.error("--tokens must be at least 4")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def pct(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def med(values) -> float:
    return float(statistics.median(values)) if values else float("nan")


# ---------------------------------------------------------------------------------------------- the cloud
@contextmanager
def cloud_server(cloud_dir: Path, threads: int, in_process: bool):
    """Yields (data_port, control_port)."""
    if in_process:
        from hat.cloud.config import CloudConfig
        from hat.cloud.server import CloudServer
        server = CloudServer(CloudConfig(bundle=str(cloud_dir), data_address="tcp://127.0.0.1:0",
                                         control_address="127.0.0.1:0")).start()
        try:
            yield int(server.data_address.rsplit(":", 1)[1]), int(server.control_address.rsplit(":", 1)[1])
        finally:
            server.stop()
        return
    from hat.testbed.local_cloud import local_cloud_process
    with local_cloud_process(cloud_dir, threads) as cloud:
        log(f"cloud subprocess pid {cloud.pid} ready: data port {cloud.data_port}, control port {cloud.control_port}")
        yield cloud.data_port, cloud.control_port


# ------------------------------------------------------------------------------------ split instrumentation
class RoundRecorder:
    """Per-round compute and bytes, recorded by thin wrappers around the device's parts, the generator's
    sampling function and the link's send and receive. The generator's own code runs unmodified."""

    def __init__(self):
        self.rounds: list[dict] = []

    def _cur(self) -> dict:
        return self.rounds[-1]

    def install(self, model, link) -> None:
        import hat.device.generator as generator_module
        rec = self
        embed, fwd_in = model.input_part.embed, model.input_part.forward_layers
        fwd_out, logits = model.output_part.forward_layers, model.output_part.logits
        send_forward, receive, sample = link.send_forward, link.receive, generator_module.sample_token

        def timed(fn, key, new_round=False):
            def wrapper(*a, **kw):
                if new_round:
                    rec.rounds.append({"embed": 0.0, "input": 0.0, "output": 0.0, "logits": 0.0, "sample": 0.0})
                t0 = time.perf_counter()
                out = fn(*a, **kw)
                rec._cur()[key] += (time.perf_counter() - t0) * 1000
                return out
            return wrapper

        def link_send_forward(session_id, start, hidden, return_last=0, **options):
            up = link.bytes_up
            sequence = send_forward(session_id, start, hidden, return_last, **options)
            rec._cur().update(tokens=int(hidden.shape[0]), up=link.bytes_up - up)
            return sequence

        def link_receive(sequence, timeout_s=None):
            down = link.bytes_down
            reply = receive(sequence, timeout_s)
            if reply.tensor is not None:  # a forward's reply (the session's CLOSED reply carries no tensor)
                rec._cur().update(down=link.bytes_down - down, down_tokens=int(reply.tensor.shape[0]))
            return reply

        model.input_part.embed = timed(embed, "embed", new_round=True)  # first call of every round
        model.input_part.forward_layers = timed(fwd_in, "input")
        model.output_part.forward_layers = timed(fwd_out, "output")
        model.output_part.logits = timed(logits, "logits")
        link.send_forward, link.receive = link_send_forward, link_receive
        generator_module.sample_token = timed(sample, "sample")
        self._restore = lambda: setattr(generator_module, "sample_token", sample)

    def uninstall(self) -> None:
        self._restore()


def split_generation(generator, recorder: RoundRecorder, prompt_ids: list[int], tokens: int) -> dict:
    recorder.rounds.clear()
    result = generator.generate_ids(prompt_ids, tokens)
    if len(result.token_ids) != tokens:
        raise RuntimeError(f"split generation stopped after {len(result.token_ids)} of {tokens} tokens "
                           f"({result.finish_reason})")
    rounds = [dict(r) for r in recorder.rounds]
    assert len(rounds) == len(result.steps) == tokens
    for r, step in zip(rounds, result.steps):
        r["round_ms"], r["cloud_ms"], r["device_ms_lib"] = step.round_ms, step.cloud_compute_ms, step.device_ms
        r["device_compute_ms"] = r["embed"] + r["input"] + r["output"] + r["logits"] + r["sample"]
    decode = []
    for tbt, r in zip(result.tbt_ms, rounds[1:]):  # tbt[i] ends with the token of round i+1
        r = dict(r, tbt_ms=tbt)
        r["overhead_ms"] = tbt - r["device_compute_ms"] - r["cloud_ms"]
        r["link_ms"] = r["round_ms"] - r["cloud_ms"]
        r["glue_ms"] = tbt - r["round_ms"] - r["device_compute_ms"]
        decode.append(r)
    return {"token_ids": result.token_ids, "bytes_up": result.bytes_up, "bytes_down": result.bytes_down,
            "prefill": rounds[0], "decode": decode, "ttft_ms": result.ttft_ms}


# -------------------------------------------------------------------------------------------- the baseline
@torch.inference_mode()
def unsplit_generation(part, prompt_ids: list[int], tokens: int) -> dict:
    """Greedy decode with one whole-model ModelPart; times each decode step incl. sampling."""
    from hat.common.layers import SequenceSpan
    cache = part.new_cache()
    hidden = part.forward_layers(part.embed(torch.tensor(prompt_ids)), [SequenceSpan(cache, 0, len(prompt_ids))])
    token = int(torch.argmax(part.logits(hidden[-1:])[0]))
    generated, steps, position = [token], [], len(prompt_ids)
    while len(generated) < tokens:
        t0 = time.perf_counter()
        hidden = part.forward_layers(part.embed(torch.tensor([token])), [SequenceSpan(cache, position, 1)])
        token = int(torch.argmax(part.logits(hidden[-1:])[0]))
        steps.append((time.perf_counter() - t0) * 1000)
        generated.append(token)
        position += 1
    return {"token_ids": generated, "step_ms": steps}


def memory_bandwidth(threads: int, repeats: int = 5) -> float:
    """Bytes per second of a streaming read (a sum over BANDWIDTH_BUFFER_BYTES of float32), best of `repeats`, at
    `threads` torch threads: what a decode step, which reads every weight once, can at best reach."""
    buffer = torch.ones(BANDWIDTH_BUFFER_BYTES // 4, dtype=torch.float32)
    torch.set_num_threads(threads)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass pages the buffer in
        t0 = time.perf_counter()
        float(buffer.sum())
        best = min(best, time.perf_counter() - t0)
    return BANDWIDTH_BUFFER_BYTES / best


# ------------------------------------------------------------------------------------------------ the run
# A bare pyzmq ROUTER that answers each message after busy-waiting the given seconds (the cloud's compute).
_ECHO_SERVER = """
import sys, time, zmq
work = float(sys.argv[1])
sock = zmq.Context().socket(zmq.ROUTER)
print(sock.bind_to_random_port("tcp://127.0.0.1"), flush=True)
while True:
    frames = sock.recv_multipart(copy=False)
    if frames[1].bytes == b"stop":
        break
    until = time.perf_counter() + work
    while time.perf_counter() < until:
        pass
    sock.send_multipart(frames, copy=False)
"""


def transport_floor(device_ms: float, cloud_ms: float, payload_bytes: int, rounds: int = 400) -> dict:
    """Round-trip overhead of bare ZeroMQ on this machine under the same compute gaps as the split decode:
    the client busy-waits the device's compute between rounds, the echo server the cloud's compute. What is
    left over is thread wake-ups and the kernel, which no change to this project's code removes."""
    import zmq

    def busy(ms: float) -> None:
        until = time.perf_counter() + ms / 1000
        while time.perf_counter() < until:
            pass

    server = subprocess.Popen([sys.executable, "-c", _ECHO_SERVER, str(cloud_ms / 1000)], stdout=subprocess.PIPE, text=True)
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    try:
        sock.connect(f"tcp://127.0.0.1:{int(server.stdout.readline())}")
        payload = np.zeros(payload_bytes, np.uint8)
        samples = []
        for _ in range(rounds):
            busy(device_ms)
            sent = time.perf_counter()
            sock.send_multipart([b"h" * 32, payload], copy=False)
            if not sock.poll(10_000):
                raise RuntimeError("the echo server did not answer within 10 s")
            sock.recv_multipart(copy=False)
            samples.append((time.perf_counter() - sent) * 1000 - cloud_ms)
        sock.send_multipart([b"stop"])
        server.wait(timeout=10)
    finally:
        sock.close(linger=0)
        context.term()
        if server.poll() is None:
            server.kill()
    samples = samples[rounds // 10:]
    return {"median": med(samples), "p90": pct(samples, 90)}


def main(argv=None) -> int:
    args = parse_args(argv)
    from hat.common.checkpoint import load_tensors, parse_dtype
    from hat.common.model_part import ModelPart
    from hat.common.model_spec import load_model_spec
    from hat.common.model_store import resolve_model
    from hat.common.split import split_checkpoint
    from hat.device.cloud_link import CloudLink, LinkConfig
    from hat.device.device_model import DeviceModel
    from hat.device.chunk_planner import ChunkingConfig
    from hat.device.generator import SplitGenerator, encode_prompt

    began = time.perf_counter()
    load_before = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model, pull_missing=True)
    log(f"model {model_dir}; K={args.input_layers} M={args.output_layers}; {args.tokens} tokens x "
        f"{args.repeats} repeats; {args.threads} threads each; cloud "
        f"{'in-process' if args.cloud_in_process else 'subprocess'}")

    spec = load_model_spec(model_dir)
    whole = ModelPart.from_tensors(spec, 0, spec.num_layers,
                                   load_tensors(model_dir, lambda name: True, parse_dtype(args.dtype)),
                                   embedding=True, head=True)
    with tempfile.TemporaryDirectory(prefix="hat-bench-") as tmp:
        device_dir, cloud_dir = split_checkpoint(model_dir, args.input_layers, args.output_layers, Path(tmp) / "bundle",
                                                 args.dtype)
        model = DeviceModel.load(device_dir)
        model.stop_ids = ()  # always generate the full number of tokens (a random model may emit EOS)
        itemsize = torch.empty(0, dtype=model.input_part.dtype).element_size()
        prompt_ids = encode_prompt(model.tokenizer, args.prompt, chat=None)
        with cloud_server(cloud_dir, args.threads, args.cloud_in_process) as (data_port, control_port):
            link = CloudLink(LinkConfig(host="127.0.0.1", data_port=data_port, control_port=control_port,
                                        device_id="bench-device"))
            recorder = RoundRecorder()
            try:
                link.register(model.manifest)
                # the prompt goes whole: this benchmark measures decode rounds, and its round accounting counts
                # the first round as the prefill (adaptive chunking would make that several rounds)
                generator = SplitGenerator(model, link, chunking=ChunkingConfig(enabled=False))
                recorder.install(model, link)
                log("warm-up")
                for _ in range(2):
                    split_generation(generator, recorder, prompt_ids, WARMUP_TOKENS)
                    unsplit_generation(whole, prompt_ids, WARMUP_TOKENS)
                split_runs, base_runs = [], []
                for i in range(args.repeats):
                    log(f"repeat {i + 1}/{args.repeats}: split")
                    split_runs.append(split_generation(generator, recorder, prompt_ids, args.tokens))
                    log(f"repeat {i + 1}/{args.repeats}: unsplit")
                    base_runs.append(unsplit_generation(whole, prompt_ids, args.tokens))
                short_tokens = args.tokens // 2
                log(f"cross-check of bytes: one split generation of {short_tokens} tokens")
                short = split_generation(generator, recorder, prompt_ids, short_tokens)
            finally:
                recorder.uninstall()
                link.close()

    decode = [r for run in split_runs for r in run["decode"]]
    base_steps = [s for run in base_runs for s in run["step_ms"]]
    split_tbt = med([r["tbt_ms"] for r in decode])
    base_tbt = med(base_steps)

    def stat(key):
        vals = [r[key] for r in decode]
        return {"median": med(vals), "p90": pct(vals, 90)}

    overhead = stat("overhead_ms")
    hidden_bytes = spec.hidden_size * itemsize
    log("transport floor: bare ZeroMQ echo with the same compute gaps")
    floor = transport_floor(stat("device_compute_ms")["median"], stat("cloud_ms")["median"], hidden_bytes)
    up_per_tok = statistics.fmean(r["up"] / r["tokens"] for r in decode)
    down_per_tok = statistics.fmean(r["down"] / r["down_tokens"] for r in decode)
    long = split_runs[-1]
    diff_up = (long["bytes_up"] - short["bytes_up"]) / (args.tokens - short_tokens)
    diff_down = (long["bytes_down"] - short["bytes_down"]) / (args.tokens - short_tokens)
    same_tokens = all(s["token_ids"] == b["token_ids"] for s, b in zip(split_runs, base_runs))
    log(f"memory bandwidth: streaming read of {BANDWIDTH_BUFFER_BYTES >> 20} MiB at {args.threads} threads")
    bandwidth = memory_bandwidth(args.threads)
    # a decode step reads every weight once, except the embedding (one row; a tied head reads it as the head)
    weight_bytes = sum(p.numel() * p.element_size() for name, p in whole.named_parameters(remove_duplicate=False)
                       if not name.startswith("model.embed_tokens."))

    figures = {
        "model": str(model_dir), "num_layers": spec.num_layers, "hidden_size": spec.hidden_size,
        "dtype": str(model.input_part.dtype).removeprefix("torch."), "input_layers": args.input_layers,
        "output_layers": args.output_layers, "tokens": args.tokens, "repeats": args.repeats, "threads": args.threads,
        "cloud": "in-process" if args.cloud_in_process else "subprocess", "prompt_tokens": len(prompt_ids),
        "decode_rounds": len(decode), "greedy_tokens_identical": same_tokens,
        "split_tbt_ms": {"median": split_tbt, "p90": pct([r["tbt_ms"] for r in decode], 90)},
        "unsplit_step_ms": {"median": base_tbt, "p90": pct(base_steps, 90)},
        "latency_ratio": split_tbt / base_tbt,
        "overhead_ms": overhead, "transport_floor_ms": floor,
        "overhead_above_floor_ms": overhead["median"] - floor["median"], "link_ms": stat("link_ms"), "device_glue_ms": stat("glue_ms"),
        "device_compute_ms": stat("device_compute_ms"), "cloud_compute_ms": stat("cloud_ms"),
        "round_ms": stat("round_ms"),
        "device_parts_ms": {k: med([r[k] for r in decode]) for k in ("embed", "input", "output", "logits", "sample")},
        "bytes_method": "per-round accounting of CloudLink byte counters around each decode round "
                        "(header + tensor payloads; no ZeroMQ framing or TCP/IP)",
        "hidden_state_bytes": hidden_bytes,
        "bytes_up_per_token": up_per_tok, "bytes_down_per_token": down_per_tok,
        "bytes_up_ratio": up_per_tok / hidden_bytes, "bytes_down_ratio": down_per_tok / hidden_bytes,
        "header_up_bytes": up_per_tok - hidden_bytes, "header_down_bytes": down_per_tok - hidden_bytes,
        "downlink_carries": "hidden states of every new position (M > 0)" if args.output_layers else
                            "the last position's hidden state (M = 0)",
        "bytes_by_difference": {"short_tokens": short_tokens, "up_per_token": diff_up, "down_per_token": diff_down},
        "memory_floor": {"weight_bytes": weight_bytes, "bandwidth_GBps": bandwidth / 1e9,
                         "floor_ms": weight_bytes / bandwidth * 1000, "unsplit_over_floor": base_tbt / (weight_bytes / bandwidth * 1000)},
        "wall_s": time.perf_counter() - began,
        "cpu_count": os.cpu_count(), "loadavg_1min": {"before": load_before, "after": os.getloadavg()[0]},
    }
    figures["targets"] = {
        "overhead_median_ms": {"target": OVERHEAD_TARGET_MS, "value": overhead["median"],
                               "met": overhead["median"] <= OVERHEAD_TARGET_MS},
        "bytes_within_5pct": {"target": BYTES_TARGET_RATIO,
                              "value": max(figures["bytes_up_ratio"], figures["bytes_down_ratio"]),
                              "met": max(figures["bytes_up_ratio"], figures["bytes_down_ratio"]) <= BYTES_TARGET_RATIO},
    }
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


def report(f: dict) -> None:
    print(f"split decode on loopback: {f['model']}")
    print(f"  {f['num_layers']} layers x {f['hidden_size']} {f['dtype']}; device K={f['input_layers']} "
          f"M={f['output_layers']}, cloud {f['num_layers'] - f['input_layers'] - f['output_layers']} layers "
          f"({f['cloud']}); {f['threads']} torch threads each; prompt {f['prompt_tokens']} tokens; "
          f"{f['repeats']} x {f['tokens']} tokens -> {f['decode_rounds']} decode rounds")
    load, cores = f["loadavg_1min"], f["cpu_count"]
    busy = max(load["before"], load["after"]) > 0.75 * cores
    print(f"  machine: {cores} cores, 1-min load {load['before']:.1f} before, {load['after']:.1f} after"
          + ("  -- WARNING: other work competes for the CPUs; sub-ms figures are unreliable" if busy else ""))
    print(f"  greedy tokens identical to the unsplit model: {'yes' if f['greedy_tokens_identical'] else 'NO'}")
    rows = [
        ("split time between tokens", f["split_tbt_ms"]),
        ("unsplit decode step", f["unsplit_step_ms"]),
        ("  device compute (K + M + head + sampling)", f["device_compute_ms"]),
        ("  cloud compute (compute_us)", f["cloud_compute_ms"]),
        ("  overhead per round", f["overhead_ms"]),
        ("    link: round trip - cloud compute", f["link_ms"]),
        ("    device glue: rest of the device's loop", f["device_glue_ms"]),
        ("round trip as the device saw it", f["round_ms"]),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    print(f"  {'':<{width}}  {'median ms':>10}  {'p90 ms':>10}")
    for name, s in rows:
        print(f"  {name:<{width}}  {s['median']:>10.3f}  {s['p90']:>10.3f}")
    parts = f["device_parts_ms"]
    print(f"  (device parts, median ms: embed {parts['embed']:.3f}, input layers {parts['input']:.3f}, "
          f"output layers {parts['output']:.3f}, norm+head {parts['logits']:.3f}, sampling {parts['sample']:.3f})")
    print()
    hb = f["hidden_state_bytes"]
    print(f"  (a) latency ratio split / unsplit (median per-token): {f['latency_ratio']:.2f}x  "
          f"({f['split_tbt_ms']['median']:.3f} / {f['unsplit_step_ms']['median']:.3f} ms)")
    print(f"  (b) overhead per round: median {f['overhead_ms']['median']:.3f} ms, p90 {f['overhead_ms']['p90']:.3f} ms "
          f"(target <= {OVERHEAD_TARGET_MS} ms median)")
    fl = f["transport_floor_ms"]
    print(f"      of which bare ZeroMQ under the same compute gaps (no project code; measured in this run): "
          f"median {fl['median']:.3f} ms, p90 {fl['p90']:.3f} ms")
    print(f"      -> this project's own share of the overhead: {f['overhead_above_floor_ms']:.3f} ms median")
    print(f"  (c) bytes per generated token (decode rounds; hidden state = {f['hidden_size']} x "
          f"{hb // f['hidden_size']} B = {hb} B):")
    bw = 10
    print(f"      {'':<6}{'bytes':>{bw}}{'/ hidden':>{bw}}{'header B':>{bw}}{'by diff':>{bw}}")
    d = f["bytes_by_difference"]
    print(f"      {'up':<6}{f['bytes_up_per_token']:>{bw}.1f}{f['bytes_up_ratio']:>{bw}.3f}"
          f"{f['header_up_bytes']:>{bw}.1f}{d['up_per_token']:>{bw}.1f}")
    print(f"      {'down':<6}{f['bytes_down_per_token']:>{bw}.1f}{f['bytes_down_ratio']:>{bw}.3f}"
          f"{f['header_down_bytes']:>{bw}.1f}{d['down_per_token']:>{bw}.1f}")
    print(f"      downlink carries {f['downlink_carries']}; method: {f['bytes_method']}; "
          f"'by diff' = (bytes of {f['tokens']}-token - {d['short_tokens']}-token generation) / "
          f"{f['tokens'] - d['short_tokens']}")
    mf = f["memory_floor"]
    print(f"  (d) memory floor: {mf['weight_bytes'] / 1e6:.0f} MB of weights (the embedding's one row aside) read per step at {mf['bandwidth_GBps']:.1f} GB/s "
          f"(streaming read, {f['threads']} threads, this run) = {mf['floor_ms']:.2f} ms; the unsplit step takes "
          f"{f['unsplit_step_ms']['median']:.2f} ms = {mf['unsplit_over_floor']:.2f}x the floor")
    print()
    t = f["targets"]
    o, b = t["overhead_median_ms"], t["bytes_within_5pct"]
    print(f"target overhead <= {o['target']} ms median per round: {o['value']:.3f} ms -> "
          f"{'met' if o['met'] else 'missed'}")
    print(f"target bytes per token (header included) within 5% of the hidden-state size: worst direction {b['value']:.3f}x "
          f"(header {max(f['header_up_bytes'], f['header_down_bytes']):.0f} B on {hb} B) -> "
          f"{'met' if b['met'] else 'missed'}")


if __name__ == "__main__":
    sys.exit(main())
