"""Compiled kernels of the veto (``policy.veto``): its entry pass and the blocks' quality costs.

The budget rule's kernels are in ``policy._veto_budget`` and ``policy._veto_candidates``, the
fit of moved blocks into their tier in ``policy._veto_fit``; ``fit_rows`` and ``budget_choice``
are re-exported here.
"""

from __future__ import annotations

import numpy as np

from policy._select import _jit, order_in_place
from policy._veto_budget import budget_choice
from policy._veto_candidates import candidate_buffers, candidate_values
from policy._veto_fit import fit_rows
from policy.snapshot import NONE

__all__ = ["budget_choice", "fit_rows", "quality_costs", "veto_entry"]


@_jit
def veto_entry(
    leased: np.ndarray,
    hbm_encoding: np.ndarray,
    hbm: np.ndarray,
    allowed: np.ndarray,
    hbm_tier: np.ndarray,
    nbytes: np.ndarray,
    use_probability: np.ndarray,
    sensitivity: np.ndarray,
    budget_fallback: np.ndarray,
    n_tiers: int,
    sticky: float,
) -> tuple[
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    tuple[np.ndarray, ...],
    float,
    bool,
]:
    """The lease rule, in place: every leased HBM copy the proposal ``hbm`` touched is
    restored. Returns the rows restored and what was proposed for them, the mask of protected
    (leased, resident) blocks, the rows then proposed at an encoding their floor or unknown
    sensitivity forbids, each tier's bytes of proposed HBM copies, each block's quality cost
    (``quality_costs``), and the quality budget's first candidates (``policy._veto_candidates``)
    less the forbidden rows, with the sum of their savings and whether all are finite and
    >= 0: the caller merges the forbidden rows back once rule 2 has moved them."""
    n = len(hbm)
    protected = np.empty(n, np.bool_)
    tier_bytes = np.zeros(n_tiers, np.int64)
    cost = np.empty(n)  # PERF: written once a block, not zeroed first (8 MB at a million)
    # PERF: one pass, into buffers as long as the blocks (memory is only touched where
    # written); a counting pass first read every input twice (a million blocks' captured
    # inputs, alternating on the loaded 2-core machine: 28.0 -> 18.2 ms median).
    rows = np.empty(n, np.int64)
    proposed = np.empty(n, np.int64)
    bad_rows = np.empty(n, np.int64)
    c_rows, c_current, c_fallback, c_saving, c_key, c_old, c_new = candidate_buffers(n)
    c_value = c_key.view(np.float64)  # each candidate's order value, made its key after
    touched = 0
    bad = 0
    candidates = 0
    total = 0.0
    valid = True
    # PERF: a run of blocks of one tier summed in a register (a sum kept in the array is a
    # chain of stores and loads, one a block): captured inputs, alternating with the array
    # sum, median ratio 0.98 at 16,384 blocks and at a million.
    run_tier, run_bytes = 0, 0
    for r in range(n):
        protected[r] = leased[r] and hbm_encoding[r] != NONE
        forbidden = False
        if protected[r] and hbm[r] != hbm_encoding[r]:
            rows[touched] = r
            proposed[touched] = hbm[r]
            hbm[r] = hbm_encoding[r]
            touched += 1
        elif hbm[r] != NONE and not protected[r] and not allowed[r, hbm[r]]:
            bad_rows[bad] = r
            bad += 1
            forbidden = True
        if hbm[r] != NONE:
            if hbm_tier[r] != run_tier:
                tier_bytes[run_tier] += run_bytes
                run_tier, run_bytes = hbm_tier[r], 0
            run_bytes += nbytes[r, hbm[r]]
            cost[r] = use_probability[r] * sensitivity[r, hbm[r]]
            if cost[r] > 0 and not protected[r] and not forbidden:
                encoding, better, saved, value, old, new = candidate_values(
                    r, cost, hbm, budget_fallback, use_probability, sensitivity, nbytes,
                    hbm_encoding, sticky,
                )  # fmt: skip
                c_rows[candidates] = r
                c_current[candidates] = encoding
                c_fallback[candidates] = better
                c_saving[candidates] = saved
                c_value[candidates] = value + 0.0  # -0.0 + 0.0 is +0.0
                c_old[candidates] = old
                c_new[candidates] = new
                valid &= np.isfinite(saved) and saved >= 0.0
                total += saved
                candidates += 1
        else:
            cost[r] = 0.0
    tier_bytes[run_tier] += run_bytes
    # PERF: the order keys in one branch-free pass after (``key_bits`` through a one-element
    # array each before): captured inputs, alternating, 16,384 blocks 0.190 -> 0.172 ms
    # (median ratio 0.891), a million 14.9 -> 14.7 ms (0.979; with the cost not zeroed first).
    order_in_place(c_key, candidates)
    rows = rows[:touched].copy()
    proposed = proposed[:touched].copy()
    bad_rows = bad_rows[:bad].copy()
    first = (
        c_rows[:candidates], c_current[:candidates], c_fallback[:candidates],
        c_saving[:candidates], c_key[:candidates], c_old[:candidates], c_new[:candidates],
    )  # fmt: skip
    return rows, proposed, protected, bad_rows, tier_bytes, cost, first, total, valid


@_jit
def quality_costs(
    hbm: np.ndarray, use_probability: np.ndarray, sensitivity: np.ndarray
) -> np.ndarray:
    """Per block: ``p(use) * sensitivity`` at its HBM encoding (0 when not in HBM)."""
    cost = np.zeros(len(hbm))
    for r in range(len(hbm)):
        if hbm[r] != NONE:
            cost[r] = use_probability[r] * sensitivity[r, hbm[r]]
    return cost
