"""`hat testbed simulate SCENARIO.yaml`: the simulator over a scenario's systems, and what it writes.

Two sources of costs:
- `--calibration RESULTS` (a `hat testbed run` folder of the same scenario): the run's own cost models
  and workload (testbed.calibration); the report adds validation.md / validation.json, the
  simulator's error against the real run per system and metric.
- the scenario's `hardware:` section: roofline costs (testbed.sim_hardware) and a synthetic workload of
  the scenario's shape; with `scale: {devices: [...]}` the scenario is also simulated at those device
  counts (the groups, the request count and the arrival rate scaled alike) into scale.md / scale.png.
The report itself (results, plots, summary) is the one `hat testbed run` writes (testbed.report).
"""
from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

from .calibration import calibrate
from .progress import progress_bar
from .link_shim import LinkModel
from .records import ExperimentRecord, SystemSummary
from .report import load_results, write_report
from .scenario import Scenario, ScenarioError
from .sim_cloud import SimCloud
from .sim_costs import SystemCosts
from .sim_hardware import roofline_costs
from .sim_kernel import Simulation
from .simulator import SimDevice, SimRequest
from .systems import SYSTEMS, report_names
from .workloads import SHAPES, prompt_lengths

DEFAULT_CONTEXT = 4096  # prompt clip for roofline workloads when the scenario sets none (Llama-2-class context)


def simulate_system(scenario: Scenario, system: str, costs: SystemCosts, requests: list[SimRequest],
                    seed: int = 0) -> tuple[list[ExperimentRecord], dict]:
    """One system over the requests on the scenario's devices; the records in workload order and cloud figures."""
    sim = Simulation()
    cloud = SimCloud(sim, costs)
    count = scenario.device_count
    mean_prompt = round(sum(r.prompt_tokens for r in requests) / len(requests))
    records: list[ExperimentRecord] = []
    index = 0
    for g, group in enumerate(scenario.devices):
        link = LinkModel(group.link.profile(seed=seed + g))
        for _ in range(group.count):
            device = SimDevice(sim, index, group, link, cloud, SYSTEMS[system], costs, seed * 100003 + index)
            sim.spawn(device.run([r for r in requests if r.index % count == index], mean_prompt, records))
            index += 1
    began = time.perf_counter()
    sim.run()
    records.sort(key=lambda r: r.request)
    span = max((r.finished_s for r in records), default=0.0)
    return records, {"cloud_busy": cloud.busy_s / span if span else 0.0, "batches": cloud.batches,
                     "largest_batch": cloud.largest_batch, "events": sim.events_run,
                     "wall_s": time.perf_counter() - began}


def synthetic_requests(scenario: Scenario) -> list[SimRequest]:
    """The scenario's workload shape and Poisson arrivals, lengths only (no tokenizer: the model may be one we lack)."""
    w = scenario.workload
    rng = random.Random(w.seed)
    lengths, _ = prompt_lengths(SHAPES[w.shape], w.requests, rng, w.max_prompt_tokens or DEFAULT_CONTEXT - w.max_new_tokens)
    requests, arrival = [], 0.0
    for i, n in enumerate(lengths):
        arrival += rng.expovariate(w.rate)
        requests.append(SimRequest(i, arrival, n, w.max_new_tokens))
    return requests


def scaled_scenario(scenario: Scenario, devices: int) -> Scenario:
    """The scenario with `devices` devices: each group, the request count and the arrival rate scaled alike."""
    base = scenario.device_count
    counts = [max(1, round(g.count * devices / base)) for g in scenario.devices]
    counts[-1] = max(1, counts[-1] + devices - sum(counts))
    groups = tuple(dataclasses.replace(g, count=n) for g, n in zip(scenario.devices, counts))
    w = scenario.workload
    workload = dataclasses.replace(w, requests=max(w.requests, round(w.requests * devices / base)),
                                   rate=w.rate * devices / base)
    return dataclasses.replace(scenario, devices=groups, workload=workload)


def simulate_scenario(scenario: Scenario, out_dir: str | Path, calibration: str | Path | None = None,
                      progress: bool = True) -> Path:
    """Simulate every system of the scenario (see the module doc); returns the report's folder."""
    out_dir = Path(out_dir)
    if calibration is not None:
        return _validate(scenario, out_dir, Path(calibration), progress)
    if scenario.hardware is None:
        raise ScenarioError(f"scenario {scenario.name!r} has no `hardware:` section: give one (roofline costs), or "
                            "calibrate on a real run with --calibration RESULTS_FOLDER")
    costs = roofline_costs(scenario.hardware, scenario.input_layers, scenario.output_layers, scenario.systems)
    names = report_names(scenario.systems, scenario.ablation)
    runs = [scenario] + [scaled_scenario(scenario, n) for n in scenario.scale_devices]
    bar = progress_bar(len(runs) * len(scenario.systems), progress, "system")
    rows = []
    for i, run in enumerate(runs):
        requests = synthetic_requests(run)
        records = {}
        for system in scenario.systems:
            bar.set_description(f"{run.device_count} devices, {system}")
            records[names[system]], stats = simulate_system(run, system, costs[system], requests)
            rows.append({"devices": run.device_count, "rate": run.workload.rate, "system": names[system],
                         **dataclasses.asdict(SystemSummary.of(system, records[names[system]], scenario.ttft_slo_ms,
                                                               scenario.tbt_slo_ms)), **stats})
            bar.update()
        if i == 0:
            notes = [f"simulated (discrete-event, hat.testbed.simulator); {len(requests)} requests, "
                     f"{run.workload.shape}-shaped prompts, {run.workload.rate:g} requests/s, "
                     f"{run.device_count} devices", *costs[scenario.systems[0]].notes]
            write_report(out_dir, f"{scenario.name} (simulated)", records, scenario.ttft_slo_ms,
                         scenario.tbt_slo_ms, notes, ablation=[names[s] for s in scenario.systems]
                         if scenario.ablation else None, paper=_paper(scenario, names))
    bar.close()
    if scenario.scale_devices:
        from .sim_report import write_scale

        write_scale(out_dir, scenario.name, rows)
    return out_dir


def _paper(scenario: Scenario, names: dict[str, str]) -> dict | None:
    return {names.get(s, s): figures for s, figures in scenario.paper.items()} or None


def _validate(scenario: Scenario, out_dir: Path, calibration: Path, progress: bool) -> Path:
    from .sim_report import write_validation

    costs, requests = calibrate(scenario, calibration)
    real = load_results(calibration)
    bar = progress_bar(len(costs), progress, "system")
    records = {}
    for name, system_costs in costs.items():
        bar.set_description(name)
        system = real.records_by_system[name][0].system
        records[name], _ = simulate_system(scenario, system, system_costs, requests[name])
        bar.update()
    bar.close()
    notes = [f"simulated (discrete-event) with the costs of the real run in {calibration}"]
    write_report(out_dir, f"{real.scenario_name} (simulated)", records, real.ttft_slo_ms, real.tbt_slo_ms, notes,
                 ablation=real.ablation, paper=real.paper)
    write_validation(out_dir, real.records_by_system, records, real.ttft_slo_ms, real.tbt_slo_ms)
    return out_dir
