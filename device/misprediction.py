"""What the chunk planner's cost model leaves out, learned from the prompts it mispredicted.

After each prompt the cut that was sent is simulated again with the costs as they stand now (each stage's fit has
taken that prompt's timings), and the time to the last chunk's output that is still unexplained is split into a
cost per prompt and a cost per chunk after the first: residual = per_prompt + per_chunk * (chunks - 1), over the
newest prompts (residuals signed, so noise either way averages out; the two costs never below zero).
- Whole prompts (one chunk) in the window measure the per-prompt cost directly (their mean residual), and each
  chunked one a per-chunk cost beyond it (its residual less that, over its chunks after the first); the median of
  those is the per-chunk cost. Contention is not linear in the chunks (on shared cores a second chunk costs most,
  overlapping the device's and the cloud's compute): a joint fit pushed part of it into the per-prompt cost and
  mispredicted the whole prompt, and a fit through zero let cuts into many chunks drown the few-chunk ones.
- Without a whole prompt, both come from a least squares over cuts of different sizes; with one cut size only,
  nothing tells chunks apart and the prompt takes it all.
Prompts as predicted make the correction fade. Added to the next plans, the per-chunk cost makes cuts into many
chunks dearer as far as they have been seen to cost more than the model said (Python and wake-up overheads per
message, two processes on the same cores); the per-prompt cost makes the prediction right without changing the
choice.
"""
from __future__ import annotations

from collections import deque

import numpy as np

from hat.common.cost_fit import bounded_least_squares

WINDOW = 8  # prompts the correction is fitted over
# a prompt whose unexplained time is more than this share of its measured time is not taught: a stage's fit was far
# off (a link not yet learned, a changed machine) and follows by itself; the correction is for what the stages'
# fits leave out, and one such prompt would hold every prediction of the next WINDOW prompts about 2x too high
GROSS_MISS = 0.5


class MispredictionModel:
    def __init__(self, window: int = WINDOW):
        self._residuals: deque[tuple[int, float]] = deque(maxlen=window)  # (chunks, unexplained seconds, signed)
        self.per_prompt_s = 0.0  # unexplained time per prompt
        self.per_chunk_s = 0.0  # unexplained time per chunk after a prompt's first

    def add(self, chunks: int, measured_s: float, predicted_s: float) -> None:
        """One prompt: its chunks, the measured time and what the current costs (plus the current correction)
        predict for the cut it was sent in."""
        if chunks < 1:
            return
        unexplained = measured_s - (predicted_s - self.per_prompt_s - self.per_chunk_s * (chunks - 1))
        if abs(unexplained) > GROSS_MISS * measured_s:  # a stage's own fit was far off: its estimator follows
            return
        self._residuals.append((chunks, unexplained))  # signed: noise either way averages out
        data = np.asarray([(1.0, float(k - 1), r) for k, r in self._residuals])
        whole, chunked = data[data[:, 1] == 0], data[data[:, 1] > 0]
        if not len(whole) or not len(chunked):
            if len(set(data[:, 1])) == 1:  # one cut seen: nothing tells chunks apart, the prompt takes it
                self.per_prompt_s, self.per_chunk_s = max(0.0, float(np.mean(data[:, 2]))), 0.0
            else:
                self.per_prompt_s, self.per_chunk_s = map(float, bounded_least_squares(data[:, :2], data[:, 2],
                                                                                       np.zeros(2)))
            return
        self.per_prompt_s = max(0.0, float(np.mean(whole[:, 2])))
        self.per_chunk_s = max(0.0, float(np.median((chunked[:, 2] - self.per_prompt_s) / chunked[:, 1])))
