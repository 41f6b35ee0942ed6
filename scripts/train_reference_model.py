#!/usr/bin/env python
"""Train the project's reference model: a ~10.8M-parameter, 12-layer Llama on Python source, on CPU.

Corpus (hat.common.reference_corpus): every `*.py` file under the running interpreter's standard
library, `sysconfig.get_paths()["stdlib"]`, recursively, skipping any path with a `site-packages`
component, sorted by relative path (POSIX form). Text = the file's bytes decoded as UTF-8 with
undecodable bytes replaced by U+FFFD, newlines untouched. On CPython 3.11.7 that is 1790 files,
31.5 MB. Held out: the whole files with sha256(relpath)[0] < 5 (37 files, 0.45 MB on 3.11.7); neither
the tokenizer nor the model ever sees them. The corpus depends on the Python version: the summary
records the interpreter and a fingerprint of the files.

Tokenizer: hat.common.bpe_tokenizer.train_tokenizer(training texts, 8192): byte-level BPE with <pad>,
<s>, </s> = ids 0, 1, 2; encoding prepends <s>.

Model: transformers' LlamaForCausalLM, hidden 256, MLP 688, 12 layers, 8 query / 4 key-value heads
(head dim 32), 1024 positions, rope theta 10000, tied embeddings, vocab = len(tokenizer).

Data: each training file is encoded (<s> + tokens) and followed by </s>; the files are joined in
corpus order into one token stream (8.53M tokens on 3.11.7), cached as `train_tokens.npy` in the work
folder. Step s (0-based) trains on --batch-size (16) windows of --seq-len + 1 (513) tokens whose
starts are drawn uniformly by numpy.random.default_rng([seed, s]), so the data of every step follows
from the seed alone and a resumed run sees exactly the batches an uninterrupted one would.

Optimisation: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices and embeddings, none on norms),
peak lr 1e-3, linear warmup over 100 steps then cosine to 10% of peak at --max-steps, gradient
clipping at 1.0, float32, torch.manual_seed(seed) before initialisation, gradients accumulated over
micro-batches of 8 sequences. The number of steps, not wall time, determines the result.

Speed and budget. On the 2-core Xeon (AVX-512, no avx512_bf16/AMX) this was written on, with 2
threads and an otherwise idle machine, the default configuration trains at 0.18 steps/s = 1.5k
tokens/s in float32; with --autocast bf16 it is 0.055 steps/s = 450 tokens/s (bfloat16 matmuls are
emulated on such CPUs). Hence float32 by default, and --max-steps 600 (4.9M tokens, 0.58 epochs):
about 55 minutes of steps, plus about a minute of data preparation, periodic evaluation and
checkpoints, and 40 s of export and evaluation. Throughput collapses if anything else keeps a core
busy (two OpenMP threads on a shared core): run it on an idle machine, or with --threads 1.

Held-out loss (hat.common.reference_corpus.heldout_loss): each held-out file encoded with <s>
prepended, every token after <s> predicted once within windows of 512 predictions (window k covers
tokens [512k, 512k + 513)), mean cross-entropy in nats per predicted token over all held-out files.
During training it is measured on the first --eval-files held-out files every --eval-every steps
(fp32 master weights); at the end on the whole held-out set with the exported bfloat16 weights read
back through transformers in float32.

Work folder (--work, default out/reference-train): tokenizer/, train_tokens.npy, data.json,
checkpoint.pt (model, optimizer, scheduler, RNG states, step, loss log; written every --ckpt-every
steps, at a --max-minutes stop and on SIGINT/SIGTERM), loss_log.csv (step, train_loss, lr,
tokens_seen, elapsed_s, heldout_loss when evaluated, grad_norm). --resume continues from
checkpoint.pt (or starts afresh when there is none); a first Ctrl-C finishes the step and
checkpoints, a second one aborts.

Output (--out, default common/reference_model): config.json, generation_config.json,
model.safetensors (bfloat16, must stay under 30 MB), tokenizer files, MODEL_CARD.md,
training_summary.json (the card's figures, machine-readable, per-file held-out scores included) and
loss_log.csv. The export is read back and checked with AutoModelForCausalLM/AutoTokenizer and with
the project's runtime (load_model_spec + load_tensors + ModelPart, cut in three), whose float32
logits must match transformers'.

Full run (about an hour on an idle 2-core CPU):
    python scripts/train_reference_model.py --resume
"""
from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import math
import os
import platform
import random
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from hat.common.reference_corpus import (EVAL_WINDOW, HELDOUT_HASH_BELOW, corpus_fingerprint,
                                         corpus_files, heldout_scores, hf_logits_fn, mean_loss, read_text,
                                         runtime_logits_fn,
                                         split_corpus, stdlib_root)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK = REPO / "out" / "reference-train"
DEFAULT_OUT = REPO / "common" / "reference_model"
MAX_WEIGHTS_BYTES = 30_000_000
CHECKPOINT = "checkpoint.pt"
LOSS_LOG = "loss_log.csv"
LOG_FIELDS = ["step", "train_loss", "lr", "tokens_seen", "elapsed_s", "heldout_loss", "grad_norm"]
DATA_FORMAT = 1  # bump when the token stream's layout changes
# arguments that determine the trained weights: a resumed run must use the same values
RESULT_ARGS = ("seed", "max_steps", "batch_size", "micro_batch", "seq_len", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
               "grad_clip", "vocab_size", "hidden_size", "intermediate_size", "layers", "heads", "kv_heads",
               "max_positions", "autocast", "max_train_files")


def log(message: str) -> None:
    tqdm.write(f"[train {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="work folder (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="export folder (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from WORK/checkpoint.pt if there is one")
    p.add_argument("--export-only", action="store_true",
                   help="export the latest checkpoint without training (marked partial if it has fewer than --max-steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=600, help="optimizer steps; sets the schedule (default: %(default)s)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="safety stop: after this many minutes of training in this invocation, checkpoint and exit "
                        "without exporting (continue with --resume)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: %(default)s)")
    p.add_argument("--micro-batch", type=int, default=8,
                   help="sequences per forward/backward, gradients accumulated over the batch (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens predicted per sequence (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr (default: %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary, specials included")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=688)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--max-positions", type=int, default=1024)
    p.add_argument("--autocast", choices=["none", "bf16"], default="none",
                   help="bf16 autocast, or none for float32 (default: %(default)s; bf16 is several times slower on CPUs "
                        "without native bf16, avx512_bf16/AMX)")
    p.add_argument("--max-train-files", type=int, default=None,
                   help="train on the first N training files only (smoke tests; the held-out set is unchanged)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch threads (default: all usable cores, %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu; the reference run is on cpu)")
    p.add_argument("--eval-every", type=int, default=100, help="held-out subset evaluation period in steps")
    p.add_argument("--eval-files", type=int, default=10, help="held-out files in the periodic evaluation")
    p.add_argument("--ckpt-every", type=int, default=100, help="checkpoint period in steps")
    p.add_argument("--log-every", type=int, default=50, help="plain log line period in steps")
    args = p.parse_args(argv)
    args.micro_batch = min(args.micro_batch, args.batch_size)
    if args.batch_size % args.micro_batch:
        p.error("--batch-size must be a multiple of --micro-batch")
    if args.seq_len > args.max_positions:
        p.error("--seq-len exceeds --max-positions")
    return args


def result_args(args) -> dict:
    return {k: getattr(args, k) for k in RESULT_ARGS}


def retrain_command(args) -> str:
    """The command that reproduces this run: every result-determining option spelled out."""
    parts = ["python", "scripts/train_reference_model.py"]
    for key in RESULT_ARGS:
        value = getattr(args, key)
        if value is None:
            continue
        parts += [f"--{key.replace('_', '-')}", str(value)]
    return " ".join(shlex.quote(p) for p in parts)


# ---------------------------------------------------------------------------------------------- data

def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_data(args) -> dict:
    """Tokenizer and training token stream in the work folder, rebuilt only when the corpus changes."""
    from transformers import PreTrainedTokenizerFast
    from hat.common.bpe_tokenizer import train_tokenizer

    work: Path = args.work
    files = corpus_files()
    train, heldout = split_corpus(files)
    if args.max_train_files is not None:
        train = train[:args.max_train_files]
    key = {
        "format": DATA_FORMAT,
        "stdlib_root": str(stdlib_root()),
        "train_fingerprint": corpus_fingerprint(train),
        "heldout_fingerprint": corpus_fingerprint(heldout),
        "vocab_size": args.vocab_size,
    }
    meta_path, tok_dir, stream_path = work / "data.json", work / "tokenizer", work / "train_tokens.npy"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if meta is not None and meta["key"] == key and tok_dir.is_dir() and stream_path.is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
        stream = np.load(stream_path, mmap_mode="r")
        if meta["tokenizer_sha256"] == sha256_file(tok_dir / "tokenizer.json") and len(stream) == meta["train"]["tokens"]:
            log(f"data: cached tokenizer and {len(stream):,} training tokens from {work}")
            return {**meta, "tokenizer": tokenizer, "stream": stream, "train_files": train, "heldout_files": heldout}
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    log(f"corpus: {len(files)} files under {stdlib_root()}: {len(train)} for training, {len(heldout)} held out")
    texts = [f.read() for f in train]
    log(f"training the tokenizer (byte-level BPE, {args.vocab_size} tokens) on {sum(map(len, texts)) / 1e6:.1f}M characters")
    tokenizer = train_tokenizer(texts, args.vocab_size)
    tokenizer.save_pretrained(tok_dir)
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
    log("encoding the training files")
    pieces = []
    for i in tqdm(range(0, len(texts), 64), desc="encode", unit="batch", leave=False):
        for ids in tokenizer(texts[i:i + 64])["input_ids"]:
            pieces.append(np.asarray(ids + [tokenizer.eos_token_id], dtype=dtype))
    stream = np.concatenate(pieces)
    tmp = stream_path.with_suffix(".tmp.npy")
    np.save(tmp, stream)
    os.replace(tmp, stream_path)
    meta = {
        "key": key,
        "prep_s": round(time.perf_counter() - t0, 1),
        "tokenizer_sha256": sha256_file(tok_dir / "tokenizer.json"),
        "train": {"files": len(train), "bytes": sum(f.path.stat().st_size for f in train), "tokens": int(len(stream))},
        "heldout": {"files": len(heldout), "bytes": sum(f.path.stat().st_size for f in heldout),
                    "relpaths": [f.relpath for f in heldout]},
    }
    meta_path.write_text(json.dumps(meta, indent=1))
    log(f"data: {len(stream):,} training tokens ({meta['train']['bytes'] / len(stream):.2f} bytes/token), "
        f"prepared in {meta['prep_s']:.0f} s")
    return {**meta, "tokenizer": tokenizer, "stream": stream, "train_files": train, "heldout_files": heldout}


def batch_for_step(stream: np.ndarray, seed: int, step: int, batch_size: int, seq_len: int) -> torch.Tensor:
    """[batch_size, seq_len + 1] token windows of step `step` (0-based), drawn from the seed alone."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(stream) - seq_len, size=batch_size)  # last window ends at the stream's end
    return torch.from_numpy(np.stack([stream[s:s + seq_len + 1] for s in starts]).astype(np.int64))


# --------------------------------------------------------------------------------------------- model

def build_config(args, vocab_size: int):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       max_position_embeddings=args.max_positions, tie_word_embeddings=True, rope_theta=10000.0,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights once


def lr_factor(step: int, args) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based)."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model, args):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, args))
    return optimizer, scheduler


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(args, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast == "bf16")


@torch.no_grad()
def eval_subset(model, tokenizer, files, device) -> float:
    model.eval()
    try:
        return mean_loss(heldout_scores(hf_logits_fn(model), tokenizer, files))
    finally:
        model.train()


# ---------------------------------------------------------------------------------------- checkpoint

def save_checkpoint(work: Path, state: dict) -> None:
    tmp = work / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, work / CHECKPOINT)


def write_loss_log(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, LOG_FIELDS)
        writer.writeheader()
        writer.writerows({k: fmt(v) for k, v in row.items()} for row in rows)


def fmt(value, digits=6):
    return "" if value is None else (f"{value:.{digits}g}" if isinstance(value, float) else value)


class StopRequest:
    """First SIGINT/SIGTERM: finish the step, checkpoint, exit. Second SIGINT: abort at once."""

    def __init__(self):
        self.requested = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log(f"{self.requested}: stopping after this step (again to abort without a checkpoint)")

    def restore(self):
        for s, handler in self._old.items():
            signal.signal(s, handler)


# ------------------------------------------------------------------------------------------ training

def train(args) -> int:
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = prepare_data(args)
    tokenizer, stream = data["tokenizer"], data["stream"]
    if len(stream) <= args.seq_len + 1:
        raise SystemExit(f"the training stream has only {len(stream)} tokens")
    data_id = {"train_fingerprint": data["key"]["train_fingerprint"], "tokenizer_sha256": data["tokenizer_sha256"],
               "train_tokens": data["train"]["tokens"]}

    config = build_config(args, len(tokenizer))
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model = LlamaForCausalLM(config).to(device)
    model.config.use_cache = False
    optimizer, scheduler = build_optimizer(model, args)
    n_params = count_parameters(model)

    if args.autocast == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        log("warning: this CPU has no native bfloat16 (avx512_bf16/AMX): bf16 autocast will be several times "
            "slower than float32")
    ckpt_path = args.work / CHECKPOINT
    step, elapsed, rows, sessions = 0, 0.0, [], []
    if ckpt_path.is_file():
        if not (args.resume or args.export_only):
            raise SystemExit(f"{ckpt_path} exists: pass --resume to continue it, or remove {args.work} to start over")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state["args"] != result_args(args):
            diff = {k: (state["args"].get(k), v) for k, v in result_args(args).items() if state["args"].get(k) != v}
            raise SystemExit(f"{ckpt_path} was trained with other settings (checkpoint, now): {diff}")
        if state["data"] != data_id:
            raise SystemExit(f"{ckpt_path} was trained on other data or another tokenizer: {state['data']} vs {data_id}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        step, elapsed, rows, sessions = state["step"], state["elapsed_s"], state["loss_log"], state["sessions"]
        log(f"resumed from {ckpt_path} at step {step}/{args.max_steps} ({elapsed / 60:.1f} min of training so far)")
    elif args.export_only:
        raise SystemExit(f"--export-only: no checkpoint in {args.work}")

    log(f"model: LlamaForCausalLM, {n_params:,} parameters ({n_params / 1e6:.2f}M), {args.layers} layers, "
        f"vocab {len(tokenizer)}; {args.batch_size} x {args.seq_len} = {args.batch_size * args.seq_len} tokens/step, "
        f"{args.max_steps} steps = {args.max_steps * args.batch_size * args.seq_len / 1e6:.1f}M tokens "
        f"({args.max_steps * args.batch_size * args.seq_len / len(stream):.2f} epochs); {args.threads} threads, "
        f"autocast {args.autocast}, device {device}")

    def checkpoint_state():
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "numpy": f"per step: numpy.random.default_rng([{args.seed}, step])"},
                "step": step, "elapsed_s": elapsed, "loss_log": rows, "sessions": sessions,
                "args": result_args(args), "data": data_id, "parameters": n_params}

    if not args.export_only and step < args.max_steps:
        session = {"start_step": step, "threads": args.threads, "device": str(device), "started": time.time()}
        sessions.append(session)
        log_path = args.work / LOSS_LOG
        write_loss_log(log_path, rows)
        log_fh = open(log_path, "a", newline="")
        writer = csv.DictWriter(log_fh, LOG_FIELDS)
        eval_files = data["heldout_files"][:args.eval_files]
        tokens_per_step = args.batch_size * args.seq_len
        accum = args.batch_size // args.micro_batch
        stop = StopRequest()
        t_session = time.perf_counter()
        session_steps, session_train_s = 0, 0.0
        bar = tqdm(total=args.max_steps, initial=step, unit="step", dynamic_ncols=True, desc="train",
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)
        stop_reason = None
        model.train()
        try:
            while step < args.max_steps:
                t0 = time.perf_counter()
                batch = batch_for_step(stream, args.seed, step, args.batch_size, args.seq_len).to(device)
                loss_sum = 0.0
                for micro in batch.split(args.micro_batch):
                    with autocast(args, device):
                        logits = model(input_ids=micro[:, :-1], use_cache=False).logits
                    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), micro[:, 1:].reshape(-1))
                    (loss / accum).backward()
                    loss_sum += loss.item()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip).item()
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                dt = time.perf_counter() - t0
                session_steps, session_train_s = session_steps + 1, session_train_s + dt
                heldout = None
                if step % args.eval_every == 0 or step == args.max_steps:
                    heldout = eval_subset(model, tokenizer, eval_files, device)
                elapsed += time.perf_counter() - t0
                row = {"step": step, "train_loss": loss_sum / accum, "lr": lr, "tokens_seen": step * tokens_per_step,
                       "elapsed_s": round(elapsed, 2), "heldout_loss": heldout, "grad_norm": grad_norm}
                rows.append(row)
                writer.writerow({k: fmt(v) for k, v in row.items()})
                log_fh.flush()
                tok_s = session_steps * tokens_per_step / session_train_s
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}", refresh=False)
                bar.update(1)
                if heldout is not None:
                    log(f"step {step}: held-out loss ({len(eval_files)} files) {heldout:.4f}")
                if step % args.log_every == 0:
                    recent = [r["train_loss"] for r in rows[-args.log_every:]]
                    log(f"step {step}/{args.max_steps}: train loss {sum(recent) / len(recent):.4f} "
                        f"(mean of last {len(recent)}), lr {lr:.2e}, {tok_s:,.0f} tokens/s, "
                        f"{session_steps / session_train_s:.3f} steps/s, {elapsed / 60:.1f} min")
                if stop.requested:
                    stop_reason = stop.requested
                elif args.max_minutes is not None and time.perf_counter() - t_session > args.max_minutes * 60:
                    stop_reason = f"--max-minutes {args.max_minutes}"
                t_ck = time.perf_counter()
                if step % args.ckpt_every == 0 or step == args.max_steps or stop_reason:
                    session.update(end_step=step, train_s=session_train_s)
                    save_checkpoint(args.work, checkpoint_state())
                    elapsed += time.perf_counter() - t_ck
                if stop_reason:
                    break
        finally:
            bar.close()
            log_fh.close()
            stop.restore()
        session.update(end_step=step, train_s=session_train_s)
        if session_steps:
            log(f"this session: {session_steps} steps in {session_train_s:.0f} s: "
                f"{session_steps / session_train_s:.3f} steps/s, "
                f"{session_steps * tokens_per_step / session_train_s:,.0f} tokens/s")
        if stop_reason:
            log(f"stopped by {stop_reason} at step {step}/{args.max_steps}, checkpoint saved; continue with: "
                f"{retrain_command(args)} --resume" + ("" if args.work == DEFAULT_WORK else f" --work {args.work}")
                + ("" if args.out == DEFAULT_OUT else f" --out {args.out}"))
            return 3
        save_checkpoint(args.work, checkpoint_state())
    if step < args.max_steps:
        log(f"exporting a PARTIAL model: step {step} of {args.max_steps}")
    export(args, model, tokenizer, data, n_params, step, elapsed, rows, sessions)
    return 0


# -------------------------------------------------------------------------------------------- export

def export(args, model, tokenizer, data, n_params, step, elapsed, rows, sessions) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    t0 = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "model.safetensors.index.json"):
        (out / name).unlink(missing_ok=True)
    model = copy.deepcopy(model).to("cpu", torch.bfloat16)  # the training copy keeps its float32 weights
    model.config.use_cache = True
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    weights = out / "model.safetensors"
    size = weights.stat().st_size
    if size >= MAX_WEIGHTS_BYTES:
        raise SystemExit(f"{weights} is {size / 1e6:.1f} MB, over the {MAX_WEIGHTS_BYTES / 1e6:.0f} MB limit")
    log(f"exported to {out}: model.safetensors {size / 1e6:.1f} MB (bfloat16)")

    # read back the way users will, and score the whole held-out set with the exported weights
    tok2 = AutoTokenizer.from_pretrained(out)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    heldout = data["heldout_files"]
    sample = read_text(heldout[1] if len(heldout) > 1 else heldout[0])[:4000]
    if tok2(sample)["input_ids"] != tokenizer(sample)["input_ids"]:
        raise SystemExit("the exported tokenizer encodes differently from the trained one")
    log(f"evaluating the exported model on the {len(heldout)} held-out files")
    scores = heldout_scores(hf_logits_fn(hf), tok2, heldout)
    loss = mean_loss(scores)
    log(f"held-out loss {loss:.4f} nats/token, perplexity {math.exp(loss):.2f}, {sum(s.tokens for s in scores):,} tokens")

    # the project's runtime, cut in three, against transformers on one held-out window
    ids = torch.tensor(tok2(read_text(heldout[1] if len(heldout) > 1 else heldout[0]))["input_ids"][:EVAL_WINDOW])
    n = model.config.num_hidden_layers
    cuts = (min(2, n - 2), n - 1) if n >= 3 else (1,) if n == 2 else ()  # device K=2, cloud, device M=1
    with torch.no_grad():
        ref = hf_logits_fn(hf)(ids)
        got = runtime_logits_fn(out, cuts)(ids)
    diff = (got - ref).abs().max().item()
    runtime_ok = diff < 1e-3 and torch.equal(got.argmax(-1), ref.argmax(-1))
    log(f"runtime check (cuts {cuts}, {len(ids)} tokens): max |logit diff| vs transformers {diff:.2e}"
        + ("" if runtime_ok else "  <-- MISMATCH"))
    if not runtime_ok:
        raise SystemExit("the project's runtime disagrees with transformers on the exported model")

    write_loss_log(out / LOSS_LOG, rows)
    summary = make_summary(args, model, data, n_params, step, elapsed, rows, sessions, scores, loss,
                           {"cuts": list(cuts), "tokens": len(ids), "max_abs_logit_diff": diff},
                           export_s=time.perf_counter() - t0, weights_bytes=size)
    (out / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card(summary, rows))
    log(f"wrote {out / 'MODEL_CARD.md'} and {out / 'training_summary.json'}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_summary(args, model, data, n_params, step, elapsed, rows, sessions, scores, loss, runtime,
                 export_s, weights_bytes) -> dict:
    import tokenizers
    import transformers

    tokens_per_step = args.batch_size * args.seq_len
    train_s = sum(s.get("train_s", 0.0) for s in sessions)
    cfg = model.config
    heldout_files = {f.relpath: f for f in data["heldout_files"]}
    evals = [{"step": r["step"], "loss": r["heldout_loss"]} for r in rows if r["heldout_loss"] is not None]
    return {
        "heldout_loss": loss,
        "heldout_perplexity": math.exp(loss),
        "complete": step >= args.max_steps,
        "model": {
            "architecture": "LlamaForCausalLM", "parameters": n_params, "weights_dtype": "bfloat16",
            "weights_bytes": weights_bytes, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "layers": cfg.num_hidden_layers,
            "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
            "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": True, "rope_theta": 10000.0,
        },
        "corpus": {
            "definition": (f'every *.py under sysconfig.get_paths()["stdlib"] recursively, no path with a site-packages '
                           f'component, sorted by POSIX relative path; text = bytes decoded as UTF-8 with '
                           f'errors="replace", newlines untouched; held out: sha256(relpath)[0] < {HELDOUT_HASH_BELOW}'),
            "python": platform.python_version(), "implementation": platform.python_implementation(),
            "stdlib_root": data["key"]["stdlib_root"],
            "train": {**data["train"], "fingerprint": data["key"]["train_fingerprint"],
                      "max_train_files": args.max_train_files},
            "heldout": {"files": data["heldout"]["files"], "bytes": data["heldout"]["bytes"],
                        "tokens": sum(s.tokens for s in scores), "fingerprint": data["key"]["heldout_fingerprint"]},
        },
        "tokenizer": {"kind": "byte-level BPE (hat.common.bpe_tokenizer.train_tokenizer) on the training files",
                      "vocab_size": args.vocab_size, "specials": {"<pad>": 0, "<s>": 1, "</s>": 2},
                      "tokenizer_json_sha256": data["tokenizer_sha256"]},
        "training": {
            "seed": args.seed, "steps": step, "max_steps": args.max_steps, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "tokens_per_step": tokens_per_step, "tokens_seen": step * tokens_per_step,
            "epochs": step * tokens_per_step / data["train"]["tokens"],
            "optimizer": {"name": "AdamW", "lr": args.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                          "weight_decay": args.weight_decay, "warmup_steps": args.warmup_steps,
                          "schedule": f"linear warmup, cosine to {args.min_lr_ratio} x peak",
                          "min_lr_ratio": args.min_lr_ratio, "grad_clip": args.grad_clip},
            "autocast": args.autocast, "wall_time_s": elapsed, "step_time_s": train_s,
            "data_prep_s": data["prep_s"], "export_eval_s": export_s,
            "steps_per_s": step / train_s if train_s else None,
            "tokens_per_s": step * tokens_per_step / train_s if train_s else None,
            "sessions": [{k: v for k, v in s.items() if k != "started"} for s in sessions],
            "final_train_loss_mean_last_50": (sum(r["train_loss"] for r in rows[-50:]) / len(rows[-50:])) if rows else None,
            "heldout_subset": {"files": args.eval_files, "evals": evals},
        },
        "heldout": {
            "loss": loss, "perplexity": math.exp(loss), "tokens": sum(s.tokens for s in scores), "files": len(scores),
            "window": EVAL_WINDOW,
            "measured_with": "exported bfloat16 weights loaded by transformers in float32; "
                             "hat.common.reference_corpus.heldout_loss",
            "per_file": [{"relpath": s.relpath, "sha256": heldout_files[s.relpath].sha256(), "tokens": s.tokens,
                          "nll": s.nll, "loss": s.loss if s.tokens else None} for s in scores],
        },
        "runtime_check": runtime,
        "machine": {"cpu": cpu_name(), "threads": args.threads, "device": args.device, "platform": platform.platform()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "numpy": np.__version__},
        "command": retrain_command(args),
    }


def curve_table(rows: list[dict], max_steps: int, points: int = 10, window: int = 50) -> list[str]:
    if not rows:
        return []
    marks = sorted({max(1, round(max_steps * i / points)) for i in range(1, points + 1)} | {min(window, max_steps)})
    by_step = {r["step"]: i for i, r in enumerate(rows)}
    evals = {r["step"]: r["heldout_loss"] for r in rows if r["heldout_loss"] is not None}
    lines = ["| step | tokens seen | train loss (mean of the preceding 50 steps) | lr | held-out loss (subset) |",
             "|---:|---:|---:|---:|---:|"]
    for m in marks + sorted(s for s in evals if s not in marks):
        if m not in by_step:
            continue
        i = by_step[m]
        recent = rows[max(0, i - window + 1):i + 1]
        mean = sum(r["train_loss"] for r in recent) / len(recent)
        held = evals.get(m)
        lines.append(f"| {m} | {rows[i]['tokens_seen'] / 1e6:.2f}M | {mean:.3f} | {rows[i]['lr']:.2e} | "
                     f"{'' if held is None else f'{held:.3f}'} |")
    header, rest = lines[:2], lines[2:]
    rest.sort(key=lambda line: int(line.split("|")[1]))
    return header + rest


def model_card(s: dict, rows: list[dict]) -> str:
    m, c, t, h = s["model"], s["corpus"], s["training"], s["heldout"]
    partial = "" if s["complete"] else (f"\n> **Partial model**: exported at step {t['steps']} of {t['max_steps']}; "
                                        f"the schedule did not finish and the figures below are not the reference run's.\n")
    curve = "\n".join(curve_table(rows, t["max_steps"]))
    return f"""# hatserve reference model

A {m['parameters'] / 1e6:.2f}M-parameter Llama ({m['layers']} decoder layers) trained from scratch on the Python
standard library's source, on CPU, by `scripts/train_reference_model.py`. It is the project's reference
checkpoint: small enough to ship with the package, real enough that its output is Python-like text, and
deep enough to cut into device and cloud parts meaningfully. It is a test and demo model, not a useful
code assistant.
{partial}
## Model

| | |
|---|---|
| architecture | `LlamaForCausalLM` (transformers layout; loads with `AutoModelForCausalLM` and the hat runtime) |
| parameters | {m['parameters']:,} (tied input/output embeddings counted once) |
| layers / hidden / MLP | {m['layers']} / {m['hidden_size']} / {m['intermediate_size']} |
| heads | {m['heads']} query, {m['kv_heads']} key-value (head dim {m['hidden_size'] // m['heads']}) |
| context | {m['max_position_embeddings']} positions (trained on {t['seq_len']}-token windows), rope theta {m['rope_theta']:g} |
| vocabulary | {m['vocab_size']} byte-level BPE tokens; `<pad>`, `<s>`, `</s>` = 0, 1, 2; `<s>` is prepended to every encoding |
| weights | `model.safetensors`, {m['weights_dtype']}, {m['weights_bytes'] / 1e6:.1f} MB |

## Corpus

{c['definition']}.

Built from {c['implementation']} {c['python']}'s standard library (`{c['stdlib_root']}`); another Python
version gives another corpus. Fingerprints (sha256 over relative paths and file contents): training
`{c['train']['fingerprint'][:16]}...`, held-out `{c['heldout']['fingerprint'][:16]}...`.

| | files | bytes | tokens |
|---|---:|---:|---:|
| training | {c['train']['files']:,} | {c['train']['bytes']:,} | {c['train']['tokens']:,} (each file as `<s>` + text + `</s>`) |
| held-out | {c['heldout']['files']:,} | {c['heldout']['bytes']:,} | {c['heldout']['tokens']:,} (predicted tokens) |

The tokenizer and the model saw only the training files. The held-out files are listed, with their
sha256 and per-file scores, in `training_summary.json`.

## Training

| | |
|---|---|
| seed | {t['seed']} |
| steps | {t['steps']:,} of {t['max_steps']:,} ({t['batch_size']} x {t['seq_len']} = {t['tokens_per_step']:,} tokens per step) |
| tokens seen | {t['tokens_seen']:,} ({t['epochs']:.2f} epochs of the training stream) |
| optimizer | AdamW, peak lr {t['optimizer']['lr']:g}, betas 0.9/0.95, weight decay {t['optimizer']['weight_decay']:g} (not on norms), {t['optimizer']['warmup_steps']} warmup steps then cosine to {t['optimizer']['min_lr_ratio']:g} x peak, grad clip {t['optimizer']['grad_clip']:g} |
| precision | {'bfloat16 autocast with float32 master weights and loss' if t['autocast'] == 'bf16' else 'float32'}; exported in bfloat16 |
| data order | step s trains on windows of {t['seq_len'] + 1} tokens at starts drawn by `numpy.random.default_rng([seed, s])` |
| machine | {s['machine']['cpu']}, {s['machine']['threads']} threads, device {s['machine']['device']} |
| wall time | {t['wall_time_s'] / 60:.1f} min of training ({t['steps_per_s'] or 0:.3f} steps/s, {t['tokens_per_s'] or 0:,.0f} tokens/s), plus {t['data_prep_s']:.0f} s data preparation and {t['export_eval_s']:.0f} s export and evaluation |
| versions | Python {s['versions']['python']}, torch {s['versions']['torch']}, transformers {s['versions']['transformers']}, tokenizers {s['versions']['tokenizers']}, numpy {s['versions']['numpy']} |

Loss curve (full log: `loss_log.csv`; held-out subset = the first {t['heldout_subset']['files']} held-out files, float32 master weights):

{curve}

Final training loss (mean of the last 50 steps): {t['final_train_loss_mean_last_50']:.4f} nats/token.

## Held-out evaluation

**Held-out cross-entropy: {h['loss']:.4f} nats/token (perplexity {h['perplexity']:.2f})** over all {h['files']}
held-out files, {h['tokens']:,} predicted tokens, measured on the exported bfloat16 weights loaded by
transformers in float32.

Definition (`hat.common.reference_corpus.heldout_loss`): each file is encoded with `<s>` prepended and
cut into windows of up to {h['window'] + 1} tokens overlapping by one (window k = tokens
[{h['window']}k, {h['window']}k + {h['window'] + 1})); every token after `<s>` is predicted once from the tokens before it
in its window; the loss is the mean cross-entropy over all predicted tokens of all files.

The hat runtime (load_model_spec + load_tensors + ModelPart, cut at layers {s['runtime_check']['cuts']}) reproduces
transformers' float32 logits on a {s['runtime_check']['tokens']}-token held-out window within
{s['runtime_check']['max_abs_logit_diff']:.1e} (max absolute difference).

## Retraining

From the repository root, on an otherwise idle CPU machine with this Python version ({t['wall_time_s'] / 60:.0f} min of
training here):

```bash
{s['command']} --resume
```

`--resume` continues an interrupted run from `out/reference-train/checkpoint.pt` (checkpoints every
100 steps); the batches of every step follow from the seed, so an interrupted and resumed run trains
on the same data as an uninterrupted one. A clean run with the same seed, corpus and versions
reproduces the held-out loss (the step count, not wall time, fixes the result). `--help` lists the
options.
"""


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work = args.work.resolve()
    args.out = args.out.resolve()
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
