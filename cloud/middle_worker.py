"""Runs the middle part over a batch of FORWARD requests from many sessions in one ragged forward."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from hat.common.bundle import BundleManifest, load_manifest
from hat.common.checkpoint import load_tensors
from hat.common.layers import SequenceSpan
from hat.common.model_part import ModelPart
from hat.common.model_spec import load_model_spec
from hat.common.proto import hat_pb2 as pb
from hat.common.wire import WireError

from .session_store import CloudSession

log = logging.getLogger("hat.cloud")


@dataclass(slots=True)
class ForwardJob:
    owner: bytes  # routing id to reply to
    header: pb.DataHeader  # the FORWARD's header
    hidden: torch.Tensor  # [num_tokens, hidden] input-part hidden states
    session: CloudSession  # the session whose cache the tokens extend
    arrival_us: int = 0  # the cloud's clock when the FORWARD had fully arrived

    # what the scheduler reads (a simulated job offers the same: hat.testbed.sim_cloud.SimJob)
    @property
    def tokens(self) -> int:
        return self.hidden.shape[0]

    @property
    def start(self) -> int:
        return int(self.header.start)

    @property
    def session_key(self) -> str:
        return self.header.session_id

    @property
    def append_only(self) -> bool:
        return self.header.append_only

    @property
    def tbt_slo_s(self) -> float:
        return self.session.tbt_slo_s


def load_middle_part(bundle_dir: str | Path, device: str = "cpu") -> tuple[ModelPart, BundleManifest]:
    manifest = load_manifest(bundle_dir, part="cloud")
    spec = load_model_spec(bundle_dir)
    first, last = manifest.middle_layers
    tensors = load_tensors(bundle_dir, lambda name: True)
    return ModelPart.from_tensors(spec, first, last, tensors, device=device), manifest


class MiddleWorker:
    def __init__(self, part: ModelPart):
        self.part = part

    def check(self, job: ForwardJob) -> None:
        """Refuse, before it touches any cache, a FORWARD that does not fit this model or session."""
        spec, header, cache = self.part.spec, job.header, job.session.cache
        if job.hidden.shape[1] != spec.hidden_size:
            raise WireError(pb.BAD_TENSOR, f"hidden size {job.hidden.shape[1]}, this model's is {spec.hidden_size}")
        if header.start > cache.length:
            raise WireError(pb.BAD_POSITION, f"start position {header.start} is beyond the session's cache of "
                                             f"{cache.length} positions (a gap: a chunk is missing or out of order)")
        if header.append_only and header.start != cache.length:
            raise WireError(pb.BAD_POSITION, f"prompt chunk at position {header.start} would rewrite the session's "
                                             f"cache of {cache.length} positions (a duplicate or out-of-order chunk)")
        end = header.start + job.hidden.shape[0]
        if end > cache.max_length:
            raise WireError(pb.CONTEXT_EXCEEDED, f"positions up to {end} exceed the session's {cache.max_length} positions "
                                                 "(the max_positions of its OPEN, at most the model's context)")

    def run(self, jobs: list[ForwardJob]) -> list[torch.Tensor | WireError]:
        """One output per job: the middle part's hidden states of the positions the job asked back."""
        try:
            return self._forward(jobs)
        except Exception:  # one bad job must not fail the batch: retry each alone (caches were cut to start)
            if len(jobs) == 1:
                log.exception("forward failed for session %s", jobs[0].header.session_id)
                return [WireError(pb.INTERNAL, "the cloud failed to run this request")]
            return [result for job in jobs for result in self.run([job])]

    @torch.inference_mode()
    def submit(self, jobs: list[ForwardJob]) -> None:
        """Start a batch on a pipeline-parallel part (its stage 0 runs now; `collect` returns it, in order)."""
        self.part.submit(*self._inputs(jobs))

    def collect(self, jobs: list[ForwardJob]) -> list[torch.Tensor | WireError]:
        """The oldest submitted batch's outputs, which must be `jobs`; a batch a later stage failed is INTERNAL for
        each of its jobs."""
        try:
            out = self.part.collect().cpu()
        except Exception:
            log.exception("a pipelined forward failed for %d sessions", len(jobs))
            return [WireError(pb.INTERNAL, "the cloud failed to run this request")] * len(jobs)
        return self._split(jobs, out)

    @staticmethod
    def _inputs(jobs: list[ForwardJob]) -> tuple[torch.Tensor, list[SequenceSpan]]:
        spans = [SequenceSpan(job.session.cache, int(job.header.start), job.hidden.shape[0]) for job in jobs]
        return (torch.cat([job.hidden for job in jobs]) if len(jobs) > 1 else jobs[0].hidden), spans

    @staticmethod
    def _split(jobs: list[ForwardJob], out: torch.Tensor) -> list[torch.Tensor]:
        """Each job's rows of a batch's output: the last `return_last` of its positions (0 = all)."""
        results, offset = [], 0
        for job in jobs:
            count = job.hidden.shape[0]
            keep = min(job.header.return_last or count, count)
            results.append(out[offset + count - keep: offset + count])
            offset += count
        return results

    @torch.inference_mode()
    def _forward(self, jobs: list[ForwardJob]) -> list[torch.Tensor]:
        hidden, spans = self._inputs(jobs)
        return self._split(jobs, self.part.forward_layers(hidden, spans).cpu())
