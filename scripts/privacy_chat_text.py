"""The privacy probe's text on a chat model, in the model's chat template, as a device would run it.

- Training (the attacker's own text): ShareGPT conversations (hat.common.datasets.sharegpt_conversations) in file
  order, each the first `seq_len` tokens of the templated conversation (a prompt's start: the distribution of
  the positions scored). The template's fixed opening (the default system prompt and `<|im_start|>user\\n`,
  identical for every prompt: nothing private) is not counted.
- Scoring (never trained on): MT-Bench's first turns and HumanEval's prompts, each as one user message with the
  generation prompt, whole. Only the positions of the user's text are counted (tokens whose characters overlap
  it), not the template's.
A window is a list of token ids with a keep mask of the same length: the positions counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

MIN_COUNTED = 16  # a training window with fewer counted positions is skipped


@dataclass(frozen=True, slots=True)
class Windows:
    name: str  # "sharegpt", "mt-bench", "humaneval"
    ids: list[list[int]]  # token ids per window, the template's included
    keep: list[list[bool]]  # per window and position: counted (True) or context only

    @property
    def counted(self) -> int:
        return sum(map(sum, self.keep))


def template_ids(tokenizer, messages: list[dict], generation_prompt: bool = False) -> tuple[str, list[int]]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


def fixed_opening(tokenizer) -> list[int]:
    """The token ids every one-user-message prompt starts with (the template's text before the user's)."""
    a = template_ids(tokenizer, [{"role": "user", "content": "Alpha"}])[1]
    b = template_ids(tokenizer, [{"role": "user", "content": "Zulu"}])[1]
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def training_windows(conversations: Iterable[list[dict]], tokenizer, max_tokens: int, seq_len: int,
                     progress=None) -> Windows:
    """Windows of the first `seq_len` tokens of each conversation, `max_tokens` counted positions in all (the last
    window cut to the budget): every position after the fixed opening (after the first token when a conversation
    starts otherwise, e.g. with its own system message). `progress(n)` is called with each window's count."""
    opening = fixed_opening(tokenizer)
    ids_all, keep_all, total = [], [], 0
    for messages in conversations:
        if total >= max_tokens:
            break
        ids = template_ids(tokenizer, messages)[1][:seq_len]
        skip = len(opening) if ids[:len(opening)] == opening else 1
        count = min(len(ids) - skip, max_tokens - total)
        if count < min(MIN_COUNTED, max_tokens - total):
            continue
        ids_all.append(ids[:skip + count])
        keep_all.append([False] * skip + [True] * count)
        total += count
        if progress:
            progress(count)
    return Windows("sharegpt", ids_all, keep_all)


def prompt_windows(name: str, prompts: Sequence[str], tokenizer) -> Windows:
    """One window per prompt (a user message and the generation prompt, whole), counting the tokens whose characters
    overlap the prompt's text."""
    ids_all, keep_all = [], []
    for prompt in prompts:
        text, _ = template_ids(tokenizer, [{"role": "user", "content": prompt}], generation_prompt=True)
        start = text.rindex(prompt)  # the user's text follows any system prompt
        end = start + len(prompt)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        keep = [a < end and b > start for a, b in encoded["offset_mapping"]]
        if any(keep):
            ids_all.append(list(encoded["input_ids"]))
            keep_all.append(keep)
    return Windows(name, ids_all, keep_all)


def scoring_sets(tokenizer) -> list[Windows]:
    """MT-Bench's 80 first turns and HumanEval's 164 prompts (the store's copies, fetched when missing)."""
    from hat.common.datasets import humaneval_prompts, mt_bench_questions

    return [prompt_windows("mt-bench", [q.turns[0] for q in mt_bench_questions()], tokenizer),
            prompt_windows("humaneval", [q.turns[0] for q in humaneval_prompts()], tokenizer)]
