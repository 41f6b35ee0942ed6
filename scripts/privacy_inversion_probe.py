#!/usr/bin/env python
"""How much of a prompt an attacker who sees the uplink hidden states can recover, per split point K.

The device runs the first K decoder layers and sends their output, one hidden-state vector per prompt token,
to the cloud. Token ids never leave the device, but whoever holds the cloud part sees those vectors. This
script plays that attacker: a probe learns to map the hidden state at position t to the token at t (a learned
inversion) from text the attacker has, and is scored on text it never saw. Beside each K it prints what that K
costs the device per generated token (privacy_device_cost.py), so a user chooses K knowingly.

Model (--model): the project's default model (smollm2-135m-instruct, from the store) unless told otherwise;
`--model reference` is the 10.8M toy model. Text (--data, auto: chat when the tokenizer has a chat template):
- chat: the attacker trains on ShareGPT conversations and is scored on MT-Bench's first turns and HumanEval's
  prompts, everything in the model's chat template as a device runs it; only the user's text is scored
  (privacy_chat_text.py). Defaults: K = 1,2,4,8; 200,000 training positions (--quick: 40,000); windows of 512;
  the LDA and nearest probes.
- corpus: the reference corpus's training and held-out files, windows of --seq-len tokens (<s> then up to
  seq-len - 1 tokens of one file; files in a seeded random order, round robin: every file's first window before
  any file's second), --train-tokens and --eval-tokens positions (the <s> not counted). Defaults: K =
  1,2,3,4,6,8,10; 40,000 and 20,000 positions; windows of 256; the linear and MLP probes.
Per K of --input-layers, and first K=0 (the raw embeddings: a check that the probe works; --skip-embedding):
  1. One forward pass per window (windows of equal length batched, only the layers up to the deepest K) gives
     `hidden_states[K]`, exactly what a device with `--input-layers K` sends, float32.
  2. Probes on the training pairs, inputs standardised per feature with the training mean and std (the hidden
     states' scale grows with depth): "lda", linear discriminant analysis in closed form (one Gaussian per token
     id, a shared shrunk covariance: one pass and a d x d solve, affordable with a real vocabulary on a CPU);
     "linear", a softmax classifier; "mlp", Linear -> GELU -> Linear (--probe-width wide), these two trained
     with Adam at a cosine-decayed rate for --epochs passes in minibatches. Their classes are the token ids seen
     in training: they cannot name another. "nearest", the attacker who also holds the (open) model's weights:
     a ridge map from the states to the input embeddings, then the nearest embedding of the whole vocabulary
     (closed form; not capped by the coverage).
  3. The better probe (scored top-1) is the row's figure: top-1 recovery is the fraction of scored positions
     whose exact id the probe names first, top-5 the fraction within its five best guesses (chat: per set too).
References printed with the table: the majority baseline (always the most frequent training token; top-5:
the five most frequent) and the coverage (scored tokens whose id occurs in the training pairs: the ceiling of
any learned probe, which K=0 should nearly reach).

Context: the published figure for a 7B model is about 59% of tokens recovered from the hidden states at a
2-layer split and 35% at 8 layers. This measures one attacker (a probe per position, no context), a lower
bound on what a stronger one recovers. The split point is the user's choice: this shows what it costs in
privacy, and what a deeper split costs the device.

Time (this project's 2-core CPU machine, one thread, shared with other jobs): chat on SmolLM2 with the
defaults about 20 minutes (measured 1188 s: 512 s running 9 layers over 228,501 positions, then 109-159 s per
K for the two closed-form probes, most of it scoring the nearest probe over the 49,152-token vocabulary;
memory about 3 GB, every K's states held at once); --quick runs 40,000 training positions (with -K up to 24
and the softmax probe at 2 epochs: 893 s). Corpus on the reference model with its defaults: 7 to 13 minutes (26-36 s to read the text and run
the model once, then 47-81 s per K, most of it the MLP probe). torch's default of one thread per core suffers
when another job holds a core: use --threads 1 on a shared machine. Time grows linearly with --train-tokens
(and --epochs for the gradient probes); more training tokens make a stronger attacker (they raise the coverage).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

PUBLISHED = {"model": "7B", "recovered": {2: 0.59, 8: 0.35}}  # the published figure, top-1 per split point
MIN_WINDOW = 16  # a file's tail shorter than this many tokens is not a window
PROBE_KINDS = ("linear", "mlp", "lda", "nearest")
# Adam's peak rate per kind: the best held-out top-1 among 2e-3 to 3e-2 at K = 2 and 8 of the reference model
DEFAULT_LR = {"linear": 1e-2, "mlp": 5e-3}


def log(message: str) -> None:
    print(f"[probe {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_layers(text: str) -> list[int]:
    return sorted({int(v) for v in text.split(",") if v.strip()})


# per data mode: K measured, training tokens (--quick's), held-out tokens, window length, probes
MODE_DEFAULTS = {
    "corpus": dict(input_layers="1,2,3,4,6,8,10", train_tokens=40_000, quick_tokens=10_000, eval_tokens=20_000,
                   seq_len=256, probes="linear,mlp"),
    "chat": dict(input_layers="1,2,4,8", train_tokens=200_000, quick_tokens=40_000, eval_tokens=None, seq_len=512,
                 probes="lda,nearest"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a store name (`hat pull --list`), `reference` (the 10.8M model) or a checkpoint "
                   "folder (default: the project's default model, smollm2-135m-instruct)")
    p.add_argument("--data", choices=("auto", "corpus", "chat"), default="auto",
                   help="corpus: the reference corpus's training and held-out files; chat: ShareGPT to train, MT-Bench "
                   "and HumanEval prompts to score, in the chat template; auto: chat when the tokenizer has a chat "
                   "template (default: %(default)s)")
    p.add_argument("--input-layers", "-K", help="split points K measured, comma-separated (default: corpus "
                   f"{MODE_DEFAULTS['corpus']['input_layers']}, chat {MODE_DEFAULTS['chat']['input_layers']})")
    p.add_argument("--skip-embedding", action="store_true", help="leave out the K=0 row (the raw embeddings)")
    p.add_argument("--seq-len", type=int, help="tokens per training window, its start included (default: corpus "
                   f"{MODE_DEFAULTS['corpus']['seq_len']}, chat {MODE_DEFAULTS['chat']['seq_len']})")
    p.add_argument("--train-tokens", type=int, help="token positions the attacker trains on (default: corpus "
                   f"{MODE_DEFAULTS['corpus']['train_tokens']}, chat {MODE_DEFAULTS['chat']['train_tokens']})")
    p.add_argument("--quick", action="store_true", help="fewer training tokens (corpus "
                   f"{MODE_DEFAULTS['corpus']['quick_tokens']}, chat {MODE_DEFAULTS['chat']['quick_tokens']}): a weaker "
                   "attacker, a few minutes")
    p.add_argument("--eval-tokens", type=int, help="corpus: token positions scored, held-out split (default: "
                   f"{MODE_DEFAULTS['corpus']['eval_tokens']}); chat scores every prompt whole")
    p.add_argument("--epochs", type=int, default=4, help="passes over the training pairs, gradient probes (default: %(default)s)")
    p.add_argument("--probe-width", type=int, default=1024, help="the MLP probe's hidden width (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=512, help="minibatch (default: %(default)s)")
    p.add_argument("--lr", type=float, help="Adam's peak learning rate, every probe (default: "
                   + ", ".join(f"{kind} {lr:g}" for kind, lr in DEFAULT_LR.items()) + ")")
    p.add_argument("--lda-shrinkage", type=float, default=LDA_SHRINKAGE,
                   help="the LDA probe's ridge on its standardised covariance (default: %(default)g)")
    p.add_argument("--probes", help=f"probes trained per K, of {', '.join(PROBE_KINDS)} (default: corpus "
                   f"{MODE_DEFAULTS['corpus']['probes']}, chat {MODE_DEFAULTS['chat']['probes']})")
    p.add_argument("--device-rounds", type=int, default=40,
                   help="decode steps timed per part for the device's time per token (0: not measured; default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: 0, torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the figures and settings to this file")
    p.add_argument("--markdown", type=Path, help="write the table (markdown) to this file")
    args = p.parse_args(argv)
    args.parser = p
    return args


def apply_mode_defaults(args: argparse.Namespace, mode: str) -> None:
    """Fill what the command line left unset with `mode`'s defaults, then check the settings."""
    p, defaults = args.parser, MODE_DEFAULTS[mode]
    args.data = mode
    if mode == "chat" and args.eval_tokens is not None:
        p.error("--eval-tokens: chat data scores every MT-Bench and HumanEval prompt whole")
    for key in ("input_layers", "seq_len", "probes", "eval_tokens"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.train_tokens is None:
        args.train_tokens = defaults["quick_tokens" if args.quick else "train_tokens"]
    args.layers = parse_layers(args.input_layers)
    if not args.skip_embedding and 0 not in args.layers:
        args.layers.insert(0, 0)
    args.probe_kinds = [v.strip() for v in args.probes.split(",") if v.strip()]
    unknown = set(args.probe_kinds) - set(PROBE_KINDS)
    if unknown or not args.probe_kinds:
        p.error(f"--probes: unknown {', '.join(sorted(unknown)) or '(none given)'}; known: {', '.join(PROBE_KINDS)}")
    if not args.layers:
        p.error("no split point to measure")
    if (min(args.layers) < 0 or args.seq_len < 2 or args.train_tokens < 1 or (args.eval_tokens or 1) < 1
            or args.epochs < 1 or args.device_rounds < 0):
        p.error("K >= 0, --seq-len >= 2 and positive token counts and epochs, please")


# ----------------------------------------------------------------------------------------------- data

def sample_windows(files: Sequence, tokenizer, max_tokens: int, seq_len: int, seed: int) -> list[list[int]]:
    """Token-id windows: <s> then up to seq_len - 1 consecutive tokens of one file, `max_tokens` tokens in all
    (<s> not counted). Files in a seeded random order, each cut into consecutive pieces taken in a seeded random
    order, round robin over the files (every file's first piece before any file's second); pieces shorter than
    MIN_WINDOW are skipped (the last window is cut to the budget). `files` are CorpusFiles or paths."""
    from hat.common.reference_corpus import read_text

    rng = random.Random(seed)
    order = list(files)
    rng.shuffle(order)
    bos = tokenizer.bos_token_id
    size = seq_len - 1 if bos is not None else seq_len
    pieces: dict[int, list[list[int]]] = {}
    windows: list[list[int]] = []
    total, round_ = 0, 0
    while total < max_tokens:
        took = False
        for i, f in enumerate(order):
            if i not in pieces:  # tokenized when first needed: a small budget reads few files
                ids = tokenizer(read_text(f), add_special_tokens=False)["input_ids"]
                cut = [ids[s:s + size] for s in range(0, len(ids), size)]
                pieces[i] = [c for c in cut if len(c) >= MIN_WINDOW]
                rng.shuffle(pieces[i])
            if round_ < len(pieces[i]):
                piece = pieces[i][round_][:max_tokens - total]
                windows.append(([bos] if bos is not None else []) + piece)
                total += len(piece)
                took = True
                if total >= max_tokens:
                    break
        if not took:  # every file exhausted: fewer tokens than asked
            break
        round_ += 1
    return windows


@torch.no_grad()
def collect_states(model, windows: Sequence[Sequence[int]], layers: Sequence[int], skip_first: bool = True,
                   batch_size: int = 8, desc: str = "forward",
                   keep: Sequence[Sequence[bool]] | None = None) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """({K: hidden states [N, hidden] float32}, token ids [N]) for every position of every window, in order (the
    first of each left out when `skip_first`, the <s>): `hidden_states[K]` of one forward per window, the output of
    the first K decoder layers (K=0: the embeddings). Windows of equal length run together, up to `batch_size` at a
    time (no padding: each is computed as if alone). `keep` (a mask per window, its length): the positions taken,
    instead of all but the first. Only the layers up to max(layers) + 1 run (the hidden state after the last one
    run has the final norm applied, which no device sends), nor the LM head."""
    num_layers = model.config.num_hidden_layers
    if any(k < 0 or k >= num_layers for k in layers):
        raise ValueError(f"split points must lie in [0, {num_layers}) for a {num_layers}-layer model: got "
                         f"{list(layers)} (hidden_states[{num_layers}] is after the final norm, which no device sends)")
    decoder = model.get_decoder()
    device = next(model.parameters()).device
    start = 1 if skip_first else 0
    by_length: dict[int, list[int]] = {}
    for i, window in enumerate(windows):
        by_length.setdefault(len(window), []).append(i)
    batches = [group[j:j + batch_size] for group in by_length.values() for j in range(0, len(group), batch_size)]
    per_window: list[dict[int, torch.Tensor]] = [{}] * len(windows)
    if keep is None:
        keep = [[j >= start for j in range(len(window))] for window in windows]
    elif [len(mask) for mask in keep] != [len(window) for window in windows]:
        raise ValueError("keep: one mask per window, as long as it")
    all_layers = decoder.layers
    decoder.layers = all_layers[:max(layers) + 1]  # the layers past the deepest K asked for need not run
    try:
        with tqdm(total=sum(map(len, windows)), desc=desc, unit="tok", file=sys.stderr, leave=False) as bar:
            for batch in batches:
                ids = torch.tensor([windows[i] for i in batch], dtype=torch.long, device=device)
                hidden = decoder(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
                for row, i in enumerate(batch):
                    mask = torch.tensor(keep[i], dtype=torch.bool, device=device)
                    per_window[i] = {k: hidden[k][row, mask].float().cpu() for k in layers}
                bar.update(ids.numel())
    finally:
        decoder.layers = all_layers
    states = {k: torch.cat([w[k] for w in per_window]) if windows else torch.empty(0, model.config.hidden_size)
              for k in layers}
    tokens = torch.tensor([t for window, mask in zip(windows, keep) for t, kept in zip(window, mask) if kept],
                          dtype=torch.long)
    return states, tokens


# ----------------------------------------------------------------------------------------------- probes

@dataclass
class Probe:
    """A trained inversion probe: standardisation, a network over the seen classes, the classes' token ids."""
    kind: str
    net: nn.Module
    mean: torch.Tensor
    std: torch.Tensor
    classes: torch.Tensor  # token id of each output
    train_loss: float  # mean cross-entropy of the last epoch

    @torch.no_grad()
    def topk(self, states: torch.Tensor, k: int, batch: int = 4096) -> torch.Tensor:
        """The k most likely token ids per row, best first: [N, min(k, classes)]."""
        self.net.eval()
        out = []
        for i in range(0, len(states), batch):
            logits = self.net((states[i:i + batch] - self.mean) / self.std)
            out.append(self.classes[logits.topk(min(k, logits.shape[1]), dim=1).indices])
        return torch.cat(out) if out else torch.empty(0, k, dtype=torch.long)


LDA_SHRINKAGE = 3e-3  # the LDA probe's ridge on the pooled within-class covariance of the standardised states: the best
# held-out top-1 among 1e-3 to 0.2 at K = 2 and 8 of the reference model (20,000 training tokens; 1e-3 to 1e-2 within 0.5%)
NEAREST_RIDGE = 1e-4  # the nearest probe's ridge (times the rows) on its map from standardised states to embeddings: the best held-out
# top-1 among 1e-4 to 1e-2 at K = 2 and 8 of the reference model
LDA_LOSS_ROWS = 8192  # training rows the closed-form probes' recorded training loss is computed on


def make_net(kind: str, hidden: int, classes: int, width: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(hidden, classes)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, classes))
    raise ValueError(f"unknown probe kind {kind!r}")


@torch.no_grad()
def fit_lda(states: torch.Tensor, tokens: torch.Tensor, shrinkage: float = LDA_SHRINKAGE, chunk: int = 65536) -> Probe:
    """The closed-form attacker: linear discriminant analysis, one Gaussian per token id seen in training, all
    sharing one covariance (the pooled within-class covariance of the standardised states plus `shrinkage` times
    the identity), each weighted by its training frequency. Its score for class c is x'S^-1 m_c - m_c'S^-1 m_c / 2
    + log p_c: a linear layer, fitted in one pass (sums and a d x d solve) instead of epochs of gradient steps
    over tens of thousands of classes, which is what makes a real vocabulary affordable on a CPU."""
    mean, std = states.mean(0), states.std(0).clamp_min(1e-6)
    classes, targets = torch.unique(tokens, return_inverse=True)
    d, n = states.shape[1], len(states)
    sums = torch.zeros(len(classes), d, dtype=torch.float64)
    scatter = torch.zeros(d, d, dtype=torch.float64)
    for i in range(0, n, chunk):
        x = ((states[i:i + chunk] - mean) / std).double()
        sums.index_add_(0, targets[i:i + chunk], x)
        scatter += x.T @ x
    counts = torch.bincount(targets, minlength=len(classes)).double()
    means = sums / counts[:, None]
    within = (scatter - means.T @ sums) / n  # sum of x x' less each class's n_c m_c m_c'
    covariance = within + shrinkage * torch.eye(d, dtype=torch.float64)
    weight = torch.linalg.solve(covariance, means.T)  # S^-1 m_c, [d, classes]
    bias = -0.5 * (means * weight.T).sum(1) + torch.log(counts / n)
    net = nn.Linear(d, len(classes))
    net.weight.copy_(weight.T.float())
    net.bias.copy_(bias.float())
    net.eval()
    # the training cross-entropy of this closed-form probe, for the row's record: on the first LDA_LOSS_ROWS rows
    # (over every row it would cost more than the fit)
    rows = min(n, LDA_LOSS_ROWS)
    loss = F.cross_entropy(net((states[:rows] - mean) / std), targets[:rows]).item()
    return Probe("lda", net, mean, std, classes, loss)


@torch.no_grad()
def fit_nearest(states: torch.Tensor, tokens: torch.Tensor, embeddings: torch.Tensor, ridge: float = NEAREST_RIDGE,
                chunk: int = 65536) -> Probe:
    """The attacker who also holds the model's weights (an open model's are public): a ridge-regression map from the
    standardised states to the input embeddings of their tokens (`embeddings`: [vocab, hidden], the model's), then
    the vocabulary's embedding nearest to the mapped state (Euclidean). Its classes are the whole vocabulary, so it
    can name tokens never seen in training: it is not capped by the coverage."""
    mean, std = states.mean(0), states.std(0).clamp_min(1e-6)
    d, n = states.shape[1], len(states)
    gram = torch.zeros(d, d, dtype=torch.float64)
    cross = torch.zeros(d, embeddings.shape[1], dtype=torch.float64)
    for i in range(0, n, chunk):
        x = ((states[i:i + chunk] - mean) / std).double()
        gram += x.T @ x
        cross += x.T @ embeddings[tokens[i:i + chunk]].double()
    mapping = torch.linalg.solve(gram + ridge * n * torch.eye(d, dtype=torch.float64), cross)  # [d, embedding width]
    table = embeddings.double()
    # nearest embedding: argmax of 2 x'W e_v - |e_v|^2, a linear layer over the vocabulary
    net = nn.Linear(d, len(table))
    net.weight.copy_((2 * table @ mapping.T).float())
    net.bias.copy_(-(table * table).sum(1).float())
    net.eval()
    rows = min(n, LDA_LOSS_ROWS)
    loss = F.cross_entropy(net((states[:rows] - mean) / std), tokens[:rows]).item()
    return Probe("nearest", net, mean, std, torch.arange(len(table)), loss)


def train_probe(states: torch.Tensor, tokens: torch.Tensor, kind: str = "linear", epochs: int = 4,
                width: int = 1024, batch_size: int = 512, lr: float | None = None, seed: int = 0,
                desc: str | None = None, shrinkage: float = LDA_SHRINKAGE,
                embeddings: torch.Tensor | None = None) -> Probe:
    """Fit a `kind` probe ("linear" or "mlp") that predicts tokens[i] from states[i]: inputs standardised with these
    states' per-feature mean and std, outputs the token ids present in `tokens`, Adam with a cosine-decayed rate
    from `lr` (None: the kind's DEFAULT_LR), `epochs` shuffled passes in minibatches. Seeded: the same arguments
    (and torch thread count) give the same probe. "lda" and "nearest" are fitted in closed form (fit_lda with
    `shrinkage`; fit_nearest with the model's input `embeddings`)."""
    if kind == "lda":
        return fit_lda(states, tokens, shrinkage)
    if kind == "nearest":
        if embeddings is None:
            raise ValueError("the nearest probe needs the model's input embeddings")
        return fit_nearest(states, tokens, embeddings)
    lr = DEFAULT_LR[kind] if lr is None else lr
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the layers' initialisation
    mean, std = states.mean(0), states.std(0).clamp_min(1e-6)
    classes, targets = torch.unique(tokens, return_inverse=True)
    net = make_net(kind, states.shape[1], len(classes), width)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(states) / batch_size)
    total_steps = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    net.train()
    loss_sum = 0.0
    bar = tqdm(total=total_steps, desc=desc or kind, unit="step", file=sys.stderr, leave=False)
    for _ in range(epochs):
        order = torch.randperm(len(states), generator=generator)
        loss_sum = 0.0
        for i in range(0, len(states), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(net((states[idx] - mean) / std), targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(idx)
            bar.update()
    bar.close()
    net.eval()
    return Probe(kind, net, mean, std, classes, loss_sum / len(states))


def evaluate(probe: Probe, states: torch.Tensor, tokens: torch.Tensor) -> dict:
    """{"top1", "top5"}: the fraction of rows whose token id the probe names first / among its five best."""
    if len(tokens) == 0:
        return {"top1": float("nan"), "top5": float("nan")}
    guesses = probe.topk(states, 5)
    hits = guesses == tokens[:, None]
    return {"top1": hits[:, 0].float().mean().item(), "top5": hits.any(1).float().mean().item()}


def baselines(train_tokens: torch.Tensor, eval_tokens: torch.Tensor) -> dict:
    """The references that need no hidden state: the majority token's recovery rate (top-5: the five most
    frequent training tokens) and the coverage (held-out tokens whose id occurs among the training tokens)."""
    ids, counts = torch.unique(train_tokens, return_counts=True)
    ranked = ids[counts.argsort(descending=True, stable=True)]
    return {"majority_token": int(ranked[0]),
            "majority_top1": (eval_tokens == ranked[0]).float().mean().item(),
            "majority_top5": torch.isin(eval_tokens, ranked[:5]).float().mean().item(),
            "coverage": torch.isin(eval_tokens, ids).float().mean().item()}


def measure_layer(k: int, train_states: torch.Tensor, train_tokens: torch.Tensor, eval_states: torch.Tensor,
                  eval_tokens: torch.Tensor, kinds: Sequence[str] = PROBE_KINDS, epochs: int = 4, width: int = 1024,
                  batch_size: int = 512, lr: float | None = None, seed: int = 0, shrinkage: float = LDA_SHRINKAGE,
                  sets: dict[str, tuple[int, int]] | None = None, embeddings: torch.Tensor | None = None) -> dict:
    """Train every probe kind on one split point's states and score it on the held-out states: the row for K=k,
    its figures those of the probe with the best held-out top-1. `sets`: name -> (start, end) rows of the held-out
    states, each also scored alone (row["sets"], the best probe's)."""
    started = time.perf_counter()
    probes, trained = {}, {}
    for kind in kinds:
        trained[kind] = train_probe(train_states, train_tokens, kind, epochs, width, batch_size, lr, seed,
                                    desc=f"K={k} {kind}", shrinkage=shrinkage, embeddings=embeddings)
        probes[kind] = {**evaluate(trained[kind], eval_states, eval_tokens), "train_loss": trained[kind].train_loss}
    best = max(probes, key=lambda kind: probes[kind]["top1"])
    row = {"input_layers": k, "label": "embedding" if k == 0 else f"after {k} layer{'s' * (k != 1)}",
           "top1": probes[best]["top1"], "top5": probes[best]["top5"], "probe": best, "probes": probes}
    if sets:
        row["sets"] = {name: evaluate(trained[best], eval_states[a:b], eval_tokens[a:b]) for name, (a, b) in sets.items()}
    row["seconds"] = time.perf_counter() - started
    return row


# ----------------------------------------------------------------------------------------------- main

def load_text(args, model, tokenizer) -> tuple:
    """(train states, train tokens, held-out states, held-out tokens, {set: (start, end)}, description) for the mode."""
    if args.data == "corpus":
        from hat.common.reference_corpus import split_corpus

        train_files, heldout = split_corpus()
        log(f"{len(train_files)} training files, {len(heldout)} held-out; K = {', '.join(map(str, args.layers))}; "
            f"{torch.get_num_threads()} torch threads")
        train_windows = sample_windows(train_files, tokenizer, args.train_tokens, args.seq_len, args.seed)
        eval_windows = sample_windows(heldout, tokenizer, args.eval_tokens, args.seq_len, args.seed + 1)
        train_states, train_tokens = collect_states(model, train_windows, args.layers, desc="forward (train)")
        eval_states, eval_tokens = collect_states(model, eval_windows, args.layers, desc="forward (held-out)")
        return (train_states, train_tokens, eval_states, eval_tokens, None,
                f"{len(train_windows)} + {len(eval_windows)} windows of the reference corpus")
    from hat.common.datasets import sharegpt_conversations
    from privacy_chat_text import scoring_sets, training_windows

    log(f"K = {', '.join(map(str, args.layers))}; {torch.get_num_threads()} torch threads; reading ShareGPT")
    with tqdm(total=args.train_tokens, desc="ShareGPT windows", unit="tok", file=sys.stderr, leave=False) as bar:
        train = training_windows(sharegpt_conversations(), tokenizer, args.train_tokens, args.seq_len, bar.update)
    scored = scoring_sets(tokenizer)
    train_states, train_tokens = collect_states(model, train.ids, args.layers, desc="forward (ShareGPT)", keep=train.keep)
    parts, sets, at = [], {}, 0
    for windows in scored:
        parts.append(collect_states(model, windows.ids, args.layers, desc=f"forward ({windows.name})", keep=windows.keep))
        sets[windows.name] = (at, at + windows.counted)
        at += windows.counted
    eval_states = {k: torch.cat([states[k] for states, _ in parts]) for k in args.layers}
    eval_tokens = torch.cat([tokens for _, tokens in parts])
    description = (f"{len(train.ids)} ShareGPT conversations (first {args.seq_len} tokens each) to train; "
                   + ", ".join(f"{len(w.ids)} {w.name} prompts" for w in scored) + " scored")
    return train_states, train_tokens, eval_states, eval_tokens, sets, description


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hat.common.model_store import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    # subnormal floats (tiny gradients and Adam moments once a probe fits, as on the embeddings) slow the CPU's
    # arithmetic several times over: flushing them to zero changes no figure and spares that time
    torch.set_flush_denormal(True)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model_dir = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    apply_mode_defaults(args, ("chat" if tokenizer.chat_template else "corpus") if args.data == "auto" else args.data)
    if args.data == "chat" and not tokenizer.chat_template:
        args.parser.error(f"--data chat: {model_dir} has no chat template")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    num_layers = model.config.num_hidden_layers
    parameters = sum(p.numel() for p in model.parameters())
    if max(args.layers) >= num_layers:
        raise SystemExit(f"--input-layers: K must be below the model's {num_layers} layers "
                         "(the cloud runs at least one)")

    train_states, train_tokens, eval_states, eval_tokens, sets, description = load_text(args, model, tokenizer)
    embeddings = model.get_input_embeddings().weight.detach().float().clone()  # the nearest probe's table
    del model
    collect_s = time.perf_counter() - started
    reference = baselines(train_tokens, eval_tokens)
    if sets:
        reference["sets"] = {name: baselines(train_tokens, eval_tokens[a:b]) for name, (a, b) in sets.items()}
    log(f"{len(train_tokens)} training and {len(eval_tokens)} held-out positions ({description}) in {collect_s:.0f} s; "
        f"majority baseline {reference['majority_top1']:.3f}, coverage {reference['coverage']:.3f}")

    device = None
    split_points = [k for k in args.layers if k >= 1]
    if args.device_rounds and split_points:
        from privacy_device_cost import CostSettings, device_step_times

        device = device_step_times(model_dir, split_points, CostSettings(rounds=args.device_rounds), log)
    rows = []
    for k in args.layers:
        row = measure_layer(k, train_states.pop(k), train_tokens, eval_states.pop(k), eval_tokens, args.probe_kinds,
                            args.epochs, args.probe_width, args.batch_size, args.lr, args.seed, args.lda_shrinkage, sets,
                            embeddings)
        if device:
            row["device"] = next((r for r in device["rows"] if r["input_layers"] == k), None)
        rows.append(row)
        log(f"K={k}: top-1 {row['top1']:.3f}, top-5 {row['top5']:.3f} ({row['probe']}) in {row['seconds']:.0f} s")
    total_s = time.perf_counter() - started

    table = report(args, model_dir, rows, reference, device, parameters, len(train_tokens), len(eval_tokens),
                   description, collect_s, total_s)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "parser"}
        settings["model"] = str(model_dir)
        result = {"settings": settings, "train_tokens": len(train_tokens), "eval_tokens": len(eval_tokens),
                  "data": description, "num_layers": num_layers, "parameters": parameters, "baseline": reference,
                  "rows": rows, "device": device,
                  "published": {"model": PUBLISHED["model"],
                                "recovered": {str(k): v for k, v in PUBLISHED["recovered"].items()}},
                  "collect_seconds": collect_s, "total_seconds": total_s}
        args.json.write_text(json.dumps(result, indent=1))
    return 0


def report(args, model_dir: Path, rows: list[dict], reference: dict, device: dict | None, parameters: int,
           n_train: int, n_eval: int, description: str, collect_s: float, total_s: float) -> str:
    """The figures as markdown: a line of settings, the table (one row per K), the references."""
    lines = [f"Token recovery from the uplink hidden states ({model_dir.name}, {parameters / 1e6:.1f}M parameters): "
             f"{n_train} training and {n_eval} scored positions ({description}); windows of {args.seq_len}, "
             f"probes {', '.join(args.probe_kinds)}, seed {args.seed}.", ""]
    sets = list(rows[0].get("sets", {})) if rows else []
    kinds = args.probe_kinds if len(args.probe_kinds) > 1 else []
    header = (["K", "hidden states", "top-1", "top-5"] + [f"{name} top-1" for name in sets] + ["best"]
              + [f"{kind} top-1" for kind in kinds])
    if device:
        header += ["device ms/token", "share of whole model"]
    header += ["time s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    for r in rows:
        cells = [str(r["input_layers"]), r["label"], f"{r['top1']:.1%}", f"{r['top5']:.1%}"]
        cells += [f"{r['sets'][name]['top1']:.1%}" for name in sets] + [r["probe"]]
        cells += [f"{r['probes'][kind]['top1']:.1%}" for kind in kinds]
        if device:
            d = r.get("device")
            cells += [f"{d['input_ms']:.1f} + {d['output_ms']:.1f} = {d['device_ms']:.1f}", f"{d['share']:.2f}"] if d else ["-", "-"]
        cells += [f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Majority baseline (always token {reference['majority_token']}): top-1 {reference['majority_top1']:.1%}, "
                 f"top-5 {reference['majority_top5']:.1%}. Coverage (scored tokens seen in training, the ceiling of the "
                 f"probes other than nearest): {reference['coverage']:.1%}"
                 + "".join(f"; {name} {b['coverage']:.1%}" for name, b in reference.get("sets", {}).items()) + ".")
    if device:
        lines.append(f"Device time per token: median decode step ({device['rounds']} rounds, {device['past']} positions "
                     f"cached, float32, {device['threads']} thread(s)) of the input part (embedding + K layers) + the "
                     f"output part ({device['output_layers']} layer{'s' * (device['output_layers'] != 1)} + norm + "
                     f"LM head), against the whole {device['num_layers']}-layer model's step "
                     f"({device['whole_ms']:.1f} ms) in the same rounds; absolute times carry this machine's load.")
    published = ", ".join(f"{v:.0%} at K={k}" for k, v in PUBLISHED["recovered"].items())
    lines.append(f"Published for a {PUBLISHED['model']} model: {published}.")
    lines.append(f"Time: {collect_s:.0f} s reading and running the model, {total_s:.0f} s in all.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
