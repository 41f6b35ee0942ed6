"""The cloud's cost as this device sees it, for the chunk planner."""
from __future__ import annotations

from hat.common.cost_fit import CostFit, LinearCost, attended
from hat.common.local_cost import LocalCost, local_cost

from .cloud_link import CloudLink

_CLOUD_WEIGHT = 0.3  # weight of the newest chunk in the moving ratio of measured to predicted cloud time
OWN_FIT_MIN = 3  # compute times reported before `cost(own=True)` trusts this device's own fit (the probe gives 3)


class CloudCostTracker:
    """The cloud's cost as this device sees it: the cloud's published predictor times a moving ratio of the
    compute times replies report to what the predictor said, corrected near the sizes this device timed (the
    ratio follows a loaded cloud from its first reply; the correction keeps a line that misses some sizes, as a
    decode-fitted one misses large chunks, from swinging the ratio with each chunk's size); without a predictor,
    a fit of those times."""

    def __init__(self, link: CloudLink):
        self._link = link
        self.ratio = 1.0
        self._ratio_samples = 0
        self._own_fit = CostFit(128)

    def refresh(self) -> None:
        """Take the newest predictor fetched and ask for a fresh one in the background."""
        self._link.refresh_latency()

    def published(self) -> tuple[LinearCost, float] | None:
        reply = self._link.cloud_latency
        if reply is None or not (reply.per_token_us or reply.base_us):
            return None
        return (LinearCost(reply.base_us / 1e6, reply.per_token_us / 1e6, reply.per_token_context_ns / 1e9),
                reply.queue_us / 1e6)

    def cost(self, own: bool = False) -> tuple[LocalCost, float]:
        """The cloud's cost and queue. `own`: this device's fit of the compute times replies reported (corrected near
        the sizes it timed), once it has OWN_FIT_MIN of them (on shared cores: the cloud's own fit also takes the
        batches this device's compute slowed down, which the device's solo timings leave out)."""
        published = self.published()
        if published is None:
            return local_cost(self._own_fit), 0.0
        cost, queue_s = published
        if own and len(self._own_fit) >= OWN_FIT_MIN:
            return local_cost(self._own_fit), queue_s
        return local_cost(self._own_fit, cost.scaled(self.ratio)), queue_s

    def stages(self) -> int:
        """The stages of the cloud's pipeline-parallel middle part, as it publishes them (1 when it does not)."""
        reply = self._link.cloud_latency
        return max(1, reply.pipeline_stages) if reply is not None else 1

    def observe(self, tokens: int, start: int, compute_s: float, batch_sessions: int) -> None:
        self._own_fit.add(tokens, attended(tokens, start), compute_s)
        published = self.published()
        if published is not None and batch_sessions:
            predicted = published[0].predict(tokens, start)
            if predicted > 0:  # the first measurement replaces the neutral prior
                weight = _CLOUD_WEIGHT if self._ratio_samples else 1.0
                self.ratio += weight * (compute_s / predicted - self.ratio)
                self._ratio_samples += 1
