"""The quality budget's candidates (rule 3 of ``policy.veto``; the rounds are in
``policy._veto_budget``).

A round's candidates are the blocks with a quality cost that are not protected, in block order,
each with what its fix (a move to its ``budget_fallback`` encoding) saves and costs in bytes.
They are built once, in the pass of ``policy._veto_kernels.veto_entry`` that reads every block's
tables, and carried from round to round: ``policy._veto_budget.fix_round`` rewrites the
candidates it moved, in place, from the table rows it reads anyway (a pass over every block's
tables per round cost more than the round), and ``compact_candidates`` drops those it left
without a cost when the round fixed only some and another round comes (and reads again those it
fixed).

Candidate arrays, one entry per candidate: ``rows`` (int64, ascending), ``current`` and
``fallback`` encodings (int8), ``saving`` (``cost - p(use) * sensitivity(fallback)``, float64),
``order_key`` (``policy._select.key_bits`` of minus the saving per extra byte: the rounds'
order), and the HBM bytes at the current and fallback encodings (int64).
"""

from __future__ import annotations

import numpy as np

from policy._select import _inline, _jit, key_bits
from policy.snapshot import NONE


@_inline
def candidate_values(
    row: int,
    cost: np.ndarray,
    hbm: np.ndarray,
    budget_fallback: np.ndarray,
    use_probability: np.ndarray,
    sensitivity: np.ndarray,
    nbytes: np.ndarray,
    held: np.ndarray,
    sticky: float,
) -> tuple[int, int, float, float, int, int]:
    """Block ``row`` as a candidate: its current and fallback encodings, saving, order value
    (its ``key_bits`` is the order key), and bytes at both encodings. The value is minus the
    saving per extra byte; a fix to the encoding the block ``held`` in HBM already counts
    ``sticky`` times its extra bytes (hysteresis: the same blocks stay fixed from step to step;
    1.0: none). PERF: scalars out; the callers store them (a helper that stored into the seven
    arrays cost 70 ns a call in reference counts: 0.12 -> 1.2 ms at 16,384 blocks)."""
    encoding = hbm[row]
    better = budget_fallback[row, encoding]
    saved = cost[row] - use_probability[row] * sensitivity[row, better]
    old = nbytes[row, encoding]
    new = nbytes[row, better]
    extra = max(new - old, 1) * (sticky if held[row] == better else 1.0)
    return encoding, better, saved, -(saved / extra), old, new


@_jit
def candidate_buffers(n: int) -> tuple[np.ndarray, ...]:
    """Candidate arrays for up to ``n`` candidates (uninitialized)."""
    return (
        np.empty(n, np.int64),
        np.empty(n, np.int8),
        np.empty(n, np.int8),
        np.empty(n, np.float64),
        np.empty(n, np.int64),
        np.empty(n, np.int64),
        np.empty(n, np.int64),
    )


@_jit
def all_candidates(
    cost: np.ndarray,
    protected: np.ndarray,
    hbm: np.ndarray,
    budget_fallback: np.ndarray,
    use_probability: np.ndarray,
    sensitivity: np.ndarray,
    nbytes: np.ndarray,
    held: np.ndarray,
    sticky: float,
) -> tuple[tuple[np.ndarray, ...], float, bool]:
    """The candidates of every block (``cost > 0``, not ``protected``), with the sum of their
    savings in candidate order and whether every saving is finite and >= 0."""
    n = len(cost)
    rows, current, fallback, saving, order_key, old_bytes, new_bytes = candidate_buffers(n)
    scratch = np.empty(1)
    bits = scratch.view(np.int64)
    total = 0.0
    valid = True
    k = 0
    for row in range(n):
        if not (cost[row] > 0 and not protected[row]):
            continue
        encoding, better, saved, value, old, new = candidate_values(
            row, cost, hbm, budget_fallback, use_probability, sensitivity, nbytes, held, sticky
        )
        key = key_bits(value, scratch, bits)
        rows[k] = row
        current[k] = encoding
        fallback[k] = better
        saving[k] = saved
        order_key[k] = key
        old_bytes[k] = old
        new_bytes[k] = new
        valid &= np.isfinite(saved) and saved >= 0.0
        total += saved
        k += 1
    kept = (
        rows[:k], current[:k], fallback[:k], saving[:k], order_key[:k], old_bytes[:k],
        new_bytes[:k],
    )  # fmt: skip
    return kept, total, valid


@_jit
def compact_candidates(
    cost: np.ndarray,
    hbm: np.ndarray,
    budget_fallback: np.ndarray,
    use_probability: np.ndarray,
    sensitivity: np.ndarray,
    nbytes: np.ndarray,
    held: np.ndarray,
    sticky: float,
    rows: np.ndarray,
    current: np.ndarray,
    fallback: np.ndarray,
    saving: np.ndarray,
    order_key: np.ndarray,
    old_bytes: np.ndarray,
    new_bytes: np.ndarray,
) -> tuple[tuple[np.ndarray, ...], float, bool]:
    """The candidates less those marked gone (``rows < 0``), those marked fixed (``current``
    ``NONE``) made again from their blocks as they now are (``candidate_values``), moved up
    in place (the arrays returned are prefixes of those given), with the sum of their savings
    in candidate order and whether every saving is finite and >= 0."""
    scratch = np.empty(1)
    bits = scratch.view(np.int64)
    total = 0.0
    valid = True
    k = 0
    for i in range(len(rows)):
        if rows[i] < 0:
            continue
        if current[i] == NONE:
            encoding, better, saved, value, old, new = candidate_values(
                rows[i], cost, hbm, budget_fallback, use_probability, sensitivity, nbytes,
                held, sticky,
            )  # fmt: skip
            current[i] = encoding
            fallback[i] = better
            saving[i] = saved
            order_key[i] = key_bits(value, scratch, bits)
            old_bytes[i] = old
            new_bytes[i] = new
        if k < i:
            rows[k] = rows[i]
            current[k] = current[i]
            fallback[k] = fallback[i]
            saving[k] = saving[i]
            order_key[k] = order_key[i]
            old_bytes[k] = old_bytes[i]
            new_bytes[k] = new_bytes[i]
        valid &= np.isfinite(saving[k]) and saving[k] >= 0.0
        total += saving[k]
        k += 1
    kept = (
        rows[:k], current[:k], fallback[:k], saving[:k], order_key[:k], old_bytes[:k],
        new_bytes[:k],
    )  # fmt: skip
    return kept, total, valid
