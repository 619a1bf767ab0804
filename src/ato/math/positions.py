"""Which patched positions can change a scored prediction (pure; no numpy, so `ato.params` can use it)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["can_change_scored_predictions", "unscorable_positions"]


def unscorable_positions(positions: Sequence[int] | str, seq_len: int) -> list[int]:
    """Positions of a set whose patch can change no scored prediction.

    Predictions are scored for tokens 1…seq_len − 1, from positions 0…seq_len − 2; a patch at
    position p changes predictions made at p and later. So p ≥ seq_len − 1 (the last position,
    whose own prediction is not scored) changes nothing; nor does p ≤ 0 (BOS is never patched).
    "all" (every non-BOS position) is judged as a whole: [] when it holds a useful position
    (seq_len ≥ 3), else its positions.
    """
    if isinstance(positions, str):
        if positions != "all":
            raise ValueError(f"expected `all` or a list of positions, got {positions!r}")
        return [] if seq_len >= 3 else list(range(1, seq_len))
    return [int(p) for p in positions if not 1 <= int(p) <= seq_len - 2]


def can_change_scored_predictions(positions: Sequence[int] | str, seq_len: int) -> bool:
    """True when every position of the set can change at least one scored prediction (a set
    holding a no-op position, e.g. the last position of the sequence, is to be refused)."""
    if not isinstance(positions, str) and len(positions) == 0:
        return False
    return not unscorable_positions(positions, seq_len)
