"""The encoding a demanded block would be promoted at: ``policy.plan.Plan.demand_encoding``.

The rule is defined on ``Plan`` (its docstring). The step does not compute it for every block:
:class:`DemandEncodings` keeps what the rule reads (the plan's targets, scoring's preferred
encodings, the snapshot's tables, the budget's terms) and computes a block's encoding when it
is asked, one block (a lease miss) or all of them (``Plan.demand_encoding``).

PERF: the walk below was part of the schedule's first pass over every block (``classify``), a
third of that pass: ``python bench/policy_ab.py --base 673b50e --sizes 16384 --steps 300``
(load 1): step ratio 0.958 (schedule phase 0.647 -> 0.557 ms). A caller asks for the blocks
of a lease miss (``bench/replay`` does; the controller need not: a miss wakes its loop, whose
next step plans the promotion); the plan is never pickled with the tables (``__reduce__``
ships the computed encodings).

The tables are the snapshot's and the step's arrays, kept by reference: as everywhere in the
policy (``policy.static.static_for`` keys its cache by them), a snapshot's arrays are never
changed in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policy._select import _jit
from policy.snapshot import NONE


@dataclass(frozen=True)
class DemandRule:
    """The quality budget's terms for ``policy.plan.Plan.demand_encoding`` (defined there): its
    headroom where it fixed no block, its price where it did, and whether it is exhausted."""

    headroom: float
    price: float
    exhausted: bool


@_jit
def demand_encodings(
    rows: np.ndarray,
    target_hbm: np.ndarray,
    preferred: np.ndarray,
    sensitivity: np.ndarray,
    allowed: np.ndarray,
    budget_fallback: np.ndarray,
    nbytes: np.ndarray,
    headroom: float,
    price: float,
    exhausted: bool,
) -> np.ndarray:
    """The demand encoding (int8) of each block of ``rows``: its target where it has one; else,
    when ``exhausted``, the least sensitive allowed encoding (fewest bytes, then lowest index,
    among equals); else ``preferred``, moved down ``budget_fallback`` while its sensitivity
    passes ``headroom`` and the move saves at least ``price`` per extra byte."""
    n_encodings = nbytes.shape[1]
    out = np.empty(len(rows), np.int8)
    for i in range(len(rows)):
        r = rows[i]
        e = target_hbm[r]
        if e != NONE:
            pass
        elif exhausted:
            e = 0  # full precision: always allowed
            for other in range(1, n_encodings):
                if not allowed[r, other]:
                    continue
                s, least = sensitivity[r, other], sensitivity[r, e]
                if s < least or (s == least and nbytes[r, other] < nbytes[r, e]):
                    e = other
        else:
            e = preferred[r]
            s = sensitivity[r, e]
            for _ in range(n_encodings):
                if s <= headroom:
                    break
                g = budget_fallback[r, e]
                s_g = sensitivity[r, g]
                saved = s - s_g
                if not saved > 0.0:
                    break
                if saved / max(nbytes[r, g] - nbytes[r, e], 1) < price:
                    break  # the veto would fix other blocks, at its price, before this one
                e, s = g, s_g
        out[i] = e
    return out


# What the rule reads: target_hbm, preferred, sensitivity, allowed, budget_fallback, nbytes.
_Tables = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class DemandEncodings:
    """A plan's demand encodings, computed when asked (see the module docstring)."""

    __slots__ = ("_all", "_inputs", "_rule")

    def __init__(
        self,
        rule: DemandRule,
        target_hbm: np.ndarray,
        preferred: np.ndarray,
        sensitivity: np.ndarray,
        allowed: np.ndarray,
        budget_fallback: np.ndarray,
        nbytes: np.ndarray,
    ):
        self._rule: DemandRule | None = rule
        self._inputs: _Tables | None = (
            target_hbm, preferred, sensitivity, allowed, budget_fallback, nbytes,
        )  # fmt: skip
        self._all: np.ndarray | None = None

    @classmethod
    def computed(cls, values: np.ndarray) -> DemandEncodings:
        """Encodings already computed (``values``: one int8 per block)."""
        out = cls.__new__(cls)
        out._rule = None
        out._inputs = None
        out._all = values
        return out

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The encodings of the blocks ``rows`` (int8)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self._inputs is None or self._all is not None:
            computed: np.ndarray = self.all()[rows]
            return computed
        n = len(self._inputs[0])
        if len(rows) and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"block rows must lie in [0, {n}); got {rows.min()}..{rows.max()}")
        rule = self._rule
        assert rule is not None
        out: np.ndarray = demand_encodings(
            rows, *self._inputs, rule.headroom, rule.price, rule.exhausted
        )
        return out

    def of(self, block: int) -> int:
        """The encoding of block ``block`` (a row index)."""
        return int(self.rows(np.array([block]))[0])

    def all(self) -> np.ndarray:
        """Every block's encoding (int8), computed once."""
        if self._all is None:
            assert self._inputs is not None
            self._all = self.rows(np.arange(len(self._inputs[0])))
            self._inputs = None  # the tables are no longer needed
        return self._all

    def __reduce__(self) -> tuple[object, tuple[np.ndarray]]:
        # Pickled as the computed encodings (one byte a block), not the tables they come from.
        return DemandEncodings.computed, (self.all(),)
