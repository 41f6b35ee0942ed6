"""Workloads from real prompt sets: the mix, the chat template, prompts passed over (never cut), and the per-category
table of the report; speculative systems left out when the model has no draft adapter."""
from __future__ import annotations

import copy
import dataclasses
import statistics

import pytest
from transformers import AutoTokenizer

from hat.common.default_model import reference_model_dir
from hat.testbed.experiment import _runnable
from hat.testbed.prompt_sets import CATEGORIES, build_prompt_set_workload, chat_prompt_ids
from hat.testbed.records import ExperimentRecord
from hat.testbed.report import write_report
from hat.testbed.scenario import ScenarioError, parse_scenario, quick_variant
from test_scenario import VALID

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(reference_model_dir()), local_files_only=True)


def fake_sets(name: str) -> list[tuple[str, str]]:
    """Ten items per set; the summarization set's odd items are long."""
    words = {"mt-bench": "explain", "humaneval": "def f(x):", "xsum": "The council met."}[name]
    return [(f"{name}/{i}", f"{words} {i} " + ("word " * 400 if name == "xsum" and i % 2 else "")) for i in range(10)]


def test_the_sets_mix_round_robin_without_repeats_and_long_prompts_are_passed_over_whole(tokenizer):
    sets = ("mt-bench", "humaneval", "xsum")
    requests, summary = build_prompt_set_workload(tokenizer, sets, 12, 2.0, seed=4, max_new_tokens=16,
                                                  max_prompt_tokens=200, texts=fake_sets)
    assert [r.category for r in requests] == [CATEGORIES[s] for s in sets] * 4
    texts = {name: dict(fake_sets(name)) for name in sets}
    for r in requests:
        name = r.source.split("/")[0]
        assert r.prompt_ids == tuple(tokenizer(texts[name][r.source])["input_ids"])  # whole: no template here
        assert len(r.prompt_ids) <= 200 and r.max_new_tokens == 16
    assert len({r.source for r in requests}) == 12  # no item twice
    assert all(int(r.source.split("/")[1]) % 2 == 0 for r in requests if r.category == "summarization")
    assert summary.clipped >= 1 and "passed over" in summary.line()  # the long odd articles met on the way
    assert summary.mean_tokens == pytest.approx(statistics.fmean(len(r.prompt_ids) for r in requests))
    again, _ = build_prompt_set_workload(tokenizer, sets, 12, 2.0, seed=4, max_new_tokens=16, max_prompt_tokens=200,
                                         texts=fake_sets)
    other, _ = build_prompt_set_workload(tokenizer, sets, 12, 2.0, seed=5, max_new_tokens=16, max_prompt_tokens=200,
                                         texts=fake_sets)
    assert again == requests and [r.source for r in other] != [r.source for r in requests]
    with pytest.raises(ValueError, match="too few prompts"):  # five short articles cannot fill six requests
        build_prompt_set_workload(tokenizer, ("xsum",), 6, 2.0, max_prompt_tokens=200, texts=fake_sets)
    with pytest.raises(ValueError, match="prompt sets"):
        build_prompt_set_workload(tokenizer, ("gsm8k",), 2, 2.0, texts=fake_sets)


def test_a_chat_model_gets_its_template_with_the_generation_prompt(tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = TEMPLATE
    ids = chat_prompt_ids(chat, "Summarize this.")
    assert ids == tokenizer("<|user|>Summarize this.<|end|><|assistant|>", add_special_tokens=False)["input_ids"]
    assert chat_prompt_ids(tokenizer, "Summarize this.") == tokenizer("Summarize this.")["input_ids"]


def test_scenarios_take_prompt_sets_or_a_shape_and_a_quick_variant():
    data = copy.deepcopy(VALID)
    data["workload"] = {"prompts": ["mt-bench", "xsum"], "requests": 8, "rate": 1.0}
    data["quick"] = {"requests": 2, "max_new_tokens": 8}
    s = parse_scenario(data)
    assert (s.workload.prompts, s.workload.shape) == (("mt-bench", "xsum"), "")
    q = quick_variant(s)
    assert (q.name, q.workload.requests, q.workload.max_new_tokens, q.workload.prompts) == \
        ("t-quick", 2, 8, ("mt-bench", "xsum"))
    assert quick_variant(parse_scenario(copy.deepcopy(VALID))).workload.requests == 4  # the default quick
    for workload, message in (({"prompts": ["gsm8k"]}, "workload.prompts: \\['gsm8k'\\]"),
                              ({"prompts": ["xsum"], "shape": "specbench"}, "not both")):
        bad = copy.deepcopy(VALID)
        bad["workload"] = {"requests": 2, "rate": 1.0, **workload}
        with pytest.raises(ScenarioError, match=message):
            parse_scenario(bad)
    bad = copy.deepcopy(data)
    bad["quick"] = {"prompts": ["xsum"]}
    with pytest.raises(ScenarioError, match="quick: unknown keys"):
        parse_scenario(bad)


def test_speculative_systems_are_left_out_without_a_draft_adapter(tmp_path):
    data = copy.deepcopy(VALID)
    data["systems"] = ["u-shape", "split-spec", "cloud-only", "full"]
    scenario = parse_scenario(data)
    kept, skipped = _runnable(scenario, tmp_path)
    assert (kept.systems, skipped) == (("u-shape", "cloud-only"), ["split-spec", "full"])
    (tmp_path / "adapter").mkdir()
    assert _runnable(scenario, tmp_path) == (scenario, [])
    with pytest.raises(ValueError, match="every system"):
        _runnable(dataclasses.replace(scenario, systems=("full",)), tmp_path / "none")


def test_the_report_gives_each_category_apart(tmp_path):
    def rec(i, category, ttft, tbt):
        return ExperimentRecord("u-shape", i, 0, "orin", float(i), float(i), i + 1.0, 10 * (i + 1), 4, ttft, ttft,
                                [tbt, tbt + 2], 1.0, category=category)

    records = [rec(0, "code", 100.0, 10.0), rec(1, "code", 300.0, 30.0), rec(2, "code", 200.0, 20.0),
               rec(3, "summarization", 900.0, 50.0)]
    records.append(dataclasses.replace(rec(4, "summarization", 1.0, 1.0), error="lost"))
    md = (write_report(tmp_path, "mix", {"u-shape": records}, 1000.0, 100.0, []) / "summary.md").read_text()
    table = md[md.index("## Per category"):].split("\n## ")[0]
    assert "| u-shape | code | 3/3 | 20 | 200.0 | 21.0 | 1.00 | 4 |" in table  # TBT: median of the means 11, 21, 31
    assert "| u-shape | summarization | 1/2 | 45 | 900.0 | 51.0 | 1.00 | 4 |" in table
    plain = (write_report(tmp_path / "plain", "p", {"u-shape": [rec(0, "", 1.0, 1.0)]}, 1000.0, 100.0, [])
             / "summary.md").read_text()
    assert "Per category" not in plain
