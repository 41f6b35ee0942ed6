"""What `hat testbed simulate` writes besides the usual report: the simulator's error against a real run
(validation.md, validation.json) and a scale study (scale.md, scale.json, scale.png)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .records import ExperimentRecord, SystemSummary, percentile
from .report import _new_axes, _num, _table

VALIDATION_METRICS = (("TTFT p50", "ttft_ms", 0), ("TTFT p90", "ttft_ms", 1), ("TBT p50", "tbt_ms", 0),
                      ("TBT p90", "tbt_ms", 1), ("accept length", "accept_len", None),
                      ("tokens/s", "tokens_per_s", None))
# TTFT counts from the arrival, so it holds the wait for a busy device; from the generation's start it does not
START_TTFT = "TTFT p50 from start"
TARGET_ERROR = 0.10  # the target on TTFT and TBT medians


def _metric(summary: SystemSummary, key: str, index: int | None) -> float:
    value = getattr(summary, key)
    return value[index] if index is not None else value


def validation_rows(real: dict[str, list[ExperimentRecord]], simulated: dict[str, list[ExperimentRecord]],
                    ttft_slo_ms: float, tbt_slo_ms: float) -> list[dict]:
    """Per system and metric: the real run's value, the simulator's, and the relative error."""
    rows = []
    for name, records in simulated.items():
        ours = SystemSummary.of(name, records, ttft_slo_ms, tbt_slo_ms)
        theirs = SystemSummary.of(name, real[name], ttft_slo_ms, tbt_slo_ms)
        pairs = [(label, _metric(theirs, key, index), _metric(ours, key, index))
                 for label, key, index in VALIDATION_METRICS]
        pairs.insert(1, (START_TTFT, *(percentile([x.generation_ttft_ms for x in rs if not x.error], 50)
                                       for rs in (real[name], records))))
        for label, r, s in pairs:
            error = (s - r) / r if r and math.isfinite(r) and math.isfinite(s) else math.nan
            rows.append({"system": name, "metric": label, "real": r, "simulated": s, "error": error})
    return rows


def write_validation(out: Path, real, simulated, ttft_slo_ms: float, tbt_slo_ms: float) -> list[dict]:
    rows = validation_rows(real, simulated, ttft_slo_ms, tbt_slo_ms)
    (out / "validation.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    lines = ["# Simulator against the real run", ""]
    for metrics in (("TTFT p50", "TBT p50"), (START_TTFT,)):
        chosen = [r for r in rows if r["metric"] in metrics and math.isfinite(r["error"])]
        within = sum(abs(r["error"]) <= TARGET_ERROR for r in chosen)
        lines += [f"{' and '.join(metrics)}: within {TARGET_ERROR:.0%} for {within} of {len(chosen)}; worst error "
                  f"{max((abs(r['error']) for r in chosen), default=math.nan):.1%}.", ""]
    lines += ["TTFT counts from each request's arrival, so it includes waiting for its device (busy with an earlier "
              "request); the TTFT from the generation's start does not.", "",
             *_table(["System", "Metric", "Real", "Simulated", "Error"],
                     [[r["system"], r["metric"], _num(r["real"], 2), _num(r["simulated"], 2),
                       _num(r["error"] * 100, 1, "%")] for r in rows]), ""]
    if _validation_plot(out / "validation.png", rows):
        lines.append("![validation](validation.png)")
    (out / "validation.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return rows


def _validation_plot(path: Path, rows: list[dict]) -> bool:
    """Real against simulated medians per system, one panel per metric; False without matplotlib."""
    try:
        fig, axes = _new_axes("Simulator against the real run", "", "ms", size=(11, 4.2), cols=3)
    except ImportError:
        return False
    systems = list(dict.fromkeys(r["system"] for r in rows))
    for ax, metric in zip(axes, ("TTFT p50", START_TTFT, "TBT p50")):
        mine = {r["system"]: r for r in rows if r["metric"] == metric}
        xs = range(len(systems))
        for shift, key, colour in ((-0.2, "real", "C0"), (0.2, "simulated", "C1")):
            ax.bar([x + shift for x in xs], [mine[s][key] for s in systems], 0.4, color=colour, label=key)
        ax.set_xticks(list(xs), systems, rotation=30, ha="right", fontsize="small")
        ax.set_title(metric)
    axes[0].legend(fontsize="small")
    fig.savefig(path)
    return True


def write_scale(out: Path, scenario: str, rows: list[dict]) -> None:
    """rows: one per (device count, system), SystemSummary fields plus the cloud's figures."""
    (out / "scale.json").write_text(json.dumps(rows, indent=1, default=float), encoding="utf-8")
    table = _table(["Devices", "Requests/s", "System", "TTFT p50 (ms)", "TTFT p90 (ms)", "TBT p50 (ms)",
                    "TBT p90 (ms)", "SLO attainment", "Cloud busy", "Largest batch", "Sim wall (s)"],
                   [[str(r["devices"]), _num(r["rate"], 2), r["system"], _num(r["ttft_ms"][0]),
                     _num(r["ttft_ms"][1]), _num(r["tbt_ms"][0]), _num(r["tbt_ms"][1]),
                     _num(r["slo_attainment"] * 100, 1, "%"), _num(r["cloud_busy"] * 100, 0, "%"),
                     str(r["largest_batch"]), _num(r["wall_s"], 1)] for r in rows])
    (out / "scale.md").write_text("\n".join([f"# Scale study: {scenario} (simulated)", "", *table, "",
                                             "![scale](scale.png)", ""]), encoding="utf-8")
    try:
        fig, axes = _new_axes(f"Scale — {scenario} (simulated)", "devices", "ms", size=(10, 4.2), cols=2)
    except ImportError:
        return
    systems = list(dict.fromkeys(r["system"] for r in rows))
    for ax, key, label in zip(axes, ("ttft_ms", "tbt_ms"), ("TTFT p50", "TBT p50")):
        for i, system in enumerate(systems):
            mine = [r for r in rows if r["system"] == system]
            ax.plot([r["devices"] for r in mine], [r[key][0] for r in mine], "o-", color=f"C{i}", label=system)
        ax.set(title=label, xscale="log", yscale="log")
    axes[0].legend(fontsize="small")
    fig.savefig(out / "scale.png")
