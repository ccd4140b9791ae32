"""Back-off for transient send errors (the platform said "later", or could not be reached)."""

from __future__ import annotations


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential back-off for the `attempt`-th delivery (1-based): base * 2^(attempt-1), capped."""
    return min(cap, base * (2 ** max(0, min(attempt, 32) - 1)))
