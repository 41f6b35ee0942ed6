"""The report of one testbed experiment: results.json, results.csv, summary.md and figures.

`hat testbed run SCENARIO.yaml` calls `write_report` once every system of the scenario has served the workload.
It writes, into the output folder:

- results.json: scenario, SLO targets, notes, ablation steps and paper figures (if any), one `SystemSummary` per
  system (in the given order) and every `ExperimentRecord`; strict JSON, NaN written as null. `load_results` reads
  it back exactly (null in a record back to NaN).
- results.csv: one row per request (per-request TBT as its mean and p90; chunk sizes as "a;b;c"; NaN as "").
- summary.md: a table of the systems, a table per system and prompt category (real prompt sets), an ablation table when ablation steps are given (each step's median TTFT and
  TBT against the first step, and the paper's figures beside ours when given; with paper figures but no ablation,
  the same table over every system), the notes, and the figures.
- ttft_cdf.png, tbt_cdf.png, ttft_vs_prompt.png, timeline.png (the cloud rounds of the request with the median TTFT
  of the last split system: not cloud-only, whose rounds the cloud does not time) and ablation.png (only with ablation steps).

Failed records (error != "") count as requests but stay out of every latency figure. Figures are drawn with
matplotlib's object API on the Agg canvas (no pyplot, no display, no global figure registry); without matplotlib
the other files are still written and summary.md says the figures are missing.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

from hat.testbed.records import ExperimentRecord, SystemSummary, percentile

DASH = "—"
CSV_FIELDS = ("system", "request", "device", "device_class", "arrival_s", "started_s", "finished_s", "prompt_tokens",
              "new_tokens", "ttft_ms", "generation_ttft_ms", "tbt_ms_mean", "tbt_ms_p90", "accept_len", "bytes_up",
              "bytes_down", "chunks", "error", "category")
ABLATION_METRICS = (("TTFT p50 (ms)", "ttft_ms"), ("TBT p50 (ms)", "tbt_ms"))  # paper dicts use these keys
WIDE_SPREAD = 20  # log axis when the largest value is more than this many times the smallest


class Results(NamedTuple):
    """What results.json holds, in `write_report`'s terms (`write_report(out, **results._asdict())` redraws it)."""
    records_by_system: dict[str, list[ExperimentRecord]]
    scenario_name: str
    ttft_slo_ms: float
    tbt_slo_ms: float
    notes: list[str]
    ablation: list[str] | None = None
    paper: dict | None = None


def write_report(out_dir, scenario_name: str, records_by_system: dict[str, list[ExperimentRecord]],
                 ttft_slo_ms: float, tbt_slo_ms: float, notes: list[str], ablation: list[str] | None = None,
                 paper: dict | None = None) -> Path:
    """Write every report file into `out_dir` (created if needed); returns that folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = [SystemSummary.of(s, rs, ttft_slo_ms, tbt_slo_ms) for s, rs in records_by_system.items()]
    _write_json(out / "results.json", scenario_name, records_by_system, ttft_slo_ms, tbt_slo_ms, notes, ablation,
                paper, summaries)
    _write_csv(out / "results.csv", records_by_system)
    figures = _write_figures(out, scenario_name, records_by_system, ttft_slo_ms, tbt_slo_ms, ablation, paper)
    md = _markdown(scenario_name, summaries, ttft_slo_ms, tbt_slo_ms, notes, ablation, paper, figures,
                   _categories_table(records_by_system))
    (out / "summary.md").write_text(md, encoding="utf-8")
    return out


def load_results(path) -> Results:
    """Read results.json (or the folder holding it) back."""
    path = Path(path)
    data = json.loads((path / "results.json" if path.is_dir() else path).read_text(encoding="utf-8"))
    records = {s: [ExperimentRecord.from_json(_nan(r)) for r in rs] for s, rs in data["records"].items()}
    return Results(records, data["scenario"], data["slo"]["ttft_ms"], data["slo"]["tbt_ms"], data["notes"],
                   data.get("ablation"), data.get("paper"))


# --- results.json and results.csv -------------------------------------------------------------------------------

def _finite(value):
    """NaN and infinities as None (null in JSON), inside lists, tuples and dicts too."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _nan(value):
    """Back from `_finite` for a record: no record field is ever None, so every null was a NaN."""
    if isinstance(value, dict):
        return {k: _nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan(v) for v in value]
    return math.nan if value is None else value


def _write_json(path, scenario, records_by_system, ttft_slo_ms, tbt_slo_ms, notes, ablation, paper, summaries):
    data = {"scenario": scenario, "slo": {"ttft_ms": ttft_slo_ms, "tbt_ms": tbt_slo_ms}, "notes": list(notes),
            "ablation": ablation, "paper": paper,
            "summary": [asdict(s) for s in summaries],
            "records": {s: [r.to_json() for r in rs] for s, rs in records_by_system.items()}}
    path.write_text(json.dumps(_finite(data), separators=(",", ":"), allow_nan=False), encoding="utf-8")


def _cell(value) -> object:
    return "" if isinstance(value, float) and not math.isfinite(value) else value


def _csv_row(r: ExperimentRecord) -> list:
    tbt_mean = statistics.fmean(r.tbt_ms) if r.tbt_ms else math.nan
    return [_cell(v) for v in (r.system, r.request, r.device, r.device_class, r.arrival_s, r.started_s, r.finished_s,
                               r.prompt_tokens, r.new_tokens, r.ttft_ms, r.generation_ttft_ms, tbt_mean,
                               percentile(r.tbt_ms, 90), r.accept_len, r.bytes_up, r.bytes_down,
                               ";".join(map(str, r.chunks)), r.error, r.category)]


def _write_csv(path, records_by_system):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        writer.writerows(_csv_row(r) for rs in records_by_system.values() for r in rs)


# --- summary.md ---------------------------------------------------------------------------------------------------

def _num(x, digits: int = 1, suffix: str = "") -> str:
    return DASH if x is None or not math.isfinite(x) else f"{x:,.{digits}f}{suffix}"


def _bytes(x: float) -> str:
    if not math.isfinite(x) or x < 1024:
        return _num(x, 0, " B")
    return f"{x / 1024:,.1f} KiB" if x < 1024 ** 2 else f"{x / 1024 ** 2:,.2f} MiB"


def _change(value, base) -> str:
    """`value` against `base`: ratio and percent change, e.g. "0.62× (-38.0%)"."""
    if value is None or base is None or not (math.isfinite(value) and math.isfinite(base)) or base == 0:
        return DASH
    return f"{value / base:.2f}× ({(value / base - 1) * 100:+.1f}%)"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = [[str(c).replace("|", "\\|") for c in row] for row in [header, *rows]]
    return ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in esc[1:])]


def _systems_table(summaries: list[SystemSummary]) -> list[str]:
    header = ["System", "Completed", "TTFT p50 (ms)", "TTFT p90 (ms)", "TTFT p99 (ms)", "TBT p50 (ms)", "TBT p90 (ms)",
              "TBT p99 (ms)", "Accept length", "Tokens/s", "SLO attainment", "Bytes/request"]
    rows = [[s.system, f"{s.completed}/{s.requests}", *map(_num, s.ttft_ms), *map(_num, s.tbt_ms),
             _num(s.accept_len, 2), _num(s.tokens_per_s), _num(s.slo_attainment * 100, 1, "%"),
             _bytes(s.bytes_per_request)] for s in summaries]
    return _table(header, rows)


def _p50(summary: SystemSummary | None, key: str) -> float:
    return getattr(summary, key)[0] if summary else math.nan


def _ablation_table(steps: list[str], summaries: list[SystemSummary], paper: dict | None) -> list[str]:
    by_name = {s.system: s for s in summaries}
    paper = paper or {}
    paper_keys = {k for _, k in ABLATION_METRICS if any(k in (figures or {}) for figures in paper.values())}
    header = ["Step"]
    for label, key in ABLATION_METRICS:
        header += [label, "vs base"] + ([f"Paper {label}", "Paper vs base"] if key in paper_keys else [])
    rows = []
    for step in steps:
        row = [step]
        for _, key in ABLATION_METRICS:
            ours, base = _p50(by_name.get(step), key), _p50(by_name.get(steps[0]), key)
            row += [_num(ours), _change(ours, base)]
            if key in paper_keys:
                theirs, their_base = ((paper.get(s) or {}).get(key) for s in (step, steps[0]))
                row += [_num(theirs), _change(theirs, their_base)]
        rows.append(row)
    return _table(header, rows)


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _categories_table(records_by_system: dict[str, list[ExperimentRecord]]) -> list[str]:
    """Per system and prompt category (real prompt sets), medians over its completed requests; [] without any."""
    categories = sorted({r.category for rs in records_by_system.values() for r in rs if r.category})
    if not categories:
        return []
    header = ["System", "Category", "Completed", "Prompt tokens (mean)", "TTFT p50 (ms)", "TBT p50 (ms)",
              "Accept length", "New tokens (mean)"]
    rows = []
    for system, records in records_by_system.items():
        for category in categories:
            mine = [r for r in records if r.category == category]
            done = _done(mine)
            tbts = [statistics.fmean(r.tbt_ms) for r in done if r.tbt_ms]
            rows.append([system, category, f"{len(done)}/{len(mine)}", _num(_mean([r.prompt_tokens for r in mine]), 0),
                         _num(percentile([r.ttft_ms for r in done], 50)), _num(percentile(tbts, 50)),
                         _num(_mean([r.accept_len for r in done]), 2), _num(_mean([r.new_tokens for r in done]), 0)])
    return _table(header, rows)


def _markdown(scenario, summaries, ttft_slo_ms, tbt_slo_ms, notes, ablation, paper, figures,
              categories: list[str] = ()) -> str:
    lines = [f"# Testbed results: {scenario}", "",
             f"SLO targets: TTFT ≤ {ttft_slo_ms:g} ms, mean TBT ≤ {tbt_slo_ms:g} ms. Latency figures cover "
             "completed requests only; SLO attainment is over all requests.", "", *_systems_table(summaries), ""]
    if categories:
        lines += ["## Per category", "", "Each prompt category's requests apart (medians over completed ones).", "",
                  *categories, ""]
    steps = ablation or ([s.system for s in summaries] if paper and summaries else None)
    if steps:  # the ablation, or (paper figures given without one) every system against the first and the paper
        lines += ["## Ablation" if ablation else "## Against the paper", "",
                  f"Each {'step' if ablation else 'system'}'s median against the first ({steps[0]}).", "",
                  *_ablation_table(steps, summaries, paper), ""]
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    lines += ["## Figures", ""]
    lines += [f"![{f.removesuffix('.png')}]({f})" for f in figures] if figures is not None else [
        "Not drawn: matplotlib is not installed."]
    return "\n".join(lines) + "\n"


# --- figures ------------------------------------------------------------------------------------------------------

def _done(records) -> list[ExperimentRecord]:
    return [r for r in records if not r.error]


def _new_axes(title: str, xlabel: str, ylabel: str, size=(7.5, 4.6), cols: int = 1):
    from matplotlib.figure import Figure
    fig = Figure(figsize=size, dpi=110, layout="constrained")
    axes = fig.subplots(1, cols, squeeze=False)[0]
    (fig.suptitle if cols > 1 else axes[0].set_title)(title)  # over the axes only: clear of a legend beside them
    for ax in axes:
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
    return fig, axes if cols > 1 else axes[0]


def _wide(values: list[float]) -> bool:
    return bool(values) and min(values) > 0 and max(values) / min(values) > WIDE_SPREAD


def _no_data(ax, text: str = "no completed requests"):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _legend(fig, **kw):
    """Beside the axes (never over the data), when anything has a label."""
    if any(ax.get_legend_handles_labels()[0] for ax in fig.axes):
        fig.legend(loc="outside right upper", fontsize="small", **kw)


def _cdf(path, title, xlabel, ylabel, series: dict[str, list[float]], slo_ms: float):
    fig, ax = _new_axes(title, xlabel, ylabel)
    for i, (name, values) in enumerate(series.items()):
        xs = sorted(v for v in values if math.isfinite(v))
        ys = [k / len(xs) for k in range(len(xs) + 1)] if xs else []  # from 0 at the smallest value
        ax.step(xs[:1] + xs, ys, where="post", color=f"C{i}", label=f"{name} (n={len(xs)})" if xs else
                f"{name} (no data)")
    every = [v for vs in series.values() for v in vs if math.isfinite(v)]
    if not every:
        _no_data(ax)
    if _wide(every + ([slo_ms] if slo_ms > 0 else [])):
        ax.set_xscale("log")
    if math.isfinite(slo_ms) and slo_ms > 0:
        ax.axvline(slo_ms, ls="--", color="k", lw=1, label=f"SLO target {slo_ms:g} ms")
    ax.set_ylim(0, 1.02)
    _legend(fig)
    fig.savefig(path)


def _binned_medians(xs, ys, bins: int = 8) -> tuple[list[float], list[float]]:
    """Medians of equal-count bins (at least three points each) along x."""
    pairs = sorted(zip(xs, ys))
    k = min(bins, len(pairs) // 3)
    parts = [pairs[b * len(pairs) // k:(b + 1) * len(pairs) // k] for b in range(k)]
    return [statistics.median(p[0] for p in part) for part in parts], [statistics.median(p[1] for p in part)
                                                                        for part in parts]


def _ttft_vs_prompt(path, scenario, records_by_system):
    fig, ax = _new_axes(f"TTFT against prompt length — {scenario}", "prompt length (tokens)", "TTFT (ms)")
    every = []
    for i, (name, records) in enumerate(records_by_system.items()):
        done = _done(records)
        xs, ys = [r.prompt_tokens for r in done], [r.ttft_ms for r in done]
        every += [y for y in ys if math.isfinite(y)]
        ax.scatter(xs, ys, s=12, alpha=0.45, color=f"C{i}")
        ax.plot(*_binned_medians(xs, ys), color=f"C{i}", lw=2, marker="o", ms=3, label=name if done else
                f"{name} (no data)")
    if not every:
        _no_data(ax)
    if _wide(every):
        ax.set_yscale("log")
    _legend(fig, title="dots: requests\nline: binned median", title_fontsize="small")
    fig.savefig(path)


def _short(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else DASH


def _ablation_plot(path, scenario, steps, records_by_system, ttft_slo_ms, tbt_slo_ms, paper):
    summaries = {s: SystemSummary.of(s, records_by_system.get(s, []), ttft_slo_ms, tbt_slo_ms) for s in steps}
    fig, axes = _new_axes(f"Ablation (medians) — {scenario}", "ablation step", "", size=(10, 4.6), cols=2)
    for ax, (label, key) in zip(axes, ABLATION_METRICS):
        theirs = [((paper or {}).get(s) or {}).get(key, math.nan) for s in steps]
        width = 0.4 if any(map(math.isfinite, theirs)) else 0.7
        offset = width / 2 if width < 0.5 else 0
        bars = ax.bar([i - offset for i in range(len(steps))], [_p50(summaries[s], key) for s in steps], width,
                      color="C0", label="this testbed")
        ax.bar_label(bars, labels=[_short(b.get_height()) for b in bars], fontsize="small")
        for i, bar in enumerate(bars):
            if not math.isfinite(bar.get_height()):
                ax.text(i - offset, 0, "no data", ha="center", va="bottom", rotation=90, color="0.4")
        if offset:
            bars = ax.bar([i + offset for i in range(len(steps))], theirs, width, color="C1", label="paper")
            ax.bar_label(bars, labels=[_short(b.get_height()) for b in bars], fontsize="small")
        ax.set_xticks(range(len(steps)), steps, rotation=20, ha="right")
        ax.set(title=label, ylabel=label.replace(" p50", ", median"))
        ax.margins(y=0.15)
    legend = {}  # label -> handle, over both panels (the paper may give one metric only)
    for ax in axes:
        legend.update(zip(reversed(ax.get_legend_handles_labels()[1]), reversed(ax.get_legend_handles_labels()[0])))
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=2, fontsize="small")
    fig.savefig(path)


def _median_request(records_by_system) -> tuple[str, ExperimentRecord | None]:
    """The last split system's completed request (with a timeline) of median TTFT (the lower median): the last
    system whose rounds the cloud timed (cloud-only's "rounds" are its token gaps), else the last system."""
    if not records_by_system:
        return "", None
    split = [s for s, rs in records_by_system.items() if any(t.cloud_ms > 0 for r in _done(rs) for t in r.timeline)]
    system = (split or list(records_by_system))[-1]
    done = sorted((r for r in _done(records_by_system[system]) if r.timeline), key=lambda r: r.ttft_ms)
    return system, done[(len(done) - 1) // 2] if done else None


def _timeline(path, scenario, records_by_system):
    from matplotlib.patches import Patch
    system, r = _median_request(records_by_system)
    title = (f"Cloud rounds of the median-TTFT request of {system}\nrequest {r.request}: {r.prompt_tokens} prompt "
             f"tokens, TTFT {r.ttft_ms:,.0f} ms" if r else f"Request timeline — {scenario}")
    fig, ax = _new_axes(title, "time since the generation started (ms)", "cloud round (in order)", size=(8.5, 5))
    if r is None:
        _no_data(ax, "no completed request with a timeline")
        return fig.savefig(path)
    steps = r.timeline
    ys = range(len(steps))
    colors = ["C0" if s.kind == "prefill" else "C1" for s in steps]
    ax.barh(ys, [s.round_ms for s in steps], left=[s.sent_ms for s in steps], height=0.8, color=colors)
    ax.barh(ys, [min(s.cloud_ms, s.round_ms) for s in steps], height=0.8, color="k", alpha=0.35,
            left=[s.sent_ms + max(s.round_ms - s.cloud_ms, 0) / 2 for s in steps])  # cloud part mid-round
    first = ax.axvline(r.generation_ttft_ms, ls=":", color="k", lw=1.2, label="first token")
    ax.invert_yaxis()
    fig.legend(handles=[Patch(color="C0", label="prefill chunk round trip"),
                        Patch(color="C1", label="decode round trip"),
                        Patch(color="k", alpha=0.35, label="cloud compute share"), first],
               loc="outside right upper", fontsize="small")
    fig.savefig(path)


def _write_figures(out, scenario, records_by_system, ttft_slo_ms, tbt_slo_ms, ablation, paper) -> list[str] | None:
    """Draw every figure; the file names written, or None without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    ttfts = {s: [r.ttft_ms for r in _done(rs)] for s, rs in records_by_system.items()}
    tbts = {s: [statistics.fmean(r.tbt_ms) for r in _done(rs) if r.tbt_ms] for s, rs in records_by_system.items()}
    _cdf(out / "ttft_cdf.png", f"Time to first token — {scenario}", "TTFT (ms)", "fraction of completed requests",
         ttfts, ttft_slo_ms)
    _cdf(out / "tbt_cdf.png", f"Time between tokens — {scenario}", "mean TBT of a request (ms)",
         "fraction of completed requests", tbts, tbt_slo_ms)
    _ttft_vs_prompt(out / "ttft_vs_prompt.png", scenario, records_by_system)
    _timeline(out / "timeline.png", scenario, records_by_system)
    names = ["ttft_cdf.png", "tbt_cdf.png", "ttft_vs_prompt.png", "timeline.png"]
    if ablation:
        _ablation_plot(out / "ablation.png", scenario, ablation, records_by_system, ttft_slo_ms, tbt_slo_ms, paper)
        names.append("ablation.png")
    return names
