#!/usr/bin/env python
"""Count token frequencies on ShareGPT for a reduced-vocabulary draft head (FR-Spec) and save the table into an
adapter folder (ADAPTER/token_frequencies.json, with the vocabulary size and the tokenizer's fingerprint).

Conversations are formatted with the model's chat template, as the model sees them, and counted in file order
until --max-tokens tokens (a bounded sample: the most frequent few thousand tokens settle within a few million).
`hat split` copies the table into the device bundle with the adapter; `--draft-vocab N` then drafts over the N
most frequent tokens.

    python scripts/count_token_frequencies.py --model smollm2-135m-instruct --adapter ADAPTER_DIR
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer

from hat.common.datasets import sharegpt_conversations
from hat.common.model_spec import load_model_spec
from hat.common.model_store import resolve_model
from hat.common.token_frequencies import count_frequencies


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="store name or checkpoint folder (default: the default model)")
    p.add_argument("--adapter", type=Path, required=True, help="adapter folder the table is saved into")
    p.add_argument("--max-tokens", type=int, default=2_000_000, help="tokens counted (default: %(default)s)")
    p.add_argument("--data", type=Path, default=None, help="ShareGPT JSON file (default: the store's `sharegpt`)")
    args = p.parse_args(argv)
    if not args.adapter.is_dir():
        p.error(f"--adapter {args.adapter} is not a folder")
    model_dir = resolve_model(args.model, pull_missing=True)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        p.error(f"{model_dir} has no chat template: the counts would not match what the model sees")
    began = time.perf_counter()
    table = count_frequencies(tokenizer, load_model_spec(model_dir).vocab_size, sharegpt_conversations(args.data),
                              args.max_tokens)
    path = table.save(args.adapter)
    seconds = time.perf_counter() - began
    print(f"{path}: {table.source} from ShareGPT in {seconds:.0f} s", file=sys.stderr)
    for size in (1024, 2048, 4096, 8192, 16384, 32768):
        if size < table.vocab_size:
            print(f"top {size:>6}: {100 * table.coverage(size):.2f}% of the counted tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
