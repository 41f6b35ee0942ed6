"""`hat train-adapter`: distil a draft adapter from the full model (the teacher) for one split.

Per training window the teacher (the model's own parts, float32, no gradients) gives the input
part's output h_K, the middle part's output h_mid and, through the output part, its token
distribution. The adapter maps (h_K, token embeddings) to an estimate of h_mid; the loss is

    SmoothL1(estimate, h_mid) + ce_weight x CE(teacher distribution, output part(estimate))

with the output part frozen (gradients pass through it to the adapter). Held-out evaluation gives
top-1 agreement (draft argmax = teacher argmax, teacher-forced) and the accepted length of greedy
draft chains against the teacher's own greedy continuation, as speculative decoding would see it.

A verified-conditioned adapter (--conditioning verified) also takes h_mid(t-1): in training the teacher's, shifted
within each window, zeros at a window's first position (windows attend only to themselves, so the window before's
last state belongs to another context; zeros are also what position 0 of a generation sees). Deeper draft tokens
see the adapter's own estimate instead; --feature-noise (noise on the teacher's h_mid(t-1)) and --second-step-weight
(a second pass fed the first pass's own estimates, a one-step training-time test) prepare it for that. Teacher-forced
figures give it the teacher's h_mid(t-1) everywhere; draft chains give it, as the device does, the verified h_mid
before the round's first token and its own estimates after that.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .adapter import AdapterConfig, DraftAdapter
from .adapter_train_config import AdapterTrainConfig
from .checkpoint import fingerprint, load_tensors, parse_dtype
from .hidden_cache import CacheMeta, HiddenStateCache
from .layers import SequenceSpan
from .model_part import ModelPart
from .model_spec import load_model_spec
from .token_frequencies import FrequencyTable
from .training_text import TrainingText, training_data
from .split import validate_split

CHECKPOINT = "checkpoint.pt"
SUMMARY = "training_summary.json"
LOSS_LOG = "loss_log.csv"


class Teacher:
    """The full model as three parts, float32, for targets and evaluation."""

    def __init__(self, model_dir: str, k: int, m: int):
        self.spec = load_model_spec(model_dir)
        n = self.spec.num_layers
        validate_split(n, k, m)
        tensors = load_tensors(model_dir, lambda name: True, torch.float32)
        self.input = ModelPart.from_tensors(self.spec, 0, k, tensors, embedding=True)
        self.middle = ModelPart.from_tensors(self.spec, k, n - m, tensors)
        self.output = ModelPart.from_tensors(self.spec, n - m, n, tensors, head=True)
        for part in (self.input, self.middle, self.output):
            part.requires_grad_(False)

    @staticmethod
    def spans(part: ModelPart, batch: int, length: int) -> list[SequenceSpan]:
        return [SequenceSpan(part.new_cache(length), 0, length) for _ in range(batch)]

    @torch.no_grad()
    def hidden(self, ids: torch.Tensor):
        """ids [B, T] -> (embeddings, h_K, h_mid), flattened to [B*T, width]."""
        b, t = ids.shape
        embeds = self.input.embed(ids.reshape(-1))
        h_k = self.input.forward_layers(embeds, self.spans(self.input, b, t))
        return embeds, h_k, self.middle.forward_layers(h_k, self.spans(self.middle, b, t))

    @torch.no_grad()
    def targets(self, ids: torch.Tensor):
        """ids [B, T] -> (embeddings, h_K, h_mid, teacher logits), flattened to [B*T, ...]."""
        b, t = ids.shape
        embeds, h_k, h_mid = self.hidden(ids)
        return embeds, h_k, h_mid, self.output_logits(h_mid, b, t)

    def output_logits(self, hidden: torch.Tensor, b: int, t: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The output part's logits for middle outputs [B*T, width]: over the full vocabulary, or only the
        token ids `rows` (a reduced head, column i standing for rows[i])."""
        out = self.output.forward_layers(hidden, self.spans(self.output, b, t))
        if rows is None:
            return self.output.logits(out)
        return F.linear(self.output.model.norm(out), self.output.lm_head.weight[rows]).float()

    def draft_logits(self, adapter: DraftAdapter, embeds, h_k, b: int, t: int,
                     h_mid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced: a conditioned adapter sees the teacher's h_mid(t-1) (`h_mid`, [B*T, width])."""
        estimate = adapter_estimate(adapter, h_k, embeds, self.spans(adapter, b, t), h_mid, b, t)
        return estimate, self.output_logits(estimate, b, t)


def previous_middle(h_mid: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """h_mid(t-1) for every position of [B*T, width] windows: shifted by one within each window, zeros at its first."""
    shaped = h_mid.reshape(b, t, -1)
    return torch.cat([torch.zeros_like(shaped[:, :1]), shaped[:, :-1]], dim=1).reshape(b * t, -1)


def adapter_estimate(adapter: DraftAdapter, h_k: torch.Tensor, embeds: torch.Tensor, spans: list[SequenceSpan],
                     h_mid: torch.Tensor | None, b: int, t: int) -> torch.Tensor:
    """The adapter's estimates over [B*T] windows; a conditioned one is given h_mid shifted (previous_middle)."""
    if not adapter.conditioned:
        return adapter(h_k, embeds, spans)
    if h_mid is None:
        raise ValueError("a verified-conditioned adapter needs the middle outputs of the windows")
    return adapter(h_k, embeds, spans, previous_middle(h_mid, b, t))


def token_stream(tokenizer, texts: Iterable[TrainingText], needed: int, desc: str) -> np.ndarray:
    """Tokens of the texts in their order, each ended by eos, until `needed` tokens are there."""
    pieces, total = [], 0
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    with tqdm(total=needed, desc=desc, unit="tok", unit_scale=True, leave=False) as bar:
        for text in texts:
            ids = text.ids(tokenizer) + [eos]
            pieces.append(np.asarray(ids, dtype=np.int64))
            total += len(ids)
            bar.update(len(ids))
            if total >= needed:
                break
    stream = np.concatenate(pieces)
    if len(stream) < 2:
        raise ValueError("the training text is empty after tokenization")
    return stream


def windows(stream: np.ndarray, seed: int, step: int, batch: int, length: int) -> torch.Tensor:
    """[batch, length] windows for step `step`, from the seed alone (so a resumed run sees the same data)."""
    length = min(length, len(stream))
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(stream) - length + 1, size=batch)
    return torch.from_numpy(np.stack([stream[s:s + length] for s in starts]))


def open_cache(config: AdapterTrainConfig, teacher: Teacher, description: str,
               stream: np.ndarray) -> tuple[HiddenStateCache | None, int]:
    """The hidden-state cache of --cache, filled (resuming an interrupted fill), and the windows this call wrote;
    (None, 0) without --cache."""
    if not config.cache:
        return None, 0
    windows_wanted = len(stream) // config.seq_len
    if windows_wanted < config.batch_size:
        raise ValueError(f"--cache-tokens {config.cache_tokens}: the data gives {len(stream):,} tokens, fewer than "
                         f"one batch of {config.batch_size} windows of {config.seq_len}")
    meta = CacheMeta(source_fingerprint=fingerprint(config.model_dir), input_layers=config.input_layers,
                     output_layers=config.output_layers, width=teacher.spec.hidden_size, seq_len=config.seq_len,
                     windows=windows_wanted, stream=f"{description}; seed {config.seed}")
    cache = HiddenStateCache.open(config.cache, meta)
    return cache, cache.fill(teacher, stream)


def ce_vocabulary(config: AdapterTrainConfig, vocab_size: int, cache: HiddenStateCache | None,
                  stream: np.ndarray) -> torch.Tensor | None:
    """The token ids the cross-entropy term scores (--ce-vocab N: the N most frequent in the training tokens,
    ties by id); None: the full vocabulary."""
    if not config.ce_vocab or config.ce_vocab >= vocab_size:
        return None
    counts = cache.token_counts(vocab_size) if cache else np.bincount(stream, minlength=vocab_size)
    table = FrequencyTable(vocab_size, "", tuple(int(c) for c in counts), "the training tokens")
    return torch.tensor(table.top(config.ce_vocab), dtype=torch.long)


def lr_factor(step: int, config: AdapterTrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def distillation_loss(teacher: Teacher, adapter: DraftAdapter, ids: torch.Tensor, ce_weight: float,
                      h_k: torch.Tensor | None = None, h_mid: torch.Tensor | None = None,
                      rows: torch.Tensor | None = None, feature_noise: float = 0.0, second_step_weight: float = 0.0,
                      noise_seed: int = 0):
    """(total loss, smooth-L1 term, cross-entropy term) for windows ids [B, T]. h_k and h_mid ([B*T, width]) come
    from the hidden-state cache, or the teacher computes them; the cross-entropy compares the teacher's and the
    draft's distributions over the full vocabulary, or over the token ids `rows` only (--ce-vocab). A conditioned
    adapter sees the teacher's h_mid(t-1), with Gaussian noise of `feature_noise` x its RMS per position (drawn from
    `noise_seed`, so a resumed run draws the same); with `second_step_weight` the total adds that weight x the loss
    of a second pass fed the first pass's own estimates as h_mid(t-1) (the terms returned are the first pass's)."""
    b, t = ids.shape
    if h_k is None or h_mid is None:
        embeds, h_k, h_mid = teacher.hidden(ids)
    else:
        embeds = teacher.input.embed(ids.reshape(-1))
    if not adapter.conditioned:
        if feature_noise or second_step_weight:
            raise ValueError("feature noise and the second step apply to a verified-conditioned adapter only")
        return estimate_loss(teacher, adapter(h_k, embeds, teacher.spans(adapter, b, t)), h_mid, b, t, ce_weight, rows)
    previous = previous_middle(h_mid, b, t)
    if feature_noise:
        scale = previous.pow(2).mean(-1, keepdim=True).sqrt() * feature_noise
        noise = torch.randn(previous.shape, generator=torch.Generator().manual_seed(noise_seed))
        previous = previous + scale * noise.to(previous.dtype)
    with torch.no_grad():
        teacher_logits = teacher.output_logits(h_mid, b, t, rows)
    estimate = adapter(h_k, embeds, teacher.spans(adapter, b, t), previous)
    loss, regression, ce = estimate_loss(teacher, estimate, h_mid, b, t, ce_weight, rows, teacher_logits)
    if second_step_weight:
        again = adapter(h_k, embeds, teacher.spans(adapter, b, t), previous_middle(estimate, b, t))
        loss = loss + second_step_weight * estimate_loss(teacher, again, h_mid, b, t, ce_weight, rows, teacher_logits)[0]
    return loss, regression, ce


def estimate_loss(teacher: Teacher, estimate: torch.Tensor, h_mid: torch.Tensor, b: int, t: int, ce_weight: float,
                  rows: torch.Tensor | None = None, teacher_logits: torch.Tensor | None = None):
    """(total loss, smooth-L1 term, cross-entropy term) of middle-output estimates [B*T, width] against the true ones
    (`teacher_logits`: the output part's logits of h_mid, when already computed)."""
    if teacher_logits is None:
        with torch.no_grad():
            teacher_logits = teacher.output_logits(h_mid, b, t, rows)
    draft_logits = teacher.output_logits(estimate, b, t, rows)
    regression = F.smooth_l1_loss(estimate, h_mid)
    ce = -(torch.softmax(teacher_logits, -1) * torch.log_softmax(draft_logits, -1)).sum(-1).mean()
    return regression + ce_weight * ce, regression, ce


@torch.no_grad()
def draft_coverage(teacher: Teacher, adapter: DraftAdapter, ids: torch.Tensor, ks=(1, 2, 4)) -> dict[int, float]:
    """Teacher-forced: for each k, the fraction of positions where the teacher's argmax is among the draft's
    top k (k = 1 is top-1 agreement; k > 1 bounds what a k-way draft tree could add at one position)."""
    b, t = ids.shape
    embeds, h_k, h_mid, teacher_logits = teacher.targets(ids)
    _, draft_logits = teacher.draft_logits(adapter, embeds, h_k, b, t, h_mid)
    target = teacher_logits.argmax(-1, keepdim=True)
    top = draft_logits.topk(max(ks), dim=-1).indices
    return {k: float((top[:, :k] == target).any(-1).float().mean()) for k in ks}


CONFIDENCE_TEMPERATURES = tuple(round(0.05 * i, 2) for i in range(1, 61))  # the grid searched, 0.05 .. 3.0


@torch.no_grad()
def fit_confidence_temperature(teacher: Teacher, adapter: DraftAdapter, ids: torch.Tensor) -> tuple[float, dict]:
    """The temperature T whose top probability softmax(draft logits / T).max best predicts (log loss) whether the
    draft's argmax equals the teacher's, teacher-forced on held-out windows; and the fit's figures."""
    b, t = ids.shape
    embeds, h_k, h_mid, teacher_logits = teacher.targets(ids)
    _, draft_logits = teacher.draft_logits(adapter, embeds, h_k, b, t, h_mid)
    agree = (draft_logits.argmax(-1) == teacher_logits.argmax(-1)).float()

    def log_loss(temperature: float) -> float:
        conf = torch.softmax(draft_logits / temperature, -1).amax(-1).clamp(1e-6, 1 - 1e-6)
        return float(-(agree * conf.log() + (1 - agree) * (1 - conf).log()).mean())

    best = min(CONFIDENCE_TEMPERATURES, key=log_loss)
    conf = torch.softmax(draft_logits / best, -1).amax(-1)
    return best, {"confidence_temperature": best, "log_loss": round(log_loss(best), 4),
                  "log_loss_at_1": round(log_loss(1.0), 4), "mean_confidence": round(float(conf.mean()), 4),
                  "agreement": round(float(agree.mean()), 4)}


def top1_agreement(teacher: Teacher, adapter: DraftAdapter, ids: torch.Tensor) -> float:
    return draft_coverage(teacher, adapter, ids, (1,))[1]


@torch.no_grad()
def chain_acceptance(teacher: Teacher, adapter: DraftAdapter, prefixes: list[list[int]], draft_len: int) -> dict:
    """Greedy speculative rounds from each prefix: the draft chains `draft_len` tokens (input part -> adapter ->
    output part, true middle outputs for the prefix), the teacher continues greedily; accepted = the common
    prefix. A conditioned adapter sees the teacher's h_mid(t-1) over the prefix and for the round's first token,
    its own estimates after that (as the device drafts). Returns the mean accepted length per round with the bonus
    token and the per-depth acceptance."""
    accepted = []
    for prefix in prefixes:
        target = _chain_targets(teacher, prefix, draft_len)
        draft = _draft_chain(teacher, adapter, prefix, draft_len)
        n = next((i for i, (a, b) in enumerate(zip(draft, target)) if a != b), draft_len)
        accepted.append(n)
    depth = [sum(a > i for a in accepted) / len(accepted) for i in range(draft_len)]
    return {"accept_len": sum(accepted) / len(accepted) + 1, "accepted_at_depth": [round(d, 4) for d in depth]}


def _greedy_continuation(teacher: Teacher, prefix: list[int], count: int) -> list[int]:
    parts = (teacher.input, teacher.middle, teacher.output)
    caches = [p.new_cache() for p in parts]
    ids, position, out = list(prefix), 0, []
    for _ in range(count):
        hidden = teacher.input.embed(torch.tensor(ids[position:]))
        for part, cache in zip(parts, caches):
            hidden = part.forward_layers(hidden, [SequenceSpan(cache, position, hidden.shape[0])])
        position = len(ids)
        out.append(int(teacher.output.logits(hidden[-1:]).argmax()))
        ids.append(out[-1])
    return out


def _draft_chain(teacher: Teacher, adapter: DraftAdapter, prefix: list[int], count: int) -> list[int]:
    caches = [teacher.input.new_cache(), adapter.new_cache(), teacher.middle.new_cache(), teacher.output.new_cache()]
    n = len(prefix)
    embeds = teacher.input.embed(torch.tensor(prefix))
    h_k = teacher.input.forward_layers(embeds, [SequenceSpan(caches[0], 0, n)])
    h_mid = teacher.middle.forward_layers(h_k, [SequenceSpan(caches[2], 0, n)])
    adapter_estimate(adapter, h_k, embeds, [SequenceSpan(caches[1], 0, n)], h_mid, 1, n)
    hidden = teacher.output.forward_layers(h_mid, [SequenceSpan(caches[3], 0, n)])
    out = [int(teacher.output.logits(hidden[-1:]).argmax())]  # the first token is the target's own (verified)
    previous = h_mid[-1:]  # conditioned: the verified middle output before the round's first token
    for position in range(n, n + count):
        embeds = teacher.input.embed(torch.tensor(out[-1:]))
        h_k = teacher.input.forward_layers(embeds, [SequenceSpan(caches[0], position, 1)])
        estimate = previous = adapter(h_k, embeds, [SequenceSpan(caches[1], position, 1)],
                                      previous if adapter.conditioned else None)
        hidden = teacher.output.forward_layers(estimate, [SequenceSpan(caches[3], position, 1)])
        out.append(int(teacher.output.logits(hidden).argmax()))
    return out[1:]  # the drafted tokens; the target's first token conditions both chains


def _chain_targets(teacher: Teacher, prefix: list[int], count: int) -> list[int]:
    """The teacher's greedy tokens 2..count+1 after the prefix: what a draft from its first token must match."""
    return _greedy_continuation(teacher, prefix, count + 1)[1:]


def heldout_prefixes(tokenizer, texts: list[TrainingText], count: int, length: int, seed: int) -> list[list[int]]:
    """`count` token prefixes of `length` tokens cut from held-out texts at seeded positions."""
    rng = random.Random(seed)
    streams = [ids for ids in (text.ids(tokenizer) for text in texts) if len(ids) > length]
    if not streams:
        raise ValueError(f"no held-out text has more than {length} tokens")
    out = []
    for _ in range(count):
        ids = rng.choice(streams)
        start = rng.randrange(0, len(ids) - length)
        out.append(ids[start:start + length])
    return out


def heldout_sets(tokenizer, heldout: list[TrainingText], config: AdapterTrainConfig) -> tuple[torch.Tensor, list[list[int]]]:
    """(windows for coverage [eval_windows, seq_len], prefixes of 64 tokens for draft chains), seeded."""
    ids = torch.tensor(heldout_prefixes(tokenizer, heldout, config.eval_windows, config.seq_len, config.seed + 1))
    return ids, heldout_prefixes(tokenizer, heldout, config.eval_chains, 64, config.seed + 2)


@torch.no_grad()
def heldout_evaluation(teacher: Teacher, adapter: DraftAdapter, eval_ids: torch.Tensor, chain_prefixes: list[list[int]],
                       draft_len: int, step: int, log=print) -> dict:
    coverage = draft_coverage(teacher, adapter, eval_ids)
    result = {"step": step, "top1_agreement": round(coverage[1], 4), "top2_coverage": round(coverage[2], 4),
              "top4_coverage": round(coverage[4], 4), **chain_acceptance(teacher, adapter, chain_prefixes, draft_len)}
    log(f"{f'step {step}' if step >= 0 else 'adapter'}: held-out top-1 agreement {result['top1_agreement']:.3f} (target in the draft's top 2: "
        f"{result['top2_coverage']:.3f}, top 4: {result['top4_coverage']:.3f}); greedy draft chains accept "
        f"{result['accept_len']:.2f} tokens per round (bonus included, drafts of {draft_len})")
    return result


def evaluate_adapter(config: AdapterTrainConfig, calibrate: bool = False, log=print) -> dict:
    """The held-out figures of the adapter already in config.out, without training; with `calibrate`, also
    fit its confidence temperature and store it in its adapter_config.json."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model_dir, local_files_only=True)
    heldout = training_data(config.data, tokenizer).heldout
    teacher = Teacher(config.model_dir, config.input_layers, config.output_layers)
    adapter = DraftAdapter.load(config.out, teacher.spec, torch.float32)
    adapter.config.check_matches(fingerprint(config.model_dir), config.input_layers, config.output_layers)
    eval_ids, chain_prefixes = heldout_sets(tokenizer, heldout, config)
    result = heldout_evaluation(teacher, adapter, eval_ids, chain_prefixes, config.draft_len, -1, log)  # -1: no step
    if calibrate:
        temperature, result["calibration"] = fit_confidence_temperature(teacher, adapter, eval_ids)
        dataclasses.replace(adapter.config, confidence_temperature=temperature).save(Path(config.out))
        summary_path = Path(config.out) / SUMMARY
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text())
            summary["adapter"]["confidence_temperature"] = temperature
            summary["calibration"] = result["calibration"]
            summary_path.write_text(json.dumps(summary, indent=1) + "\n")
        log(f"stored confidence temperature {temperature} in {Path(config.out) / 'adapter_config.json'} "
            f"({result['calibration']})")
    return result


def train_adapter(config: AdapterTrainConfig, log=print) -> dict:
    """Train (or resume) and write the adapter, its training_summary.json and loss_log.csv to config.out."""
    from transformers import AutoTokenizer

    if config.conditioning == "input" and (config.feature_noise or config.second_step_weight):
        raise ValueError("--feature-noise and --second-step-weight apply to --conditioning verified only")
    started = time.perf_counter()
    out = Path(config.out)
    tokenizer = AutoTokenizer.from_pretrained(config.model_dir, local_files_only=True)
    data = training_data(config.data, tokenizer)  # bad --data fails before the model is read
    torch.manual_seed(config.seed)
    teacher = Teacher(config.model_dir, config.input_layers, config.output_layers)
    out.mkdir(parents=True, exist_ok=True)
    spec = teacher.spec
    adapter_config = AdapterConfig(
        input_layers=config.input_layers, output_layers=config.output_layers, width=config.width or spec.hidden_size,
        depth=config.depth, intermediate_size=config.intermediate_size or spec.intermediate_size,
        source_fingerprint=fingerprint(config.model_dir), conditioning=config.conditioning)
    adapter = DraftAdapter(spec, adapter_config)
    adapter.train()
    params = [p for p in adapter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    step, rows, evals, train_s = 0, [], [], 0.0
    ckpt_path = out / CHECKPOINT
    if config.resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, weights_only=False)
        if state["config"] != asdict(config) | {"resume": state["config"]["resume"]}:
            raise ValueError(f"{ckpt_path} was written with other settings; remove it or use the same flags")
        adapter.load_state_dict(state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, rows, evals, train_s = state["step"], state["rows"], state["evals"], state["train_s"]
        log(f"resumed from {ckpt_path} at step {step}")
    elif config.resume:
        log(f"no {ckpt_path} to resume from (a finished run removes it): starting from step 0")

    if config.cache:
        needed = config.cache_tokens // config.seq_len * config.seq_len
    else:
        needed = config.steps * config.batch_size * config.seq_len // 2  # windows overlap: half the tokens seen suffice
    stream = token_stream(tokenizer, data.train(config.seed), needed, "tokenize")
    if config.cache:
        stream = stream[:min(needed, len(stream) // config.seq_len * config.seq_len)]  # whole windows: what the cache holds
    fill_started = time.perf_counter()
    cache, windows_filled = open_cache(config, teacher, data.description, stream)
    # this session's share of filling it (0 when it was full)
    cache_fill_s = time.perf_counter() - fill_started if windows_filled else 0.0
    eval_ids, chain_prefixes = heldout_sets(tokenizer, data.heldout, config)
    ce_rows = ce_vocabulary(config, spec.vocab_size, cache, stream)
    n_params = sum(p.numel() for p in adapter.parameters())
    seen = config.steps * config.batch_size * config.seq_len
    log(f"adapter: width {adapter_config.width}, depth {adapter_config.depth}, {n_params:,} parameters; teacher "
        f"{spec.num_layers} layers, split K={config.input_layers} M={config.output_layers}; data: {data.description}, "
        f"{len(stream):,} tokens; {config.steps} steps x {config.batch_size} x {config.seq_len} tokens"
        + (f" = {seen / len(stream):.1f} epochs over the hidden-state cache" if cache else ""))

    def evaluate() -> dict:
        adapter.eval()
        try:
            return heldout_evaluation(teacher, adapter, eval_ids, chain_prefixes, config.draft_len, step, log)
        finally:
            adapter.train()

    def save_state() -> None:
        tmp = out / (CHECKPOINT + ".tmp")
        torch.save({"config": asdict(config), "adapter": adapter.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": step, "rows": rows, "evals": evals,
                    "train_s": train_s}, tmp)
        os.replace(tmp, ckpt_path)

    if not evals:
        evals.append(evaluate())
    bar = tqdm(total=config.steps, initial=step, desc="train-adapter", unit="step")
    while step < config.steps:
        t0 = time.perf_counter()
        if cache:
            ids, h_k, h_mid = cache.batch(config.seed, step, config.batch_size)
        else:
            ids, h_k, h_mid = windows(stream, config.seed, step, config.batch_size, config.seq_len), None, None
        loss, regression, ce = distillation_loss(teacher, adapter, ids, config.ce_weight, h_k, h_mid, ce_rows,
                                                 config.feature_noise, config.second_step_weight,
                                                 noise_seed=config.seed * 1_000_003 + step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        train_s += time.perf_counter() - t0
        rows.append({"step": step, "loss": loss.item(), "smooth_l1": regression.item(), "ce": ce.item(),
                     "lr": scheduler.get_last_lr()[0]})
        bar.update(1)
        bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", l1=f"{rows[-1]['smooth_l1']:.3f}", ce=f"{rows[-1]['ce']:.2f}")
        if step % config.eval_every == 0 or step == config.steps:
            evals.append(evaluate())
        if step % config.ckpt_every == 0 or step == config.steps:
            save_state()
    bar.close()

    adapter.eval()
    temperature, calibration = fit_confidence_temperature(teacher, adapter, eval_ids)
    adapter.config = dataclasses.replace(adapter.config, confidence_temperature=temperature)
    log(f"drafting confidence temperature {temperature} (held-out log loss {calibration['log_loss']} against "
        f"{calibration['log_loss_at_1']} at 1.0)")
    adapter.to_runtime(parse_dtype(config.save_dtype)).save(out)
    with open(out / LOSS_LOG, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["step", "loss", "smooth_l1", "ce", "lr"])
        writer.writeheader()
        writer.writerows(rows)
    summary = {
        "adapter": asdict(adapter.config), "parameters": n_params, "train_config": asdict(config),
        "data": data.description, "tokens_seen": step * config.batch_size * config.seq_len,
        "distinct_tokens": len(stream), "epochs": round(step * config.batch_size * config.seq_len / len(stream), 2),
        "cache_fill_s": round(cache_fill_s, 3), "cache_windows_filled": windows_filled,
        "train_s": round(train_s, 1), "wall_s_this_session": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(), "final": evals[-1], "evals": evals, "calibration": calibration,
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    if ckpt_path.exists():
        ckpt_path.unlink()  # the finished adapter is in adapter.safetensors; the checkpoint was only for resuming
    return summary
