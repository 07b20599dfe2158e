"""The score phase's kernels, called in turn from one compiled function.

``score_and_choose`` runs ``score_rows`` (then ``weighted_preference`` with a quality weight),
``choose_hbm``, ``chosen_density`` and ``choose_fallback`` (``policy._score_kernels``), as
``policy.score.score`` and ``choose_targets`` call them one by one from Python, with their
glue: the output arrays, the tiers' usable bytes and HBM budgets, the hysteresis penalty per
level. The kernels are unchanged; what they hand each other stays in compiled code, and each
expression of the glue is the numpy one's, element by element (results identical bit for bit).

PERF: each return from a kernel to Python found the interpreter's data evicted by the kernel
before (a 16,384-block pass evicts a 2 MB L2); see ``policy._schedule_chain``. ``python
bench/policy_ab.py --base 1f8c9c1 --sizes 1000,16384 --steps 300`` (load 2.7 and 3.0): score
phase at 16,384 blocks 0.915 -> 0.860 and 0.718 -> 0.678 ms (step ratios 0.986, 0.998), at
1,000 blocks 0.103 -> 0.084 and 0.134 -> 0.117 ms (step ratios 0.970, 0.975).
"""

from __future__ import annotations

import numpy as np

from policy._score_kernels import (
    choose_fallback,
    choose_hbm,
    chosen_density,
    score_rows,
    weighted_preference,
)
from policy._select import _jit


@_jit
def score_and_choose(
    fallback_level: np.ndarray,
    model: np.ndarray,
    hbm_encoding: np.ndarray,
    leased: np.ndarray,
    placed_at_s: np.ndarray,
    demand: np.ndarray,
    regenerable: np.ndarray,
    nbytes: np.ndarray,
    sensitivity: np.ndarray,
    hbm_tier: np.ndarray,
    host_tier: np.ndarray,
    cxl_tier: np.ndarray,
    capacity_bytes: np.ndarray,
    reserved_bytes: np.ndarray,
    link_gbps: np.ndarray,
    use_probability: np.ndarray,
    time_to_next_use_s: np.ndarray,
    period_s: np.ndarray,
    recovery_by_level: np.ndarray,
    preferred_by_level: np.ndarray,
    unit_density_by_level: np.ndarray,
    preferred_nbytes_by_level: np.ndarray,
    decode_s: np.ndarray,
    allowed: np.ndarray,
    full_nbytes: np.ndarray,
    decode_rate: np.ndarray,
    per_byte_to_hbm_s: np.ndarray,
    latency_to_hbm_s: np.ndarray,
    hbm_group_tiers: np.ndarray,
    host_group_tiers: np.ndarray,
    cxl_group_tiers: np.ndarray,
    every_hbm: bool,
    every_host: bool,
    every_cxl: bool,
    inverse_imminence_s: float,
    horizon_s: float,
    now_s: float,
    min_dwell_s: float,
    quality_weight_s: float,
    hysteresis_multiple: float,
    unreserved_fraction: float,
) -> tuple[np.ndarray, ...]:
    """``Scores``' arrays (used, preferred, preferred_density, preferred_nbytes, imminence,
    pinned, hbm_budget_bytes, usable_bytes), then ``Targets``' (hbm_encoding, fallback_level,
    chosen_density, vetoed_out, quality_bound): what ``policy.score.score`` then
    ``choose_targets`` return. ``unreserved_fraction``: 1 less the HBM headroom fraction;
    ``every_*``: the level's one tier holds every block (``policy.score._every_block``)."""
    n = len(fallback_level)
    used = np.empty(n)
    preferred_density = np.empty(n)
    imminence = np.empty(n)
    preferred = np.empty(n, np.int8)
    pinned = np.empty(n, np.bool_)
    score_rows(
        fallback_level, model, hbm_encoding, leased, placed_at_s, use_probability,
        time_to_next_use_s, period_s, recovery_by_level, preferred_by_level,
        unit_density_by_level, inverse_imminence_s, horizon_s, now_s, min_dwell_s, used,
        preferred, preferred_density, imminence, pinned,
    )  # fmt: skip
    preferred_nbytes = preferred_nbytes_by_level
    if quality_weight_s:
        preferred_nbytes = np.empty((1, n), np.int64)
        weighted_preference(
            used, fallback_level, recovery_by_level, decode_s, use_probability, sensitivity,
            nbytes, allowed, quality_weight_s, preferred, preferred_density,
            preferred_nbytes[0],
        )  # fmt: skip
    usable = capacity_bytes - reserved_bytes
    budget = usable * unreserved_fraction
    hbm, hbm_nbytes = choose_hbm(
        hbm_tier, hbm_encoding, fallback_level, placed_at_s, demand, pinned, nbytes,
        full_nbytes, preferred, preferred_nbytes, preferred_nbytes.shape[0] > 1,
        preferred_density, hysteresis_multiple * per_byte_to_hbm_s, hbm_group_tiers,
        every_hbm, budget, now_s, min_dwell_s, 8,
    )  # fmt: skip
    density = chosen_density(
        hbm, hbm_nbytes, full_nbytes, used, fallback_level, recovery_by_level, decode_rate,
        use_probability, sensitivity, quality_weight_s,
    )  # fmt: skip
    fallback = choose_fallback(
        fallback_level, leased, regenerable, full_nbytes, imminence, host_tier, cxl_tier,
        host_group_tiers, cxl_group_tiers, every_host, every_cxl, per_byte_to_hbm_s,
        latency_to_hbm_s, link_gbps, hysteresis_multiple, usable, 8,
    )  # fmt: skip
    return (
        used, preferred, preferred_density, preferred_nbytes, imminence, pinned, budget, usable,
        hbm, fallback, density, np.zeros(n, np.bool_), np.zeros(n, np.bool_),
    )  # fmt: skip
