"""What `hat testbed simulate` writes besides the usual report: the simulator's error against a real run
(validation.md, validation.json) and a scale study (scale.md, scale.json, scale.png)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .records import ExperimentRecord, SystemSummary
from .report import _new_axes, _num, _table

VALIDATION_METRICS = (("TTFT p50", "ttft_ms", 0), ("TTFT p90", "ttft_ms", 1), ("TBT p50", "tbt_ms", 0),
                      ("TBT p90", "tbt_ms", 1), ("accept length", "accept_len", None),
                      ("tokens/s", "tokens_per_s", None))
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
        for label, key, index in VALIDATION_METRICS:
            r, s = _metric(theirs, key, index), _metric(ours, key, index)
            error = (s - r) / r if r and math.isfinite(r) and math.isfinite(s) else math.nan
            rows.append({"system": name, "metric": label, "real": r, "simulated": s, "error": error})
    return rows


def write_validation(out: Path, real, simulated, ttft_slo_ms: float, tbt_slo_ms: float) -> list[dict]:
    rows = validation_rows(real, simulated, ttft_slo_ms, tbt_slo_ms)
    (out / "validation.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    medians = [r for r in rows if r["metric"] in ("TTFT p50", "TBT p50") and math.isfinite(r["error"])]
    within = sum(abs(r["error"]) <= TARGET_ERROR for r in medians)
    lines = ["# Simulator against the real run", "",
             f"TTFT and TBT medians within {TARGET_ERROR:.0%}: {within} of {len(medians)}. Worst median error: "
             f"{max((abs(r['error']) for r in medians), default=math.nan):.1%}.", "",
             *_table(["System", "Metric", "Real", "Simulated", "Error"],
                     [[r["system"], r["metric"], _num(r["real"], 2), _num(r["simulated"], 2),
                       _num(r["error"] * 100, 1, "%")] for r in rows]), ""]
    (out / "validation.md").write_text("\n".join(lines), encoding="utf-8")
    return rows


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
