#!/usr/bin/env python
"""onnxruntime against torch on the device's three hot paths, from one run on one bundle.

  draft step        one token through input part -> adapter -> output part -> head, after a --past-token prompt
  verification      the output part and head over a verification's --verify-tokens hidden states from the cloud
  prefill chunk     the input part over a --chunk-tokens prompt chunk from position 0

Both backends run in this process with the same CPU threads (--threads, 0: torch's default, which the onnxruntime
backend takes too), on the same bundle: --bundle (with an ONNX export), or --model (a folder or a store name, e.g.
smollm2-135m-instruct; default: the reference model) split at the default K, M in float32 and exported to a temporary
folder; a model that ships no adapter for that split gets one of random weights (its drafts are wrong, its cost is
that of a trained one: the benchmark times calls, not acceptance). The backends
take turns in blocks (--rounds of them, each an untimed warm-up call and --block timed calls), so machine noise
hits both alike while neither runtime's idle worker threads spin into the other's timings (per-call alternation
measured both 3-7x slower here). Each figure is the median of the timed calls; the ratio is onnxruntime's median
over torch's (below 1: onnxruntime is faster). The CPU columns are the process's CPU time per call (all its threads):
on a loaded machine wall times grow with the other processes' load, CPU time much less, and worker threads that
spin instead of sleeping show up there. Before timing, the two backends' outputs are compared (largest
difference printed).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from hat.common.default_model import DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS
from hat.common.layers import SequenceSpan


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, help="device bundle with an ONNX export (default: --model's default split "
                                               "in float32, exported now)")
    p.add_argument("--model", default="reference", help="checkpoint folder or store name to split and export when "
                                                      "no --bundle is given (default: the reference model)")
    p.add_argument("--past-tokens", type=int, default=256, help="prompt length before the draft step and verification")
    p.add_argument("--verify-tokens", type=int, default=5, help="hidden states in a verification (drafted + 1)")
    p.add_argument("--chunk-tokens", type=int, default=512, help="tokens in the prefill chunk")
    p.add_argument("--rounds", type=int, default=5, help="blocks per backend and path")
    p.add_argument("--block", type=int, default=10, help="timed calls per block (after one untimed warm-up call)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of both runtimes (0: their defaults)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p.parse_args(argv)


class Paths:
    """One backend's model and caches, with the three timed paths as methods."""

    def __init__(self, model, past_ids: list[int], chunk_ids: list[int], verify_tokens: int):
        self.model, self.past, self.chunk_ids, self.verify_tokens = model, len(past_ids), chunk_ids, verify_tokens
        self.input, self.output, self.adapter = (model.input_part.new_cache(), model.output_part.new_cache(),
                                                 model.adapter.new_cache())
        hidden, _ = model.run_input(past_ids, 0, self.input, self.adapter)
        model.output_part.forward_layers(hidden, [SequenceSpan(self.output, 0, self.past)])
        self.cloud_hidden = hidden[-verify_tokens:].clone()  # stands for the cloud's reply: same shape and scale
        self.next_token = chunk_ids[0]

    def draft_step(self) -> torch.Tensor:
        model, p = self.model, self.past
        _, estimate = model.run_input([self.next_token], p, self.input, self.adapter)
        out = model.output_part.forward_layers(estimate, [SequenceSpan(self.output, p, 1)])
        return model.output_part.logits(out)

    def verification(self) -> torch.Tensor:
        start = self.past - self.verify_tokens
        out = self.model.output_part.forward_layers(self.cloud_hidden, [SequenceSpan(self.output, start, self.verify_tokens)])
        return self.model.output_part.logits(out)

    def prefill_chunk(self) -> torch.Tensor:
        scratch = self.model.input_part.new_cache()
        hidden, _ = self.model.run_input(self.chunk_ids, 0, scratch)
        return hidden


def export_model(model: str, tmp: Path) -> Path:
    """Split `model` at the default K, M in float32 (with its adapter for that split, else a random one) and export
    the device bundle's graphs; returns the device bundle."""
    from hat.common.adapter import AdapterConfig, DraftAdapter
    from hat.common.checkpoint import fingerprint
    from hat.common.model_spec import load_model_spec
    from hat.common.model_store import resolve_model
    from hat.common.split import default_adapter_dir, split_checkpoint
    from hat.device.onnx_export import export_onnx

    model_dir = resolve_model(model)
    adapter = default_adapter_dir(model_dir, DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS)
    if not adapter.is_dir():
        print(f"{model} ships no adapter for K={DEFAULT_INPUT_LAYERS} M={DEFAULT_OUTPUT_LAYERS}: timing a random one",
              file=sys.stderr, flush=True)
        spec, adapter = load_model_spec(model_dir), tmp / "adapter"
        torch.manual_seed(0)
        DraftAdapter(spec, AdapterConfig(DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS, spec.hidden_size, 1,
                                         spec.intermediate_size, fingerprint(model_dir))).save(adapter)
    bundle, _ = split_checkpoint(model_dir, DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS, tmp / "bundle",
                                 dtype="float32", adapter=adapter)
    print(f"exporting {model}'s device parts ...", file=sys.stderr, flush=True)
    export_onnx(bundle, log=lambda line: print(f"  {line}", file=sys.stderr, flush=True))
    return bundle


def timed(fn) -> tuple[float, float]:
    """Wall-clock and process CPU milliseconds of one call (CPU: every thread of this process, spinning included)."""
    began, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - began) * 1e3, (time.process_time() - cpu) * 1e3


def main(argv=None) -> int:
    args = parse_args(argv)
    from hat.device.device_model import DeviceModel

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="hat-bench-onnx-") as tmp:
        bundle = args.bundle
        if bundle is None:
            bundle = export_model(args.model, Path(tmp))
        models = {b: DeviceModel.load(bundle, backend=b, threads=args.threads) for b in ("torch", "onnxruntime")}
        vocab = min(models["torch"].spec.vocab_size, 4000)
        g = torch.Generator().manual_seed(0)
        past_ids = torch.randint(3, vocab, (args.past_tokens,), generator=g).tolist()
        chunk_ids = torch.randint(3, vocab, (args.chunk_tokens,), generator=g).tolist()
        with torch.inference_mode():
            paths = {b: Paths(m, past_ids, chunk_ids, args.verify_tokens) for b, m in models.items()}
            names = ("draft_step", "verification", "prefill_chunk")
            worst = max(float((getattr(paths["torch"], n)() - getattr(paths["onnxruntime"], n)()).abs().max())
                        for n in names)
            times = {(b, n): [] for b in paths for n in names}
            for _ in range(args.rounds):
                for n in names:
                    for b in ("torch", "onnxruntime"):
                        call = getattr(paths[b], n)
                        call()
                        times[b, n] += [timed(call) for _ in range(args.block)]
    backend = models["onnxruntime"].backend
    what = args.bundle or f"{args.model}, K={DEFAULT_INPUT_LAYERS} M={DEFAULT_OUTPUT_LAYERS}, float32"
    print(f"bundle: {what}; onnxruntime providers: {backend.partition('(')[2].rstrip(')')}; "
          f"threads: {args.threads or f'default ({torch.get_num_threads()})'}; "
          f"largest |onnxruntime - torch| over the outputs: {worst:.2g}")
    print(f"{'path':<40} {'torch ms':>9} {'onnxrt ms':>10} {'onnxruntime/torch':>18} {'torch cpu':>10} "
          f"{'onnxrt cpu':>11} {'cpu ratio':>10}")
    labels = {"draft_step": f"draft step (1 token, past {args.past_tokens})",
              "verification": f"verification output part ({args.verify_tokens} tokens)",
              "prefill_chunk": f"prefill chunk, input part ({args.chunk_tokens} tokens)"}
    figures = {"bundle": str(what), "backend": backend, "threads": args.threads or torch.get_num_threads(),
               "max_abs_diff": worst, "timed_calls": args.rounds * args.block, "paths": {}}
    for n in names:
        (t, tc), (o, oc) = ([statistics.median(c) for c in zip(*times[b, n])] for b in ("torch", "onnxruntime"))
        figures["paths"][n] = {"torch_ms": t, "onnxruntime_ms": o, "ratio": o / t, "torch_cpu_ms": tc,
                               "onnxruntime_cpu_ms": oc, "cpu_ratio": oc / tc}
        print(f"{labels[n]:<40} {t:>9.2f} {o:>10.2f} {o / t:>17.2f}x {tc:>10.2f} {oc:>11.2f} {oc / tc:>9.2f}x")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
