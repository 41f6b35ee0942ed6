#!/usr/bin/env python
"""Draft-step time with the full LM head and with reduced-vocabulary heads (FR-Spec), in one run, and the change
in draft/target top-1 agreement they bring.

Per head (full, then each --sizes entry), alternating over --repeats rounds so that load on the machine hits all
alike: the median time of one draft step (draft head over the last estimate, then input part and adapter over the
drafted token: Drafter.extend, greedy, --steps steps from an MT-Bench prompt) and of the head alone. Agreement:
teacher-forced on transformers' own greedy continuations of MT-Bench first turns, the share of positions where the
draft's top token (adapter estimate -> output part -> head) equals the target's; and the share of the target's
tokens the head can propose at all (a reduced head loses at most the rest of its acceptance). Times are inflated on a loaded
machine; compare the ratios.

    python scripts/bench_draft_head.py --model smollm2-135m-instruct --sizes 4096,8192,16384
With `--model reference` the model's shipped adapter is used, the table counted on its stdlib training files and
agreement measured on held-out files (it has no chat template). Otherwise, without --adapter, an untrained adapter (its projection is zero: it passes the input part's output through) is made
for the split, and the frequency table is counted into it on a ShareGPT sample first.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import shutil
import tempfile
import time
from pathlib import Path

import torch

from hat.common.adapter import AdapterConfig, DraftAdapter
from hat.common.checkpoint import fingerprint
from hat.common.datasets import mt_bench_questions, sharegpt_conversations
from hat.common.layers import SequenceSpan
from hat.common.model_spec import load_model_spec
from hat.common.default_model import DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS
from hat.common.model_store import DEFAULT_MODEL, resolve_model
from hat.common.sampling import SamplingParams
from hat.common.split import split_checkpoint
from hat.common.adapter import ADAPTER_CONFIG
from hat.common.reference_corpus import heldout_files, split_corpus
from hat.common.split import default_adapter_dir
from hat.common.token_frequencies import FREQUENCY_TABLE, FrequencyTable, count_frequencies, tokenizer_fingerprint
from hat.device.device_model import DeviceModel
from hat.device.draft_head import reduced_head
from hat.device.drafter import DeviceCaches, Draft, Drafter
from hat.device.generator import encode_prompt
from hat.device.speculation import SpeculationConfig


def untrained_adapter(model_dir: Path, k: int, m: int, out: Path) -> Path:
    spec = load_model_spec(model_dir)
    DraftAdapter(spec, AdapterConfig(k, m, spec.hidden_size, 1, spec.intermediate_size, fingerprint(model_dir))).save(out)
    return out


def count_text_frequencies(tokenizer, vocab: int, max_tokens: int) -> FrequencyTable:
    counts, total, files = [0] * vocab, 0, 0
    for f in split_corpus()[0]:
        ids = tokenizer(f.read())["input_ids"]
        for token in ids:
            counts[token] += 1
        total, files = total + len(ids), files + 1
        if total >= max_tokens:
            break
    return FrequencyTable(vocab, tokenizer_fingerprint(tokenizer), tuple(counts),
                          f"{files} stdlib training files, {total} tokens")


def heldout_prompts(tokenizer, count: int, length: int = 96) -> list[list[int]]:
    prompts = []
    for f in heldout_files():
        ids = tokenizer(f.read())["input_ids"]
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == count:
            break
    return prompts


def fill_caches(model: DeviceModel, ids: list[int]) -> DeviceCaches:
    """Caches after `ids`, the output part's filled from adapter estimates (as drafting leaves them)."""
    caches = DeviceCaches(model.input_part.new_cache(), model.output_part.new_cache(), model.adapter.new_cache())
    _, estimates = model.run_input(ids, 0, caches.input, caches.adapter)
    model.output_part.forward_layers(estimates, [SequenceSpan(caches.output, 0, len(ids))])
    return caches


def step_ms(model, caches, head, start: int, first: int, steps: int) -> float:
    drafter = Drafter(model, caches, SpeculationConfig(length="threshold", threshold=0.0), SamplingParams(),
                      torch.Generator(), head)
    caches.truncate(start)
    drafter.extend(Draft(start, [first]), steps)
    return 1000 * drafter.step_s / drafter.steps


def head_ms(head, hidden: torch.Tensor, calls: int = 20) -> float:
    began = time.perf_counter()
    for _ in range(calls):
        head.logits(hidden)
    return 1000 * (time.perf_counter() - began) / calls


@torch.inference_mode()
def agreement(model: DeviceModel, heads: dict, model_dir: Path, prompts: list[list[int]], tokens: int) -> dict:
    from transformers import AutoModelForCausalLM
    target = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hits = {name: 0 for name in heads}
    inside = {name: 0 for name in heads}
    total = 0
    for ids in prompts:
        out = target.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False)[0].tolist()
        caches = DeviceCaches(model.input_part.new_cache(), model.output_part.new_cache(), model.adapter.new_cache())
        _, estimates = model.run_input(out, 0, caches.input, caches.adapter)
        hidden = model.output_part.forward_layers(estimates, [SequenceSpan(caches.output, 0, len(out))])
        positions = range(len(ids) - 1, len(out) - 1)  # the draft at p predicts the token at p + 1
        for name, head in heads.items():
            best = head.logits(hidden[list(positions)]).argmax(-1)
            hits[name] += sum(head.token_id(int(b)) == out[p + 1] for b, p in zip(best, positions))
            kept = None if head.ids is None else set(head.ids.tolist())
            inside[name] += sum(kept is None or out[p + 1] in kept for p in positions)
        total += len(positions)
    return {name: (hits[name] / total, inside[name] / total) for name in heads}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="store name or checkpoint folder")
    p.add_argument("--adapter", type=Path, help="adapter folder with token_frequencies.json (default: untrained)")
    p.add_argument("-K", type=int, default=DEFAULT_INPUT_LAYERS, help="input layers")
    p.add_argument("-M", type=int, default=DEFAULT_OUTPUT_LAYERS, help="output layers")
    p.add_argument("--sizes", default="4096,8192,16384", help="reduced vocabulary sizes (default: %(default)s)")
    p.add_argument("--count-tokens", type=int, default=1_000_000, help="ShareGPT tokens counted for the table")
    p.add_argument("--steps", type=int, default=16, help="draft steps per timing")
    p.add_argument("--repeats", type=int, default=7, help="timings per head, alternating")
    p.add_argument("--agreement-prompts", type=int, default=4, help="MT-Bench first turns for the agreement")
    p.add_argument("--agreement-tokens", type=int, default=48, help="target tokens per agreement prompt")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.adapter is not None and not args.adapter.is_dir():
        p.error(f"--adapter {args.adapter} is not a folder")
    model_dir = resolve_model(args.model, pull_missing=True)
    work = Path(tempfile.mkdtemp(prefix="bench-draft-head-"))
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    chat = bool(getattr(tokenizer, "chat_template", None))
    shipped = default_adapter_dir(model_dir, args.K, args.M)
    if args.adapter is None and (shipped / ADAPTER_CONFIG).is_file():  # a copy: the table is written into it
        args.adapter = Path(shutil.copytree(shipped, work / "adapter"))
    adapter = args.adapter or untrained_adapter(model_dir, args.K, args.M, work / "adapter")
    if not (adapter / FREQUENCY_TABLE).is_file():
        began = time.perf_counter()
        vocab = load_model_spec(model_dir).vocab_size
        if chat:
            table = count_frequencies(tokenizer, vocab, sharegpt_conversations(), args.count_tokens)
        else:  # no chat template (the reference model): its own training text, the stdlib's training files
            table = count_text_frequencies(tokenizer, vocab, args.count_tokens)
        table.save(adapter)
        print(f"counted {table.source} in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    device_dir, _ = split_checkpoint(model_dir, args.K, args.M, work / "bundle", dtype="float32", adapter=adapter)
    model = DeviceModel.load(device_dir)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    heads = {"full": reduced_head(model, 0), **{str(s): reduced_head(model, s) for s in sizes}}
    if chat:
        questions = mt_bench_questions()[:max(1, args.agreement_prompts)]
        prompts = [encode_prompt(model.tokenizer, q.turns[0], chat=True) for q in questions]
    else:
        prompts = heldout_prompts(model.tokenizer, max(1, args.agreement_prompts))
    with torch.inference_mode():
        ids = prompts[0]
        caches = fill_caches(model, ids)
        first = int(model.output_part.logits(torch.zeros(1, model.spec.hidden_size)).argmax())
        hidden = torch.randn(1, model.spec.hidden_size)
        steps = {name: [] for name in heads}
        alone = {name: [] for name in heads}
        for _ in range(args.repeats):
            for name, head in heads.items():
                steps[name].append(step_ms(model, caches, head, len(ids), first, args.steps))
                alone[name].append(head_ms(head, hidden))
    agree = agreement(model, heads, model_dir, prompts, args.agreement_tokens)
    table = model.token_frequencies
    base_step, base_head = statistics.median(steps["full"]), statistics.median(alone["full"])
    print(f"{model_dir.name} K={args.K} M={args.M} fp32, {torch.get_num_threads()} threads; "
          f"table: {table.source}; adapter: {'trained' if args.adapter else 'untrained (pass-through)'}; agreement on "
          f"{len(prompts)} {'MT-Bench first turns' if chat else 'held-out stdlib files'} x {args.agreement_tokens} tokens")
    print(f"{'head':>8} {'coverage':>9} {'step ms':>8} {'x full':>7} {'head ms':>8} {'x full':>7} {'top-1 agree':>12} "
          f"{'target in head':>15}")
    for name in heads:
        coverage = 1.0 if name == "full" else table.coverage(int(name))
        s, h = statistics.median(steps[name]), statistics.median(alone[name])
        print(f"{name:>8} {100 * coverage:8.2f}% {s:8.2f} {s / base_step:7.2f} {h:8.2f} {h / base_head:7.2f} "
              f"{agree[name][0]:12.3f} {agree[name][1]:15.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
