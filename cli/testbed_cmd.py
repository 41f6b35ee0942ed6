"""`hat testbed run SCENARIO.yaml [--out DIR]`: an end-to-end latency experiment on emulated devices and links."""
from __future__ import annotations

import time
from pathlib import Path


def add_parser(commands) -> None:
    testbed = commands.add_parser("testbed", help="experiments on emulated devices and links")
    sub = testbed.add_subparsers(dest="testbed_command", required=True, metavar="ACTION")
    p = sub.add_parser("run", help="run a scenario's systems on the same workload; write results, plots, summary")
    p.add_argument("scenario", help="scenario YAML, or a shipped scenario's name: smoke, specbench, cnn_dailymail, "
                                    "ablation (testbed/scenarios/)")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default: results/SCENARIO-NAME-YYYYmmdd-HHMMSS)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_testbed)


def run_testbed(args) -> int:
    from hat.testbed.experiment import run_scenario
    from hat.testbed.scenario import ScenarioError, load_scenario

    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        raise SystemExit(f"hat testbed run: error: {exc}") from None
    out = args.out or Path("results") / f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = run_scenario(scenario, out, progress=not args.no_progress)
    print((folder / "summary.md").read_text())
    print(f"results, plots and summary in {folder}")
    return 0
