"""Fuzzing helpers shared by the tests of every network-facing decoder."""
from __future__ import annotations

from hypothesis import strategies as st


def mutate(draw, frames: list[bytes], max_edits: int = 6) -> list[bytes]:
    """`frames` after 1 to `max_edits` random edits: bit flips, byte changes, insertions, deletions, truncations,
    appends, dropped, duplicated or swapped frames."""
    frames = [bytearray(f) for f in frames]
    for _ in range(draw(st.integers(1, max_edits))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "append", "drop", "dup", "swap"]))
        index = draw(st.integers(0, len(frames) - 1)) if frames else 0
        frame = frames[index] if frames else bytearray()
        pos = draw(st.integers(0, max(len(frame) - 1, 0)))
        if op == "flip" and frame:
            frame[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and frame:
            frame[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            frame[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and frame:
            del frame[pos: pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del frame[pos:]
        elif op == "append":
            frame.extend(draw(st.binary(min_size=1, max_size=16)))
        elif op == "drop" and frames:
            del frames[index]
        elif op == "dup" and frames:
            frames.insert(index, bytearray(frame))
        elif op == "swap" and len(frames) >= 2:
            i, j = draw(st.integers(0, len(frames) - 1)), draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
    return [bytes(f) for f in frames]
