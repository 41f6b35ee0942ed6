"""The testbed report: numbers in results.json, results.csv and summary.md against hand-computed values, the round
trip through load_results, the figures as real PNG images, the ablation table, and degenerate inputs."""
from __future__ import annotations

import csv
import json
import math
import statistics
import warnings

import pytest
from matplotlib.image import imread

from hat.testbed.records import ExperimentRecord, SystemSummary, TimelineStep
from hat.testbed import report as report_module
from hat.testbed.report import CSV_FIELDS, Results, _median_request, load_results, write_report

TTFT_SLO, TBT_SLO = 600.0, 30.0
NOTES = ["device compute emulated by sleeping the profiled time", "links shaped to 20 Mbit/s, 30 ms RTT"]
ALWAYS = ["ttft_cdf.png", "tbt_cdf.png", "ttft_vs_prompt.png", "timeline.png"]


def timeline(scale: float) -> list[TimelineStep]:
    prefill = [TimelineStep("prefill", 256, i * 30.0 * scale, 40.0 * scale, 15.0 * scale, 4.0) for i in range(3)]
    decode = [TimelineStep("decode", 3, 120.0 * scale + i * 25.0, 20.0, 8.0, 2.0, accepted=1) for i in range(4)]
    return prefill + decode


def record(system: str, i: int, scale: float, **kw) -> ExperimentRecord:
    """Request i of a system: TTFT (i+1)*100 ms times `scale`, TBT [10, 20, 30, 40] times `scale`."""
    fields = dict(system=system, request=i, device=i % 3, device_class="orin-nano" if i % 2 else "orin-agx",
                  arrival_s=float(i), started_s=i + 0.25, finished_s=i + 2.0, prompt_tokens=100 * (i + 1),
                  new_tokens=5, ttft_ms=100.0 * (i + 1) * scale, generation_ttft_ms=90.0 * (i + 1) * scale,
                  tbt_ms=[10.0 * scale, 20.0 * scale, 30.0 * scale, 40.0 * scale], accept_len=2.0 / scale,
                  bytes_up=1000, bytes_down=3000, chunks=[256, 256, 100 * (i + 1) - 512], timeline=timeline(scale))
    fields.update(kw)
    return ExperimentRecord(**fields)


def two_systems() -> dict[str, list[ExperimentRecord]]:
    """A: ten completed requests and one failed (TTFT 5 ms, which must not count); B: twice A's latencies."""
    a = [record("A", i, 1.0) for i in range(10)]
    a.append(record("A", 10, 1.0, ttft_ms=5.0, tbt_ms=[1.0], error="device lost"))
    b = [record("B", i, 2.0, bytes_up=1024 * 1024, bytes_down=0) for i in range(10)]
    return {"A": a, "B": b}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    records = two_systems()
    assert write_report(out, "toy", records, TTFT_SLO, TBT_SLO, NOTES) == out
    return out, records


def section(md: str, title: str | None) -> str:
    """The systems table (title None) or the section under `## title`."""
    if title is None:
        return md.split("\n## ")[0]
    return md[md.index(f"## {title}"):].split("\n## ")[0]


def md_row(md: str, first_cell: str, title: str | None = None) -> list[str]:
    rows = [line for line in section(md, title).splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, rows
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_summary_in_results_json_equals_hand_computed_percentiles(report):
    out, _ = report
    data = json.loads((out / "results.json").read_text())
    assert data["scenario"] == "toy" and data["slo"] == {"ttft_ms": TTFT_SLO, "tbt_ms": TBT_SLO}
    assert data["notes"] == NOTES
    a, b = data["summary"]
    assert (a["system"], a["requests"], a["completed"], b["system"], b["completed"]) == ("A", 11, 10, "B", 10)
    # TTFTs 100..1000: rank (n-1)q -> p50 between 500 and 600, p90 = 900 + 0.1*100, p99 = 900 + 0.91*100
    assert a["ttft_ms"] == pytest.approx([550, 910, 991])
    assert b["ttft_ms"] == pytest.approx([1100, 1820, 1982])
    # 40 intervals, ten each of 10, 20, 30, 40: p50 halfway between the 20th and 21st (20 and 30)
    assert a["tbt_ms"] == pytest.approx([25, 25, 25])  # every request's mean TBT is 25 ms (B: 50)
    assert b["tbt_ms"] == pytest.approx([50, 50, 50])
    assert (a["accept_len"], b["accept_len"]) == (2.0, 1.0)
    assert a["tokens_per_s"] == pytest.approx(50 / 11)  # first arrival 0 (the failed one counts), last finish 11
    assert a["slo_attainment"] == pytest.approx(6 / 11)  # TTFT <= 600 for six, mean TBT 25; the failed never meets
    assert b["slo_attainment"] == 0.0  # mean TBT 50 > 30
    assert (a["bytes_per_request"], b["bytes_per_request"]) == (4000, 1024 * 1024)
    assert list(data["records"]) == ["A", "B"] and len(data["records"]["A"]) == 11


def test_csv_has_one_row_per_request_equal_to_the_records(report):
    out, records = report
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_FIELDS
        rows = list(reader)
    every = [r for rs in records.values() for r in rs]
    assert len(rows) == len(every) == 21
    for row, r in zip(rows, every):
        assert (row["system"], int(row["request"]), int(row["device"]), row["device_class"]) == (
            r.system, r.request, r.device, r.device_class)
        for name in ("arrival_s", "started_s", "finished_s", "ttft_ms", "generation_ttft_ms", "accept_len"):
            assert float(row[name]) == getattr(r, name), name  # written exactly (repr)
        for name in ("prompt_tokens", "new_tokens", "bytes_up", "bytes_down"):
            assert int(row[name]) == getattr(r, name), name
        assert float(row["tbt_ms_mean"]) == pytest.approx(statistics.fmean(r.tbt_ms))
        assert [int(c) for c in row["chunks"].split(";")] == r.chunks
        assert row["error"] == r.error
    assert float(rows[0]["tbt_ms_p90"]) == pytest.approx(37.0)  # [10, 20, 30, 40]: rank 2.7 -> 30 + 0.7*10
    assert float(rows[10]["tbt_ms_p90"]) == 1.0 and rows[10]["error"] == "device lost"
    assert rows[0]["chunks"] == "256;256;-412" and rows[9]["chunks"] == "256;256;488"


def test_summary_md_has_the_numbers_formatted(report):
    out, _ = report
    md = (out / "summary.md").read_text()
    assert md_row(md, "A") == ["A", "10/11", "550.0", "910.0", "991.0", "25.0", "25.0", "25.0", "2.00", "4.5",
                               "54.5%", "3.9 KiB"]
    assert md_row(md, "B") == ["B", "10/10", "1,100.0", "1,820.0", "1,982.0", "50.0", "50.0", "50.0", "1.00", "4.5",
                               "0.0%", "1.00 MiB"]
    assert "TTFT ≤ 600 ms" in md and "mean TBT ≤ 30 ms" in md
    assert all(f"- {n}" in md for n in NOTES)
    assert "Ablation" not in md
    assert all(f"]({name})" in md for name in ALWAYS) and "ablation.png" not in md


def test_load_results_round_trips_exactly(report):
    out, records = report
    loaded = load_results(out / "results.json")
    assert loaded == Results(records, "toy", TTFT_SLO, TBT_SLO, NOTES, None, None)
    assert load_results(out) == loaded  # the folder works too
    assert isinstance(loaded.records_by_system["A"][0].timeline[0], TimelineStep)


def assert_real_png(path, min_w=400, min_h=250):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path.name
    image = imread(path)
    h, w = image.shape[:2]
    assert w >= min_w and h >= min_h, (path.name, image.shape)
    # something is drawn: many distinct colours, and not mostly one
    flat = image[..., :3].reshape(-1, 3)
    colours = {tuple(px) for px in flat[:: max(1, len(flat) // 20000)].round(2).tolist()}
    assert len(colours) > 20, path.name
    assert 0.02 < float((flat.mean(axis=1) < 0.9).mean()) < 0.9, path.name  # some ink, not a black block


def test_every_figure_is_a_real_png_and_no_ablation_without_steps(report):
    out, _ = report
    for name in ALWAYS:
        assert_real_png(out / name)
    assert not (out / "ablation.png").exists()


def test_the_timeline_shows_the_last_systems_median_ttft_request():
    system, picked = _median_request(two_systems())
    assert system == "B" and picked.request == 4 and picked.ttft_ms == 1000.0  # lower median of ten
    one = {"X": [record("X", 0, 1.0), record("X", 1, 1.0, error="x")]}
    assert _median_request(one)[1].request == 0
    assert _median_request({"X": [record("X", 0, 1.0, error="x")]}) == ("X", None)
    assert _median_request({}) == ("", None)
    # cloud-only listed last (its timeline: token gaps the cloud did not time) gives way to the last split system
    gaps = [TimelineStep("decode", 1, 0.0, 50.0, 0.0, 0.0)]
    last = {**two_systems(), "cloud-only": [record("cloud-only", i, 1.0, timeline=gaps) for i in range(3)]}
    assert _median_request(last)[0] == "B"
    assert _median_request({"cloud-only": last["cloud-only"]})[0] == "cloud-only"


def ablation_records() -> dict[str, list[ExperimentRecord]]:
    """base like A above (p50s 550 and 25); +chunking halves TTFT; +speculation also cuts TBT to 0.8x."""
    return {"base": [record("base", i, 1.0) for i in range(10)],
            "+chunking": [record("+chunking", i, 1.0, ttft_ms=50.0 * (i + 1)) for i in range(10)],
            "+speculation": [record("+speculation", i, 0.8, ttft_ms=50.0 * (i + 1)) for i in range(10)]}


def test_ablation_table_changes_against_base_and_paper_columns(tmp_path):
    steps = ["base", "+chunking", "+speculation", "+parallel drafting"]
    paper = {"base": {"tbt_ms": 50.0}, "+speculation": {"tbt_ms": 40.0}, "+all": {"tbt_ms": 20.0}}
    write_report(tmp_path, "abl", ablation_records(), TTFT_SLO, TBT_SLO, NOTES, ablation=steps, paper=paper)
    md = (tmp_path / "summary.md").read_text()
    header = md_row(md, "Step", "Ablation")
    assert header == ["Step", "TTFT p50 (ms)", "vs base", "TBT p50 (ms)", "vs base", "Paper TBT p50 (ms)",
                      "Paper vs base"]  # no paper TTFT figures: no such column
    rows = {step: md_row(md, step, "Ablation")[1:] for step in steps}
    assert rows["base"] == ["550.0", "1.00× (+0.0%)", "25.0", "1.00× (+0.0%)", "50.0", "1.00× (+0.0%)"]
    assert rows["+chunking"] == ["275.0", "0.50× (-50.0%)", "25.0", "1.00× (+0.0%)", "—", "—"]
    assert rows["+speculation"] == ["275.0", "0.50× (-50.0%)", "20.0", "0.80× (-20.0%)", "40.0", "0.80× (-20.0%)"]
    assert rows["+parallel drafting"] == ["—"] * 6  # not run, and not in the paper's figures
    assert_real_png(tmp_path / "ablation.png", min_w=700)
    assert "](ablation.png)" in md
    assert load_results(tmp_path).ablation == steps and load_results(tmp_path).paper == paper


def test_paper_ttft_figures_get_their_own_column(tmp_path, monkeypatch):
    monkeypatch.setattr(report_module, "_write_figures", lambda *args: [])  # only the table matters here
    paper = {"base": {"ttft_ms": 800.0, "tbt_ms": 50.0}, "+chunking": {"ttft_ms": 600.0}}
    write_report(tmp_path, "abl", ablation_records(), TTFT_SLO, TBT_SLO, [], ablation=["base", "+chunking"],
                 paper=paper)
    md = (tmp_path / "summary.md").read_text()
    assert md_row(md, "+chunking", "Ablation") == ["+chunking", "275.0", "0.50× (-50.0%)", "600.0",
                                       "0.75× (-25.0%)", "25.0", "1.00× (+0.0%)", "—", "—"]
    assert "## Notes" not in md


def test_paper_figures_without_ablation_compare_every_system(tmp_path, monkeypatch):
    monkeypatch.setattr(report_module, "_write_figures", lambda *args: [])
    write_report(tmp_path, "spec", two_systems(), TTFT_SLO, TBT_SLO, [], paper={"A": {"ttft_ms": 646.0},
                                                                              "B": {"ttft_ms": 384.0}})
    md = (tmp_path / "summary.md").read_text()
    assert "## Ablation" not in md
    assert md_row(md, "B", "Against the paper") == ["B", "1,100.0", "2.00× (+100.0%)", "384.0", "0.59× (-40.6%)",
                                                    "50.0", "2.00× (+100.0%)"]


def test_degenerate_inputs_do_not_crash_and_show_dashes(tmp_path):
    records = {
        "single": [record("single", 0, 1.0)],
        "all failed": [record("all failed", i, 1.0, ttft_ms=math.nan, tbt_ms=[], error="timeout") for i in range(2)],
        "no tbt": [record("no tbt", 0, 1.0, tbt_ms=[], new_tokens=1, timeline=[]),
                   record("no tbt", 1, 1.0, tbt_ms=[], new_tokens=1, timeline=[])],
        "empty": [],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from empty means, no matplotlib complaints either
        write_report(tmp_path, "edge", records, TTFT_SLO, TBT_SLO, NOTES, ablation=["all failed", "single", "empty"],
                     paper={"single": {"tbt_ms": 10.0}})
    md = (tmp_path / "summary.md").read_text()
    assert md_row(md, "single")[:8] == ["single", "1/1", "100.0", "100.0", "100.0", "25.0", "25.0", "25.0"]
    assert md_row(md, "all failed") == ["all failed", "0/2", *["—"] * 8, "0.0%", "—"]
    assert md_row(md, "no tbt")[5:8] == ["—", "—", "—"] and md_row(md, "no tbt")[1] == "2/2"
    assert md_row(md, "empty") == ["empty", "0/0", *["—"] * 10]
    # the ablation's base has no medians: every change is a dash
    assert md_row(md, "single", "Ablation")[1:] == ["100.0", "—", "25.0", "—", "10.0", "—"]
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text  # strict JSON: NaN written as null, in the summary and in the records
    summary = json.loads(text)["summary"]
    assert summary[1]["ttft_ms"] == [None, None, None] and summary[3]["slo_attainment"] is None
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and rows[1]["ttft_ms"] == "" and rows[1]["tbt_ms_mean"] == rows[1]["tbt_ms_p90"] == ""
    loaded = load_results(tmp_path).records_by_system
    assert math.isnan(loaded["all failed"][0].ttft_ms) and loaded["all failed"][0].error == "timeout"
    assert loaded["empty"] == [] and loaded["single"] == records["single"] and loaded["no tbt"] == records["no tbt"]
    for name in ALWAYS + ["ablation.png"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert min(imread(tmp_path / name).shape[:2]) > 200


def test_no_systems_at_all(tmp_path):
    write_report(tmp_path / "nested" / "out", "nothing", {}, TTFT_SLO, TBT_SLO, [])
    md = (tmp_path / "nested" / "out" / "summary.md").read_text()
    assert "| System |" in md
    assert load_results(tmp_path / "nested" / "out") == Results({}, "nothing", TTFT_SLO, TBT_SLO, [], None, None)
    assert all((tmp_path / "nested" / "out" / name).exists() for name in ALWAYS)


def test_tbt_percentiles_are_over_each_requests_mean_time_between_tokens():
    """Speculative decoding delivers several tokens at once (intervals of ~0 between them): the summary's TBT is
    per request, the mean interval (HAT's TBT), not pooled intervals whose median would be 0."""
    records = [record("S", 0, 1.0, tbt_ms=[0.0, 0.0, 0.0, 90.0]), record("S", 1, 1.0, tbt_ms=[10.0, 10.0])]
    summary = SystemSummary.of("S", records, TTFT_SLO, TBT_SLO)
    assert summary.tbt_ms == pytest.approx((16.25, 21.25, 22.375))
