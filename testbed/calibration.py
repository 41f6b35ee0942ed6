"""Simulator costs calibrated on a real testbed run (`hat testbed simulate SCENARIO --calibration RESULTS`).

From the run's folder: `device_costs.json` holds each emulated device's own cost models at the end of
its run (its fitted input and output parts, head and sampling, and the cloud's published predictor);
`results.json` holds every round each device timed. Per system and device class:

- prompt chunks: the devices' fitted input and output parts (what their chunk planners used);
- decode rounds: a LinearCost fitted to the drafting before each send over the tokens newly drafted,
  and one fitted to the work after each reply over the positions verified; the mean time before the send of a
  speculative round that drafted nothing fresh (the adapter over its token and the length choice still run until
  the generation gives up speculating);
- the cloud: a LinearCost fitted to the forward times its replies reported for batches a round had to
  itself, as its batch latency; its published predictor (what the devices planned with, and its own
  scheduler's SLO check) as its predictor;
- per-round overhead: the mean of each decode round's time less its time in the cloud and its
  link model time (sockets, framework, the emulator's own cost);
- speculation: the run's verification rounds as (drafted, accepted, kept ahead), drawn at random;
- the workload: each request's arrival, prompt length, and the tokens it really generated.

Device times are divided by the power mode's factor when they were taken, so the simulator can apply
the schedule again. A cloud-only system's whole-model cost is fitted to its own run's forwards while no other
request was active (prompts and token gaps); with too few of them it is estimated from the split systems' cloud
fit times (all layers / middle layers). Its cost per further sequence in a batch is measured on its own run
(token gaps while other requests decoded against those while alone).
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from hat.common.checkpoint import parse_dtype
from hat.common.cost_fit import CostFit, LinearCost, attended

from .cloud_only_config import CloudOnlyConfig
from .experiment import CALIBRATION_FILE
from .records import ExperimentRecord
from .report import load_results
from .scenario import Scenario
from .sim_costs import (DEFAULT_TBT_SLO_S, HEADER_BYTES, ZERO, DeviceCosts, SequenceCost, SpeculationModel,
                        SystemCosts)
from .simulator import TOKEN_ID_BYTES, SimRequest
from .systems import SYSTEMS


class CalibrationError(ValueError):
    """A results folder the simulator cannot calibrate on; the message says what is missing."""


def _mean_cost(costs: list[LinearCost]) -> LinearCost:
    return LinearCost(*(statistics.fmean(getattr(c, f) for c in costs) for f in ("base_s", "per_token_s",
                                                                                  "per_attended_s")))


def _fit(samples: list[tuple[int, float]]) -> LinearCost:
    fit = CostFit(max(3, len(samples)), follow_changes=False)
    for tokens, seconds in samples:
        fit.add(tokens, 0.0, seconds)
    return fit.cost if len(fit) else ZERO


def _device_groups(scenario: Scenario) -> list:
    return [group for group in scenario.devices for _ in range(group.count)]


def _link_seconds(group, up_bytes: float, down_bytes: float) -> float:
    """A message pair's link model time with the group's mean rates (a trace's mean over its steps)."""
    profile = group.link.profile()
    if profile.trace is not None:
        steps = profile.trace.steps
        up = statistics.fmean(s[1] for s in steps)
        down = statistics.fmean(s[2] for s in steps)
    else:
        up, down = profile.uplink_bytes_per_s, profile.downlink_bytes_per_s
    return up_bytes / up + down_bytes / down + profile.rtt_s + profile.jitter_s


def calibrate(scenario: Scenario, results_dir: str | Path) -> tuple[dict[str, SystemCosts], dict[str, list]]:
    """Per system of the run (its results' names): the SystemCosts, and the SimRequests it served."""
    from hat.common.model_spec import load_model_spec
    from hat.common.model_store import resolve_model

    results_dir = Path(results_dir)
    costs_path = results_dir / CALIBRATION_FILE
    if not costs_path.is_file():
        raise CalibrationError(f"{results_dir} has no {CALIBRATION_FILE}: run `hat testbed run` again (runs before "
                               "the simulator did not record the devices' cost models)")
    try:
        device_costs = json.loads(costs_path.read_text())
        results = load_results(results_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise CalibrationError(f"cannot read the run in {results_dir}: {exc}") from None
    spec = load_model_spec(resolve_model(scenario.model))
    up_bytes = spec.hidden_size * parse_dtype(scenario.dtype).itemsize
    groups = _device_groups(scenario)
    clouds = [LinearCost(**d["cloud"]) for dumps in device_costs.values() for d in dumps if d.get("cloud")]
    if not clouds:
        raise CalibrationError(f"{CALIBRATION_FILE} holds no cloud predictor")
    middle_layers = spec.num_layers - scenario.input_layers - scenario.output_layers
    by_system, requests = {}, {}
    for name, records in results.records_by_system.items():
        raw = records[0].system if records else name
        if raw not in SYSTEMS:
            raise CalibrationError(f"system {raw!r} of the run is not one this testbed knows")
        done = [r for r in records if not r.error]
        if not done:
            raise CalibrationError(f"system {name!r} completed no request in that run")
        if max(r.device for r in records) >= len(groups):
            raise CalibrationError(f"the run had more devices than scenario {scenario.name!r}: simulate the "
                                   "scenario that was run")
        system = SYSTEMS[raw]
        requests[name] = [SimRequest(r.request, r.arrival_s, r.prompt_tokens, max(1, r.new_tokens)) for r in done]
        notes = [f"calibrated on {results_dir} ({name})"]
        if system.cloud_only:
            split_done = [r for rs in results.records_by_system.values() for r in rs
                          if not r.error and not SYSTEMS[r.system].cloud_only]
            budget = CloudOnlyConfig().token_budget
            whole = _whole_model_fit(done, groups, budget)
            if whole is None:
                whole = (_solo_fit(split_done) or _mean_cost(clouds)).scaled(spec.num_layers / max(1, middle_layers))
                notes.append("cloud-only: whole-model cost = the split cloud's fitted cost x layers / middle layers "
                             "(too few forwards of its own run alone to fit)")
            else:
                notes.append("cloud-only: whole-model cost fitted to its own run's forwards while alone (prompts: "
                             "first token less the link; tokens: the gaps between them)")
            cloud = SequenceCost(whole, _per_sequence(done))
            notes.append(f"cloud-only: {cloud.per_sequence_s * 1000:.1f} ms per further sequence in a batch (its own "
                         "run's token gaps while others decoded, against those while alone)")
            by_system[name] = SystemCosts({}, cloud, whole, 0.0, None, 4.0, 4.0, HEADER_BYTES,
                                          max_batch_tokens=budget, cloud_tokens=True,
                                          tbt_slo_s=DEFAULT_TBT_SLO_S, notes=tuple(notes))
            continue
        dumps = device_costs.get(name) or []
        published = _mean_cost([LinearCost(**d["cloud"]) for d in dumps if d.get("cloud")] or clouds)
        cloud = _solo_fit(done) or published
        down_bytes = up_bytes if scenario.output_layers else 0.0
        per_request = {r.request: tuple((s.drafted, s.accepted, s.predraft_reused) for s in r.timeline
                                        if s.kind == "decode") for r in done} if system.speculation else {}
        rounds = [round_ for mine in per_request.values() for round_ in mine]
        by_system[name] = SystemCosts(
            _device_costs(system, done, dumps, groups), cloud, published,
            _overhead(done, groups, up_bytes, down_bytes or up_bytes),
            SpeculationModel(tuple(rounds), f"the run's {len(rounds)} verification rounds, per request",
                             {k: v for k, v in per_request.items() if v}) if rounds else None,
            up_bytes, down_bytes, HEADER_BYTES, tbt_slo_s=DEFAULT_TBT_SLO_S, notes=tuple(notes))
    return by_system, requests


def _solo_fit(done: list[ExperimentRecord]) -> LinearCost | None:
    """The middle part's LinearCost fitted to the forward times replies reported for batches a round had to itself
    (prompt chunks and decode rounds, at their positions); None with fewer than 3 such rounds."""
    fit = CostFit(4096, follow_changes=False)
    for r in done:
        position = 0
        for s in r.timeline:
            if s.batch_sessions == 1 and s.cloud_ms > 0:
                fit.add(s.tokens, attended(s.tokens, position), s.cloud_ms / 1000)
            position += s.tokens if s.kind == "prefill" else s.accepted + 1
    return fit.cost if len(fit) >= 3 else None


def _others_active(r: ExperimentRecord, done: list[ExperimentRecord], t0: float, t1: float) -> list[ExperimentRecord]:
    """The other requests of the run active at some time within [t0, t1] (seconds from the run's start)."""
    return [o for o in done if o is not r and o.started_s < t1 and o.finished_s > t0]


def _decode_rounds(done: list[ExperimentRecord]):
    """(record, its decode round, the round's position, the other requests active during the round) for every decode
    round of the run's completed requests."""
    for r in done:
        position = r.prompt_tokens
        for s in r.timeline:
            if s.kind != "decode":
                continue
            t0 = r.started_s + s.sent_ms / 1000
            yield r, s, position, _others_active(r, done, t0, t0 + s.round_ms / 1000)
            position += 1


def _whole_model_fit(done: list[ExperimentRecord], groups: list, budget: int) -> LinearCost | None:
    """A cloud-only run's whole-model forward, fitted to what its server did with no other request active: each
    prompt within one iteration's token budget (the first token's time less the link's for its messages), and each
    token after it (the gap since the one before, at its position). None without both kinds (a fit over one-token
    forwards alone cannot tell a prompt's cost per token)."""
    prompts = []
    for r in done:
        if r.prompt_tokens <= budget and not _others_active(r, done, r.started_s, r.started_s + r.generation_ttft_ms / 1000):
            link = _link_seconds(groups[r.device], HEADER_BYTES + TOKEN_ID_BYTES * r.prompt_tokens,
                                 HEADER_BYTES + TOKEN_ID_BYTES)
            seconds = r.generation_ttft_ms / 1000 - link
            if seconds > 0:
                prompts.append((r.prompt_tokens, attended(r.prompt_tokens, 0), seconds))
    tokens = [(1, attended(1, position), s.round_ms / 1000)
              for _, s, position, overlapping in _decode_rounds(done) if not overlapping]
    if not prompts or not tokens:
        return None
    fit = CostFit(4096, follow_changes=False)
    for sample in prompts + tokens:
        fit.add(*sample)
    return fit.cost if len(fit) >= 3 else None


def _per_sequence(done: list[ExperimentRecord]) -> float:
    """A cloud-only run's cost of each further sequence in its server's forward, seconds: the median over token gaps
    while k other requests were decoding (past their first token) of (gap - the median gap alone) / k; 0.0 without
    gaps of both kinds. A gap overlapping another request's prompt is left out (its forward was that prompt's)."""
    alone, shared = [], []
    for r, s, _, overlapping in _decode_rounds(done):
        t0 = r.started_s + s.sent_ms / 1000
        decoding = [o for o in overlapping if o.started_s + o.generation_ttft_ms / 1000 <= t0]
        if not overlapping:
            alone.append(s.round_ms / 1000)
        elif len(decoding) == len(overlapping):
            shared.append((s.round_ms / 1000, len(decoding)))
    if not alone or not shared:
        return 0.0
    base = statistics.median(alone)
    return max(0.0, statistics.median((gap - base) / k for gap, k in shared))


def _overhead(done: list[ExperimentRecord], groups: list, up_bytes: float, down_bytes: float) -> float:
    """Mean over decode rounds of round time - time in the cloud - link model time, seconds (never negative)."""
    extra = [s.round_ms / 1000 - s.in_cloud_ms / 1000
             - _link_seconds(groups[r.device], HEADER_BYTES + up_bytes * s.tokens, HEADER_BYTES + down_bytes * s.tokens)
             for r in done for s in r.timeline if s.kind == "decode" and s.in_cloud_ms > 0]
    return max(0.0, statistics.fmean(extra)) if extra else 0.0


def _device_costs(system, done: list[ExperimentRecord], dumps: list[dict],
                  groups: list) -> dict[str, DeviceCosts]:
    """Per device class: prompt-chunk costs from the devices' own fits; a decode round's device time before its send
    (drafting, over the tokens newly drafted) and after its reply (everything from the reply to the round's tokens
    being out: the time between the previous round's tokens and this round's, less drafting and the round trip)."""
    by_class: dict[str, list[dict]] = defaultdict(list)
    for d in dumps:
        by_class[d["device_class"]].append(d)
    before: dict[str, list] = defaultdict(list)
    after: dict[str, list] = defaultdict(list)
    idle: dict[str, list] = defaultdict(list)  # speculative rounds that drafted nothing fresh but ran the adapter
    for r in done:
        group = groups[r.device]
        schedule = group.schedule()
        carried = emitted = 0
        for s in r.timeline:
            if s.kind != "decode":
                continue
            mode = schedule.factor_at(r.started_s + s.sent_ms / 1000) / schedule.device.slowdown
            fresh = s.drafted - min(carried, s.drafted)
            if system.speculation and fresh:
                before[group.device_class].append((fresh, s.draft_ms / 1000 / mode))
            elif system.speculation and s.draft_ms > 0:  # (after giving up, rounds draft nothing and take no time)
                idle[group.device_class].append(s.draft_ms / 1000 / mode)
            tokens = min(s.accepted + 1, len(r.tbt_ms) - emitted)
            interval = sum(r.tbt_ms[emitted:emitted + tokens])
            emitted += tokens
            if tokens > 0:
                drafting = s.draft_ms if system.speculation else 0.0
                after[group.device_class].append((s.tokens, max(0.0, interval - drafting - s.round_ms) / 1000 / mode))
            carried = s.predraft_reused
    out = {}
    for name, class_dumps in by_class.items():
        mode = [d["mode_factor"] for d in class_dumps]
        inp = _mean_cost([LinearCost(**d["input"]).scaled(1 / m) for d, m in zip(class_dumps, mode)])
        outp = _mean_cost([LinearCost(**d["output"]).scaled(1 / m) for d, m in zip(class_dumps, mode)])
        final_s = statistics.fmean(d["final_s"] / m for d, m in zip(class_dumps, mode))
        if system.speculation:
            draft, after_fit = _fit(before[name]), _fit(after[name])
            draft_token_s = draft.per_token_s or draft.base_s
        else:  # one position a round: its device time is all taken after the reply
            draft, draft_token_s = ZERO, 0.0
            after_fit = LinearCost(statistics.fmean(x for _, x in after[name]) if after[name] else 0.0, 0.0, 0.0)
        out[name] = DeviceCosts(inp, outp, final_s, draft, after_fit, inp, outp, draft_token_s,
                                statistics.fmean(idle[name]) if idle[name] else 0.0)
    return out
