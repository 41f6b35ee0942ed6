"""`hat testbed run SCENARIO.yaml`: every system of a scenario on the same workload, one after the other.

Per system: a fresh `hat cloud serve` process; one LinkShim process per device group (every device
through it gets a link of its own with the group's profile); one process per emulated device
(`emulated_device.device_main`), each warmed up, then all released at once. Requests go to devices
round-robin and start at their arrival time or when their device is free. A progress bar counts
completed requests; the results, plots and summary are written by `report.write_report`.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
from pathlib import Path

from .cloud_only import run_cloud_only_system
from .device_replay import replay_on_devices
from .emulated_device import device_main
from .local_cloud import local_cloud_process
from .progress import progress_bar
from .prompt_sets import build_prompt_set_workload
from .records import ExperimentRecord
from .scenario import Scenario
from .systems import SYSTEMS, report_names
from .workloads import SHAPES, WorkloadRequest, build_workload

CALIBRATION_FILE = "device_costs.json"  # per system, each emulated device's cost models after its run


def run_scenario(scenario: Scenario, out_dir: str | Path, progress: bool = True) -> Path:
    """Run every system of `scenario`; returns the folder holding results, plots and summary."""
    from transformers import AutoTokenizer

    from hat.common.model_spec import load_model_spec
    from hat.common.model_store import resolve_model
    from hat.common.split import default_adapter_dir, split_checkpoint

    from .report import write_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(scenario.model, pull_missing=True)
    with tempfile.TemporaryDirectory(prefix="hat-testbed-") as tmp:
        device_dir, cloud_dir = split_checkpoint(model_dir, scenario.input_layers, scenario.output_layers,
                                                 Path(tmp) / "bundle", scenario.dtype)
        w = scenario.workload
        context = load_model_spec(cloud_dir).max_context
        max_prompt = w.max_prompt_tokens or context - w.max_new_tokens - 1
        tokenizer = AutoTokenizer.from_pretrained(str(device_dir), local_files_only=True)
        if w.prompts:
            requests, workload = build_prompt_set_workload(tokenizer, w.prompts, w.requests, w.rate, w.seed,
                                                           w.max_new_tokens, max_prompt)
            source = f"real prompts ({', '.join(w.prompts)}; chat template applied)"
        else:
            requests, workload = build_workload(tokenizer, SHAPES[w.shape], w.requests, w.rate, w.seed,
                                                w.max_new_tokens, max_prompt)
            source = f"{w.shape}-shaped prompts from the held-out corpus"
        notes = [f"model: {scenario.model}, split K={scenario.input_layers}, M={scenario.output_layers}, "
                 f"{scenario.dtype}", f"workload: {source}, {workload.line()}", *_emulation_notes(scenario)]
        scenario, skipped = _runnable(scenario, device_dir)
        if skipped:
            notes.append(f"not run: {', '.join(skipped)} (speculation needs a draft adapter, and {scenario.model} "
                         f"ships none for K={scenario.input_layers}, M={scenario.output_layers})")
        elif any(SYSTEMS[s].speculation for s in scenario.systems):
            notes.append(_adapter_note(default_adapter_dir(model_dir, scenario.input_layers, scenario.output_layers)))
        records, costs = {}, {}
        bar = progress_bar(len(scenario.systems) * len(requests), progress)
        for name in scenario.systems:
            bar.set_description(name)
            records[name] = run_system(scenario, name, requests, device_dir, cloud_dir, Path(tmp), bar)
            for record in records[name]:
                record.category = requests[record.request].category
            costs[name] = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob(f"{name}-device*.costs.json"))]
        bar.close()
    paper, ablation = dict(scenario.paper), None
    if scenario.ablation:  # name the steps: "+chunking (chunked)"
        names = report_names(scenario.systems, True)
        records = {names[s]: r for s, r in records.items()}
        costs = {names[s]: c for s, c in costs.items()}
        paper = {names.get(s, s): figures for s, figures in paper.items()}
        ablation = [names[s] for s in scenario.systems]
    # the devices' own cost models at the end of each system's run: `hat testbed simulate --calibration` reads them
    (out_dir / CALIBRATION_FILE).write_text(json.dumps(costs, indent=1))
    return write_report(out_dir, scenario.name, records, scenario.ttft_slo_ms, scenario.tbt_slo_ms, notes,
                        ablation=ablation, paper=paper or None)


def _runnable(scenario: Scenario, device_dir: Path) -> tuple[Scenario, list[str]]:
    """The scenario less the speculative systems when the device bundle has no draft adapter; and those left out."""
    from hat.device.device_model import ADAPTER_DIR

    if (device_dir / ADAPTER_DIR).is_dir():
        return scenario, []
    skipped = [s for s in scenario.systems if SYSTEMS[s].speculation]
    kept = tuple(s for s in scenario.systems if s not in skipped)
    if not kept:
        raise ValueError(f"every system of {scenario.name} speculates, and {scenario.model} has no draft adapter for "
                         f"K={scenario.input_layers}, M={scenario.output_layers}")
    return dataclasses.replace(scenario, systems=kept), skipped


def _adapter_note(adapter_dir: Path) -> str:
    """Which draft adapter the speculative systems used and, from its training summary, how often it agrees with
    the model: acceptance bounds what speculation can gain, so the report says it beside the figures."""
    from hat.common.adapter_training import SUMMARY

    note = f"speculation: the draft adapter in {adapter_dir}"
    try:
        final = json.loads((adapter_dir / SUMMARY).read_text())["final"]
        return (f"{note} (its training evaluation: top-1 agreement with the model {final['top1_agreement']:.3f}, "
                f"accepted length {final['accept_len']:.2f}; the runs' own accepted lengths are in the tables)")
    except (OSError, ValueError, KeyError, TypeError):
        return f"{note} (no training summary beside it)"


def _emulation_notes(scenario: Scenario) -> list[str]:
    notes = []
    for group in scenario.devices:
        link = group.link
        rates = (f"rates from trace {Path(link.trace).name}" if link.trace
                 else f"{link.up_MBps:g} MB/s up, {link.down_MBps:g} MB/s down")
        jitter = f", jitter {link.jitter_ms:g} ms" if link.jitter_ms else ""
        notes.append(f"{group.count} x {group.schedule().describe()}; link {rates}, {link.rtt_ms:g} ms RTT{jitter} "
                     "(user-space LinkShim)")
    notes.append("the cloud runs on this machine's CPU; device and cloud processes share its cores")
    if any(SYSTEMS[s].cloud_only for s in scenario.systems):
        notes.append("cloud-only: its devices send token ids and compute nothing (no throttling applies); its cloud "
                     "runs the whole model")
    notes.append("device energy: not measured (emulated devices have no power telemetry)")
    return notes


def run_system(scenario: Scenario, name: str, requests: list[WorkloadRequest], device_dir: Path, cloud_dir: Path,
               work: Path, bar) -> list[ExperimentRecord]:
    """One system over the workload: cloud, links, devices; the records in workload order."""
    if SYSTEMS[name].cloud_only:  # no split: a whole-model server instead of `hat cloud serve` (testbed/cloud_only.py)
        return run_cloud_only_system(scenario, name, requests, device_dir, cloud_dir, work, bar)
    mean_prompt = round(statistics.fmean(len(r.prompt_ids) for r in requests))
    with local_cloud_process(cloud_dir, scenario.cloud_threads) as cloud:
        return replay_on_devices(scenario, name, requests, device_dir, work, bar, device_main,
                                 f"tcp://127.0.0.1:{cloud.data_port}", cloud.control_port, mean_prompt)
