"""Workloads from real prompt sets (the store's datasets, `hat pull NAME`): no synthetic lengths, no padding.

  mt-bench    the 80 MT-Bench questions' first turns   -> category "conversation"
  humaneval   the 164 HumanEval prompts               -> category "code"
  xsum        XSum news articles, asked for a one-sentence summary (common.datasets.SUMMARIZE_INSTRUCTION)
              -> category "summarization" (the long prompts: CNN/DailyMail's stand-in)

Each prompt is one user turn formatted with the model's chat template (generation prompt added); a model without
one (the reference model) gets the text as it is. Request i draws from set i mod len(sets) (a SpecBench-like mix
when several are given), each set's items in a seeded shuffled order without repeats; a prompt longer than
`max_prompt_tokens` is passed over (never cut) and counted. Arrivals are a Poisson process of the given rate.
"""
from __future__ import annotations

import random
import statistics
from typing import Callable

from .records import percentile
from .workloads import WorkloadRequest, WorkloadSummary

CATEGORIES = {"mt-bench": "conversation", "humaneval": "code", "xsum": "summarization"}  # prompt set -> category


def prompt_texts(name: str) -> list[tuple[str, str]]:
    """(item id, user turn) of prompt set `name`, from the store (fetched if missing)."""
    from hat.common import datasets

    if name == "mt-bench":
        return [(f"mt-bench/{q.id}", q.turns[0]) for q in datasets.mt_bench_questions()]
    if name == "humaneval":
        return [(q.id, q.turns[0]) for q in datasets.humaneval_prompts()]
    if name == "xsum":
        return [(q.id, q.turns[0]) for q in datasets.xsum_articles()]
    raise ValueError(f"no prompt set {name!r}; known: {', '.join(CATEGORIES)}")


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """`text` as one user turn in the model's chat template, ready for the assistant's answer."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


def build_prompt_set_workload(tokenizer, sets: tuple[str, ...], count: int, rate_per_s: float, seed: int = 0,
                              max_new_tokens: int = 128, max_prompt_tokens: int = 4096,
                              texts: Callable[[str], list[tuple[str, str]]] = prompt_texts,
                              ) -> tuple[list[WorkloadRequest], WorkloadSummary]:
    """`count` requests mixing `sets` round-robin, arriving as a Poisson process of `rate_per_s`."""
    if not sets or any(s not in CATEGORIES for s in sets):
        raise ValueError(f"prompt sets {list(sets)}: give one or more of {', '.join(CATEGORIES)}")
    if count < 1 or not rate_per_s > 0 or max_new_tokens < 1:
        raise ValueError("a workload needs count >= 1, a positive rate and max_new_tokens >= 1")
    rng = random.Random(seed)
    pools = {}
    for name in dict.fromkeys(sets):
        items = texts(name)
        rng.shuffle(items)
        pools[name] = iter(items)
    requests, skipped, arrival = [], 0, 0.0
    for i in range(count):
        name = sets[i % len(sets)]
        for item_id, text in pools[name]:
            ids = chat_prompt_ids(tokenizer, text)
            if len(ids) <= max_prompt_tokens:
                break
            skipped += 1
        else:
            raise ValueError(f"prompt set {name} has too few prompts of at most {max_prompt_tokens} tokens for "
                             f"{count} requests")
        arrival += rng.expovariate(rate_per_s)
        requests.append(WorkloadRequest(arrival, tuple(ids), max_new_tokens, item_id, CATEGORIES[name]))
    lengths = [len(r.prompt_ids) for r in requests]
    summary = WorkloadSummary(count, statistics.fmean(lengths), statistics.median(lengths), percentile(lengths, 90),
                              skipped, count / requests[-1].arrival_s, f"passed over as longer than "
                                                                       f"{max_prompt_tokens} tokens")
    return requests, summary
