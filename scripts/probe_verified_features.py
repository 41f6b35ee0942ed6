#!/usr/bin/env python
"""Would the draft adapter agree with the model more often if it also saw the cloud's verified middle output?

The shipped adapter estimates the middle part's output h_mid(t) from the device's own input part alone:
estimate(t) = adapter(h_K(t), embed(x_t)), one decoder layer standing in for N-K-M layers. The device also holds
h_mid of every verified position (the cloud returns it for the output part), and EAGLE conditions its draft on
the target's own features of the previous position. This probe trains adapters of the shipped shape for the
same steps on the same cached hidden states and compares their held-out top-1 agreement:

  input-only        the shipped design
  +verified         the same, its input also carrying a learned projection of h_mid(t-1) (zero at start, so it
                    starts as the input-only adapter): h_K(t) + P(norm(h_mid(t-1)))
  +verified-concat  EAGLE's way: its input is fc([h_K(t) ; norm(h_mid(t-1))]), fc starting as [identity | zeros]
                    (so it too starts as the input-only adapter)

Teacher-forced, all see true inputs at every position: for the verified variants that is the first draft token of
a round (h_mid of the pending token's predecessor is verified); deeper draft tokens would see the adapter's own
estimate, so their gain there is smaller. A small budget (minutes, not the recipe's half hour) compares the designs; it
does not predict the final agreement of any.

    python scripts/probe_verified_features.py --windows 96 --steps 150 --threads 1
    python scripts/probe_verified_features.py --steps 300 --threads 1 --variants input-only,+verified-concat
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


class VerifiedFeatureAdapter(nn.Module):
    """A DraftAdapter whose input also carries the previous position's verified middle output, added:
    adapter(h_K(t) + P(norm(h_mid(t-1))), embed(x_t)), P zero at start."""

    def __init__(self, adapter, width: int, eps: float):
        super().__init__()
        from hat.common.layers import RMSNorm

        self.adapter = adapter  # the shipped DraftAdapter, fed the mixed input in place of h_K(t)
        self.previous_norm = RMSNorm(width, eps)  # scales h_mid(t-1) before it is mixed in
        self.previous = self.new_mix(width)  # the learned map that brings norm(h_mid(t-1)) in

    @staticmethod
    def new_mix(width: int) -> nn.Linear:
        """P: width -> width, zero, so the wrapper starts as the adapter it wraps."""
        mix = nn.Linear(width, width, bias=False)
        nn.init.zeros_(mix.weight)
        return mix

    def mix(self, h_k: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        return h_k + self.previous(previous)

    def forward(self, h_k, embeds, spans, previous_mid):
        return self.adapter(self.mix(h_k, self.previous_norm(previous_mid)), embeds, spans)


class ConcatFeatureAdapter(VerifiedFeatureAdapter):
    """EAGLE's way: adapter(fc([h_K(t) ; norm(h_mid(t-1))]), embed(x_t)), fc starting as [identity | zeros]."""

    @staticmethod
    def new_mix(width: int) -> nn.Linear:
        """fc: 2 * width -> width, identity on the h_K half and zero on the h_mid half."""
        mix = nn.Linear(2 * width, width, bias=False)
        with torch.no_grad():
            mix.weight.zero_()
            mix.weight[:, :width].copy_(torch.eye(width))
        return mix

    def mix(self, h_k: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        return self.previous(torch.cat([h_k, previous], dim=-1))


# the compared designs: name -> the wrapper around the shipped adapter (None: the shipped adapter itself)
VARIANTS = {"input-only": None, "+verified": VerifiedFeatureAdapter, "+verified-concat": ConcatFeatureAdapter}


def previous_positions(h_mid: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """h_mid(t-1) for every position of [batch * length, width] windows (zeros at each window's first position)."""
    shaped = h_mid.reshape(batch, length, -1)
    return torch.cat([torch.zeros_like(shaped[:, :1]), shaped[:, :-1]], dim=1).reshape(batch * length, -1)


def estimate(teacher, model, ids, h_k, h_mid):
    b, t = ids.shape
    embeds = teacher.input.embed(ids.reshape(-1))
    verified = isinstance(model, VerifiedFeatureAdapter)
    spans = teacher.spans(model.adapter if verified else model, b, t)
    if verified:
        return model(h_k, embeds, spans, previous_positions(h_mid, b, t))
    return model(h_k, embeds, spans)


def variant_list(text: str) -> list[str]:
    """--variants: a comma list of VARIANTS names, in the given order, each once."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: want distinct names from {', '.join(VARIANTS)}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="store name or folder (default: the default model)")
    p.add_argument("-K", type=int, default=None, help="input layers (default: the default split)")
    p.add_argument("-M", type=int, default=None, help="output layers (default: the default split)")
    p.add_argument("--windows", type=int, default=96, help="training windows of --seq-len cached (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default: %(default)s)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per adapter (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="windows per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate (default: %(default)s)")
    p.add_argument("--ce-weight", type=float, default=0.1, help="weight of the cross-entropy (default: %(default)s)")
    p.add_argument("--eval-windows", type=int, default=8, help="held-out windows scored (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", type=variant_list, default=list(VARIANTS),
                   help=f"comma list of designs to train (default: {','.join(VARIANTS)})")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from hat.common.adapter import AdapterConfig, DraftAdapter
    from hat.common.adapter_training import Teacher, token_stream
    from hat.common.checkpoint import fingerprint
    from hat.common.default_model import DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS
    from hat.common.hidden_cache import CacheMeta, HiddenStateCache
    from hat.common.model_store import DEFAULT_MODEL, resolve_model
    from hat.common.training_text import training_data

    k = DEFAULT_INPUT_LAYERS if args.K is None else args.K
    m = DEFAULT_OUTPUT_LAYERS if args.M is None else args.M
    model_dir = resolve_model(args.model or DEFAULT_MODEL, pull_missing=True)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    teacher = Teacher(str(model_dir), k, m)
    spec = teacher.spec
    data = training_data(["sharegpt"], tokenizer)
    began = time.perf_counter()
    stream = token_stream(tokenizer, data.train(args.seed), args.windows * args.seq_len, "training tokens")
    heldout = token_stream(tokenizer, iter(data.heldout), args.eval_windows * args.seq_len, "held-out tokens")
    eval_ids = torch.from_numpy(heldout[:args.eval_windows * args.seq_len].reshape(args.eval_windows, args.seq_len))
    with torch.no_grad():
        _, eval_h_k, eval_h_mid = teacher.hidden(eval_ids)
        eval_target = teacher.output_logits(eval_h_mid, args.eval_windows, args.seq_len).argmax(-1)
    with tempfile.TemporaryDirectory(prefix="hat-probe-") as tmp:
        meta = CacheMeta(source_fingerprint=fingerprint(model_dir), input_layers=k, output_layers=m,
                         width=spec.hidden_size, seq_len=args.seq_len, windows=len(stream) // args.seq_len,
                         stream=f"{data.description}; seed {args.seed}")
        cache = HiddenStateCache.open(Path(tmp) / "cache", meta)
        cache.fill(teacher, stream)
        fill_s = time.perf_counter() - began
        print(f"cached {cache.available} windows of {args.seq_len} in {fill_s:.0f} s", file=sys.stderr)
        config = AdapterConfig(input_layers=k, output_layers=m, width=spec.hidden_size, depth=1,
                               intermediate_size=spec.intermediate_size, source_fingerprint=meta.source_fingerprint)
        results = {}
        for name in args.variants:
            torch.manual_seed(args.seed)
            adapter = DraftAdapter(spec, config)
            wrapper = VARIANTS[name]
            model = adapter if wrapper is None else wrapper(adapter, spec.hidden_size, spec.rms_norm_eps)
            results[name] = train_and_score(args, teacher, cache, model, eval_ids, eval_h_k, eval_h_mid, eval_target)
            print(f"{name}: {results[name]}", file=sys.stderr)
    print(f"\n{spec.num_layers}-layer model K={k} M={m}; {cache.available * args.seq_len:,} cached training tokens, "
          f"{args.steps} steps x {args.batch} x {args.seq_len}; held-out {args.eval_windows} x {args.seq_len} tokens "
          f"(teacher-forced top-1 agreement with the model's greedy token)")
    print(f"{'adapter':>18}{'agreement':>11}{'final loss':>12}{'train s':>9}")
    for name, r in results.items():
        print(f"{name:>18}{r['agreement']:>11.3f}{r['loss']:>12.4f}{r['train_s']:>9.0f}")
    base = results.get("input-only", {}).get("agreement")
    if base:
        print()
        for name in [name for name in results if name != "input-only"]:
            print(f"{name} / input-only agreement: {results[name]['agreement'] / base:.2f}x")
    return 0


def train_and_score(args, teacher, cache, model, eval_ids, eval_h_k, eval_h_mid, eval_target) -> dict:
    from hat.common.adapter_training import estimate_loss

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    began, losses = time.perf_counter(), []
    for step in range(args.steps):
        ids, h_k, h_mid = cache.batch(args.seed, step, args.batch)
        b, t = ids.shape
        loss, _, _ = estimate_loss(teacher, estimate(teacher, model, ids, h_k, h_mid), h_mid, b, t, args.ce_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    train_s = time.perf_counter() - began
    with torch.no_grad():
        b, t = eval_ids.shape
        drafted = teacher.output_logits(estimate(teacher, model, eval_ids, eval_h_k, eval_h_mid), b, t).argmax(-1)
    recent = losses[-max(1, len(losses) // 10):]
    return {"agreement": round(float((drafted == eval_target).float().mean()), 4),
            "loss": round(sum(recent) / len(recent), 4), "train_s": round(train_s, 1)}


if __name__ == "__main__":
    sys.exit(main())
