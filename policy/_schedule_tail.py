"""The schedule phase's last kernels, called in turn from one compiled function.

``finish`` runs ``admit``, ``link_budgets``, ``resolve``, ``transitions`` and ``transfer_rows``
(``policy._admit_kernels``, ``policy._link_kernels``) on the candidate actions, as
``policy.schedule.schedule`` called them one by one from Python. The kernels are unchanged; the
masks they hand each other stay in compiled code.

PERF: each return from a kernel to Python found the interpreter's data evicted by the kernel
before (a million-byte pass evicts a 2 MB L2): in the step at 16,384 blocks these five calls on
25 actions took about 75 us, against 26 us alone and warm (``bench/policy_kernels.py``).
"""

from __future__ import annotations

import numpy as np

from policy._admit_kernels import admit, transfer_rows, transitions
from policy._link_kernels import link_budgets, resolve
from policy._select import _jit


@_jit
def finish(
    block: np.ndarray,
    kind: np.ndarray,
    src: np.ndarray,
    dst: np.ndarray,
    encoding: np.ndarray,
    cls: np.ndarray,
    deadline: np.ndarray,
    nbytes: np.ndarray,
    shrink: np.ndarray,
    required_up: np.ndarray,
    held: np.ndarray,
    within_reach: np.ndarray,
    cancelled: np.ndarray,
    occupancy: np.ndarray,
    usable_bytes: np.ndarray,
    hbm_encoding: np.ndarray,
    target_hbm: np.ndarray,
    in_flight: np.ndarray,
    fallback_level: np.ndarray,
    target_fallback: np.ndarray,
    regenerable: np.ndarray,
    demand: np.ndarray,
    vetoed_out: np.ndarray,
    hbm_tier: np.ndarray,
    host_tier: np.ndarray,
    cxl_tier: np.ndarray,
    storage_tier: int,
    block_nbytes: np.ndarray,
    usable: np.ndarray,
    full_precision: np.ndarray,
    codes: np.ndarray,
    link_gbps: np.ndarray,
    busy_fraction: np.ndarray,
    tick_s: float,
    demotion_busy_fraction: float,
    now_s: float,
    max_transitions: int,
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...], int]:
    """The tick's transitions (``transitions``' columns, the states seen last) and transfers
    (``transfer_rows``' columns), and how many transfers wait for a later tick (of those
    considered). ``occupancy`` is updated in place, as ``admit`` does."""
    fits, spilled = admit(
        block, kind, dst, encoding, cls, deadline, shrink, required_up, held, within_reach,
        occupancy, usable_bytes, hbm_encoding, hbm_tier, host_tier, cxl_tier, block_nbytes,
        max_transitions,
    )  # fmt: skip
    on_links = link_budgets(
        src, dst, cls, deadline, nbytes, kind, fits, link_gbps, busy_fraction, tick_s,
        demotion_busy_fraction, now_s,
    )  # fmt: skip
    issued, kinds, moving, deferred = resolve(kind, on_links, spilled, required_up, held)
    records = transitions(
        block, kinds, issued, spilled, cancelled, hbm_encoding, target_hbm, in_flight,
        fallback_level, target_fallback, regenerable, demand, vetoed_out, block_nbytes, usable,
        full_precision, codes,
    )  # fmt: skip
    transfers = transfer_rows(
        moving, block, src, dst, encoding, nbytes, cls, deadline, hbm_tier, host_tier, cxl_tier,
        storage_tier,
    )  # fmt: skip
    return records, transfers, deferred
