"""A testbed scenario: the model and split, the emulated devices and their links, the workload, the systems
compared and the SLO targets, read from a YAML file (`hat testbed run SCENARIO.yaml`).

    name: specbench
    model: reference            # a store name (reference, smollm2-135m-instruct) or a checkpoint folder
    split: {input_layers: 2, output_layers: 1}
    devices:                    # groups of identical emulated devices
      - {count: 2, class: jetson-agx-orin, power: [[0, MAXN]], link: {up_MBps: 10, down_MBps: 15, rtt_ms: 20}}
    workload: {shape: specbench, requests: 16, rate: 0.5, max_new_tokens: 128, seed: 0}
    systems: [u-shape, u-sarathi, hat, full]
    slo: {ttft_ms: 2000, tbt_ms: 200}
    quick: {requests: 4, max_new_tokens: 32}   # what `--quick` replaces in the workload

A workload is either synthetic (`shape:` lengths cut from the held-out corpus, testbed.workloads) or real
(`prompts: [mt-bench, humaneval, xsum]`: prompt sets mixed round-robin, testbed.prompt_sets; the report then
gives each category's metrics apart).

`hat testbed simulate` also reads `hardware:` (testbed.sim_hardware.HardwareSpec: a model shape on
GPUs and Jetsons from public figures) and `scale: {devices: [30, 100, 300, 1000]}`.

Unknown keys are refused by name, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .device_profiles import DEVICE_CLASSES, PowerSchedule
from .link_shim import LinkProfile
from .link_traces import BandwidthTrace
from .prompt_sets import CATEGORIES
from .sim_hardware import HardwareSpec
from .systems import SYSTEMS
from .workloads import SHAPES


class ScenarioError(ValueError):
    """A scenario file that cannot be run; the message names the field."""


@dataclass(frozen=True, slots=True)
class LinkSpec:
    up_MBps: float = 10.0  # device -> cloud, MB/s (HAT's Wi-Fi: 5-10)
    down_MBps: float = 15.0  # cloud -> device, MB/s (HAT's: 10-15)
    rtt_ms: float = 20.0  # round-trip propagation delay
    jitter_ms: float = 0.0  # extra one-way delay, uniform in [0, jitter_ms]
    trace: str = ""  # a bandwidth trace CSV (time_s,up_MBps,down_MBps; relative to the scenario file): the rates
    # then follow it from each device's first message, and up_MBps / down_MBps are ignored

    def profile(self, seed: int = 0) -> LinkProfile:
        if self.trace:
            return LinkProfile.from_trace(BandwidthTrace.from_csv(self.trace), self.rtt_ms / 1000,
                                          self.jitter_ms / 1000, seed)
        return LinkProfile(self.up_MBps * 1e6, self.down_MBps * 1e6, self.rtt_ms / 1000, self.jitter_ms / 1000, seed)


@dataclass(frozen=True, slots=True)
class DeviceGroup:
    count: int  # identical devices in the group
    device_class: str  # a name of hat.testbed.device_profiles.DEVICE_CLASSES
    power: tuple[tuple[float, str], ...]  # (seconds from the run's start, power mode)
    link: LinkSpec

    def schedule(self) -> PowerSchedule:
        return PowerSchedule(DEVICE_CLASSES[self.device_class], self.power)


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    shape: str = ""  # synthetic prompt lengths: "specbench" or "cnn_dailymail" ("" when `prompts` are given)
    requests: int = 0  # arrivals in the run
    rate: float = 0.0  # arrivals per second (Poisson)
    max_new_tokens: int = 128  # generation budget per request
    seed: int = 0
    max_prompt_tokens: int = 0  # longest prompt (0: the model's context less max_new_tokens); a longer real prompt
    # is passed over, a longer synthetic length clipped
    prompts: tuple[str, ...] = ()  # real prompt sets mixed round-robin (mt-bench, humaneval, xsum); instead of shape


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    model: str  # a store name ("reference", "smollm2-135m-instruct", ...) or a checkpoint folder
    input_layers: int
    output_layers: int
    devices: tuple[DeviceGroup, ...]
    workload: WorkloadSpec
    systems: tuple[str, ...]  # run in this order on the same workload
    ttft_slo_ms: float
    tbt_slo_ms: float
    dtype: str = "float32"  # the bundles' dtype (this CPU has no native bfloat16)
    ablation: bool = False  # report the systems as ablation steps, in order (the first is the base)
    paper: dict = field(default_factory=dict)  # the paper's figures per system, shown beside ours
    cloud_threads: int = 1  # torch threads of the cloud process
    device_threads: int = 1  # torch threads of each emulated device process
    hardware: HardwareSpec | None = None  # `hat testbed simulate` only: roofline costs of a model on GPUs we lack
    scale_devices: tuple[int, ...] = ()  # `hat testbed simulate` only: also simulate these device counts (groups,
    # request count and arrival rate scaled alike)
    quick: dict = field(default_factory=dict)  # workload fields `--quick` replaces (requests, max_new_tokens, ...)

    @property
    def device_count(self) -> int:
        return sum(g.count for g in self.devices)


def _take(data: dict, where: str, allowed: set[str]) -> dict:
    if not isinstance(data, dict):
        raise ScenarioError(f"{where} must be a mapping")
    unknown = set(data) - allowed
    if unknown:
        raise ScenarioError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    return data


def _build(cls, data: dict, where: str, **extra):
    try:
        return cls(**data, **extra)
    except (TypeError, ValueError) as exc:
        raise ScenarioError(f"{where}: {exc}") from None


def parse_scenario(data: dict, base: Path = Path(".")) -> Scenario:
    """`base`: the folder relative paths in the scenario (traces) are read from."""
    top = _take(data, "scenario", {"name", "model", "split", "devices", "workload", "systems", "slo", "dtype",
                                   "ablation", "paper", "cloud_threads", "device_threads", "hardware", "scale",
                                   "quick"})
    for key in ("name", "devices", "workload", "systems"):
        if key not in top:
            raise ScenarioError(f"scenario: missing {key!r}")
    split = _take(top.get("split", {}), "split", {"input_layers", "output_layers"})
    groups = []
    for i, group in enumerate(top["devices"] or []):
        where = f"devices[{i}]"
        group = _take(group, where, {"count", "class", "power", "link"})
        link = dict(_take(group.get("link", {}), f"{where}.link", set(LinkSpec.__dataclass_fields__)))
        if link.get("trace"):
            link["trace"] = str(base / link["trace"])
        link = _build(LinkSpec, link, f"{where}.link")
        name = group.get("class", "jetson-agx-orin")
        if name not in DEVICE_CLASSES:
            raise ScenarioError(f"{where}.class: {name!r}; known: {', '.join(DEVICE_CLASSES)}")
        power = tuple((float(t), str(mode)) for t, mode in group.get("power", [[0, "MAXN"]]))
        built = _build(DeviceGroup, {"count": int(group.get("count", 1)), "device_class": name, "power": power,
                                     "link": link}, where)
        try:
            built.schedule()
            built.link.profile()
        except (ValueError, OSError) as exc:
            raise ScenarioError(f"{where}: {exc}") from None
        if built.count < 1:
            raise ScenarioError(f"{where}.count must be at least 1")
        groups.append(built)
    if not groups:
        raise ScenarioError("devices: at least one group")
    workload = dict(_take(top["workload"], "workload", set(WorkloadSpec.__dataclass_fields__)))
    workload["prompts"] = tuple(workload.get("prompts") or ())
    workload = _build(WorkloadSpec, workload, "workload")
    if workload.prompts:
        unknown = [s for s in workload.prompts if s not in CATEGORIES]
        if unknown or workload.shape:
            raise ScenarioError(f"workload.prompts: {unknown}; known: {', '.join(CATEGORIES)}" if unknown else
                                "workload: give shape (synthetic lengths) or prompts (real prompt sets), not both")
        if "hardware" in top:
            raise ScenarioError("workload.prompts needs a tokenizer: a `hardware:` (roofline) scenario takes a shape")
    elif workload.shape not in SHAPES:
        raise ScenarioError(f"workload.shape: {workload.shape!r}; known: {', '.join(SHAPES)}")
    if workload.requests < 1 or not workload.rate > 0 or workload.max_new_tokens < 1:
        raise ScenarioError("workload: requests >= 1, rate > 0 and max_new_tokens >= 1")
    systems = tuple(top["systems"] or ())
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise ScenarioError(f"systems: {unknown or 'none given'}; known: {', '.join(SYSTEMS)}")
    slo = _take(top.get("slo", {}), "slo", {"ttft_ms", "tbt_ms"})
    hardware = None
    if "hardware" in top:
        hardware = _build(HardwareSpec, _take(top["hardware"], "hardware", set(HardwareSpec.__dataclass_fields__)),
                          "hardware")
    scale = _take(top.get("scale") or {}, "scale", {"devices"})
    scale_devices = tuple(int(n) for n in scale.get("devices") or ())
    if any(n < 1 for n in scale_devices):
        raise ScenarioError("scale.devices: counts of at least 1")
    quick = dict(_take(top.get("quick") or {}, "quick", set(WorkloadSpec.__dataclass_fields__) - {"shape", "prompts"}))
    return _build(Scenario, {
        "name": str(top["name"]), "model": str(top.get("model", "reference")),
        "input_layers": int(split.get("input_layers", 2)), "output_layers": int(split.get("output_layers", 1)),
        "devices": tuple(groups), "workload": workload, "systems": systems,
        "ttft_slo_ms": float(slo.get("ttft_ms", 2000)), "tbt_slo_ms": float(slo.get("tbt_ms", 200)),
        "dtype": str(top.get("dtype", "float32")), "ablation": bool(top.get("ablation", False)),
        "paper": dict(top.get("paper") or {}), "cloud_threads": int(top.get("cloud_threads", 1)),
        "device_threads": int(top.get("device_threads", 1)), "hardware": hardware,
        "scale_devices": scale_devices, "quick": quick}, "scenario")


DEFAULT_QUICK = {"requests": 4, "max_new_tokens": 32}  # `--quick` for a scenario that names no `quick:` of its own


def quick_variant(scenario: Scenario) -> Scenario:
    """The scenario's `--quick` run: its `quick:` workload fields (else DEFAULT_QUICK) replaced, "-quick" named."""
    try:
        workload = dataclasses.replace(scenario.workload, **(scenario.quick or DEFAULT_QUICK))
    except (TypeError, ValueError) as exc:
        raise ScenarioError(f"quick: {exc}") from None
    return dataclasses.replace(scenario, name=f"{scenario.name}-quick", workload=workload)


SHIPPED = Path(__file__).parent / "scenarios"  # the scenarios that come with the testbed


def resolve_scenario(name_or_path: str | Path) -> Path:
    """A scenario file's path: as given, or a shipped scenario's name (`specbench` = scenarios/specbench.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = SHIPPED / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.yaml")))
    raise ScenarioError(f"no scenario file {path}, and no shipped scenario of that name (shipped: {known})")


def load_scenario(path: str | Path) -> Scenario:
    try:
        import yaml
    except ImportError:
        raise ScenarioError("scenario files need PyYAML: pip install 'hatserve[testbed]'") from None
    path = resolve_scenario(path)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc}") from None
    return parse_scenario(data or {}, path.parent)
