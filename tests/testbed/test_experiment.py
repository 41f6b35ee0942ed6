"""`hat testbed run` end to end on a tiny model: emulated devices (two classes, a power-mode change) behind
emulated links, three systems (the cloud-only baseline and two split ones) on the same workload; every request's
tokens equal transformers' greedy output (so the systems agree), and results, plots and summary are written."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from hat.cli.main import main
from hat.testbed.workloads import SPECBENCH, build_workload

SCENARIO = {
    "name": "tiny", "split": {"input_layers": 2, "output_layers": 1},
    "devices": [
        {"count": 1, "class": "jetson-agx-orin", "power": [[0, "MAXN"]],
         "link": {"up_MBps": 20, "down_MBps": 30, "rtt_ms": 10}},
        {"count": 1, "class": "jetson-agx-xavier", "power": [[0, "MAXN"], [1, "15W"]],
         "link": {"up_MBps": 5, "down_MBps": 10, "rtt_ms": 20}},
    ],
    "workload": {"shape": "specbench", "requests": 4, "rate": 4.0, "max_new_tokens": 8, "seed": 5,
                 "max_prompt_tokens": 120},
    "systems": ["cloud-only", "u-shape", "u-sarathi"],
    "slo": {"ttft_ms": 5000, "tbt_ms": 1000},
}


@pytest.fixture(scope="module")
def run(tiny_checkpoint, tmp_path_factory):
    model_dir = tiny_checkpoint("llama3")
    work = tmp_path_factory.mktemp("testbed")
    scenario = work / "tiny.yaml"
    scenario.write_text(yaml.safe_dump({**SCENARIO, "model": str(model_dir)}))
    out = work / "out"
    done = subprocess.run([sys.executable, "-m", "hat.cli.main", "testbed", "run", str(scenario), "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return model_dir, out, done.stdout


def test_every_request_gets_transformers_greedy_tokens_in_every_system(run):
    model_dir, out, _ = run
    results = json.loads((out / "results.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    w = SCENARIO["workload"]
    requests, _ = build_workload(tokenizer, SPECBENCH, w["requests"], w["rate"], w["seed"], w["max_new_tokens"],
                                 w["max_prompt_tokens"])
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        want = [model.generate(torch.tensor([r.prompt_ids]), max_new_tokens=w["max_new_tokens"], do_sample=False,
                               eos_token_id=model.config.eos_token_id)[0, len(r.prompt_ids):].tolist()
                for r in requests]
    for system in SCENARIO["systems"]:
        records = sorted(results["records"][system], key=lambda r: r["request"])
        assert [r["error"] for r in records] == [""] * len(requests)
        assert [r["output_ids"] for r in records] == want, system
        assert [r["prompt_tokens"] for r in records] == [len(r.prompt_ids) for r in requests]
        assert {r["device"] for r in records} == {0, 1}  # round-robin over both devices
        assert all(r["ttft_ms"] >= r["generation_ttft_ms"] > 0 for r in records)
        assert all(r["timeline"] and r["timeline"][0]["kind"] == "prefill" for r in records)


def test_results_plots_and_summary_are_written(run):
    _, out, stdout = run
    for name in ("results.json", "results.csv", "summary.md", "ttft_cdf.png", "tbt_cdf.png", "ttft_vs_prompt.png",
                 "timeline.png"):
        assert (out / name).stat().st_size > 0, name
    summary = (out / "summary.md").read_text()
    assert all(name in summary for name in SCENARIO["systems"])
    assert "sleep-padded" in summary and "LinkShim" in summary
    assert "results, plots and summary in" in stdout


def test_a_bad_scenario_is_refused_before_anything_runs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**SCENARIO, "systems": ["u-shape", "nonsense"]}))
    with pytest.raises(SystemExit) as refused:  # in process: a new interpreter's imports cost more than the check
        main(["testbed", "run", str(bad), "--out", str(tmp_path / "out")])
    assert "systems: ['nonsense']" in str(refused.value.code)
    assert not (tmp_path / "out").exists()


def test_the_simulator_calibrates_on_the_run(run, tmp_path, capsys):
    """`hat testbed simulate --calibration` replays the run's workload with the devices' own cost models: every
    request completes with the tokens it really generated, and the error against the run is reported per metric."""
    _, out, _ = run
    costs = json.loads((out / "device_costs.json").read_text())
    assert {d["device_class"] for d in costs["u-shape"]} == {"jetson-agx-orin", "jetson-agx-xavier"}
    assert all(d["cloud"] and d["input"]["per_token_s"] > 0 for d in costs["u-shape"])
    assert main(["testbed", "simulate", str(out.parent / "tiny.yaml"), "--calibration", str(out), "--out",
                 str(tmp_path / "sim"), "--no-progress"]) == 0  # in process: a new interpreter costs seconds more
    stdout = capsys.readouterr().out
    real = json.loads((out / "results.json").read_text())["records"]
    simulated = json.loads((tmp_path / "sim" / "results.json").read_text())["records"]
    for system in SCENARIO["systems"]:
        assert ([(r["request"], r["new_tokens"]) for r in simulated[system]]
                == [(r["request"], r["new_tokens"]) for r in real[system]]), system
    rows = json.loads((tmp_path / "sim" / "validation.json").read_text())
    assert {r["system"] for r in rows} == set(SCENARIO["systems"])
    assert all(r["real"] > 0 and r["simulated"] > 0 for r in rows if r["metric"].startswith(("TTFT", "TBT")))
    assert "Simulator against the real run" in stdout


def test_the_adapter_note_gives_its_training_figures(tmp_path):
    from hat.testbed.experiment import _adapter_note

    assert _adapter_note(tmp_path).endswith("(no training summary beside it)")
    (tmp_path / "training_summary.json").write_text(json.dumps({"final": {"top1_agreement": 0.2163,
                                                                          "accept_len": 1.25}}))
    note = _adapter_note(tmp_path)
    assert str(tmp_path) in note and "top-1 agreement with the model 0.216" in note and "accepted length 1.25" in note
