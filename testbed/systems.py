"""The systems a testbed scenario compares: device-side configurations of the same split model and cloud, and a
cloud-only baseline.

  cloud-only    no split: the device sends the prompt's token ids, a cloud running the whole model streams the
                tokens back (no privacy; for reference: testbed/cloud_only.py)
  u-shape       plain split decoding, the prompt sent whole (the U-shaped split of earlier work)
  u-sarathi     plain split decoding, the prompt in fixed 256-token chunks (Sarathi-style chunked prefill)
  chunked       plain split decoding, adaptive chunking (this project's planner)
  split-spec    speculative decoding (draft on the device, verify in the cloud), the prompt sent whole
  chunked-spec  adaptive chunking and speculative decoding, no drafting while a round is in flight
  hat           HAT: speculation with parallel drafting, and one chunk size per device, chosen once at start-up
                by the cost model for the workload's mean prompt (as HAT profiles each device offline)
  full          this project: adaptive chunking planned per prompt and re-planned on drift, speculation with
                parallel drafting
The ablation steps base, +chunking, +speculation, both, +parallel drafting are u-shape, chunked,
split-spec, chunked-spec and full.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SystemConfig:
    name: str
    speculation: bool  # draft with the bundle's adapter
    parallel_draft: bool  # draft the next round while one is in flight
    chunking: str  # "none", "fixed" (fixed_size), "adaptive", or "per-device" (planned once at start-up)
    fixed_size: int = 256  # chunk size for "fixed"
    cloud_only: bool = False  # no split: token ids to a cloud running the whole model (the fields above unused)


SYSTEMS = {s.name: s for s in (
    SystemConfig("cloud-only", False, False, "none", cloud_only=True),
    SystemConfig("u-shape", False, False, "none"),
    SystemConfig("u-sarathi", False, False, "fixed", 256),
    SystemConfig("chunked", False, False, "adaptive"),
    SystemConfig("split-spec", True, False, "none"),
    SystemConfig("chunked-spec", True, False, "adaptive"),
    SystemConfig("hat", True, True, "per-device"),
    SystemConfig("full", True, True, "adaptive"),
)}
ABLATION = ("u-shape", "chunked", "split-spec", "chunked-spec", "full")
ABLATION_LABELS = {"u-shape": "base", "chunked": "+chunking", "split-spec": "+speculation", "chunked-spec": "both",
                   "full": "+parallel drafting"}


def report_names(systems: tuple[str, ...], ablation: bool) -> dict[str, str]:
    """The name each system goes by in a report: in an ablation its step, e.g. "+chunking (chunked)"."""
    return {s: f"{ABLATION_LABELS[s]} ({s})" if ablation and s in ABLATION_LABELS else s for s in systems}
