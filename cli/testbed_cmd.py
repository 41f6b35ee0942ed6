"""`hat testbed run SCENARIO.yaml [--out DIR]`: an end-to-end latency experiment on emulated devices and links.
`hat testbed simulate SCENARIO.yaml [--calibration RESULTS] [--out DIR]`: the same system as a discrete-event
simulation, calibrated on a real run or costed from public hardware figures."""
from __future__ import annotations

import time
from pathlib import Path

SHIPPED_HELP = "scenario YAML, or a shipped scenario's name (testbed/scenarios/)"


def add_parser(commands) -> None:
    testbed = commands.add_parser("testbed", help="experiments on emulated devices and links, and simulations")
    sub = testbed.add_subparsers(dest="testbed_command", required=True, metavar="ACTION")
    p = sub.add_parser("run", help="run a scenario's systems on the same workload; write results, plots, summary")
    p.add_argument("scenario", help=SHIPPED_HELP + ": smoke, specbench, cnn_dailymail, ablation, smoke_reference")
    p.add_argument("--quick", action="store_true",
                   help="the scenario's quick variant: fewer requests and new tokens (its `quick:` section)")
    _common(p)
    p.set_defaults(run=run_testbed)
    p = sub.add_parser("simulate", help="simulate a scenario's systems (discrete-event) at any scale; write the same "
                                        "report, plus the error against a real run or a scale study")
    p.add_argument("scenario", help=SHIPPED_HELP + ": e.g. sim_specbench_7b, sim_ablation_7b, sim_scale_7b; or "
                                                   "the scenario of a real run with --calibration")
    p.add_argument("--calibration", type=Path, default=None, metavar="RESULTS",
                   help="a `hat testbed run` results folder of this scenario: simulate with that run's own cost "
                        "models and workload, and report the simulator's error against it")
    _common(p)
    p.set_defaults(run=run_simulate)


def _common(p) -> None:
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default: results/SCENARIO-NAME[-sim]-YYYYmmdd-HHMMSS)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _scenario(args, command: str):
    from hat.testbed.scenario import ScenarioError, load_scenario

    try:
        return load_scenario(args.scenario)
    except ScenarioError as exc:
        raise SystemExit(f"hat testbed {command}: error: {exc}") from None


def run_testbed(args) -> int:
    from hat.testbed.experiment import run_scenario

    scenario = _scenario(args, "run")
    if args.quick:
        from hat.testbed.scenario import quick_variant

        scenario = quick_variant(scenario)
    out = args.out or Path("results") / f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = run_scenario(scenario, out, progress=not args.no_progress)
    print((folder / "summary.md").read_text())
    print(f"results, plots and summary in {folder}")
    return 0


def run_simulate(args) -> int:
    from hat.testbed.sim_run import simulate_scenario

    scenario = _scenario(args, "simulate")
    out = args.out or Path("results") / f"{scenario.name}-sim-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        folder = simulate_scenario(scenario, out, args.calibration, progress=not args.no_progress)
    except ValueError as exc:  # ScenarioError, CalibrationError and the simulator's refusals
        raise SystemExit(f"hat testbed simulate: error: {exc}") from None
    print((folder / "summary.md").read_text())
    for extra in ("validation.md", "scale.md"):
        if (folder / extra).is_file():
            print((folder / extra).read_text())
    print(f"results, plots and summary in {folder}")
    return 0
