"""numpy's sum of a float64 array, bit for bit, in compiled code.

The quality budget's rounds are decided by the sum of every block's cost, and that sum has always
been numpy's (``np.add.reduce``: pairwise summation). ``pairwise_sum`` is numpy's algorithm
(``DOUBLE_pairwise_sum`` in numpy's ``loops_utils.h.src``, with the reduction's identity 0.0
added first) written out, so that the veto's compiled call and its Python resume
(``policy._veto_resume``) use one function and need not call back into Python for the sum.
``tests/unit/test_sum.py`` compares it with numpy's sum across sizes and values.

PERF: the veto summed through a numba object-mode block (numpy called back under the GIL) before;
compiled, the veto's rounds hold no GIL at all.
"""

from __future__ import annotations

import numpy as np

from policy._select import _inline, _jit

_BLOCK = 128  # numpy's PW_BLOCKSIZE: a block this long or shorter is summed without splitting
_DEPTH = 64  # stack frames: the halves shrink geometrically, so 64 covers any length


@_inline
def _block_sum(values: np.ndarray, start: int, count: int) -> float:
    """A leaf of numpy's recursion: below 8 items one running sum; else 8 running sums over
    the multiple of 8, combined as numpy combines them, then the rest added one by one."""
    if count < 8:
        total = 0.0
        for i in range(start, start + count):
            total += values[i]
        return total
    r0, r1, r2, r3 = values[start], values[start + 1], values[start + 2], values[start + 3]
    r4, r5, r6, r7 = values[start + 4], values[start + 5], values[start + 6], values[start + 7]
    end = start + count - count % 8
    for i in range(start + 8, end, 8):
        r0 += values[i]
        r1 += values[i + 1]
        r2 += values[i + 2]
        r3 += values[i + 3]
        r4 += values[i + 4]
        r5 += values[i + 5]
        r6 += values[i + 6]
        r7 += values[i + 7]
    total = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    for i in range(end, start + count):
        total += values[i]
    return float(total)  # (mypy: the array is untyped)


@_jit
def pairwise_sum(values: np.ndarray) -> float:
    """``float(np.add.reduce(values))`` of a 1-D float64 array, exactly: numpy's recursion
    (halves cut at a multiple of 8 until a block of at most 128), run on an explicit stack."""
    n = len(values)
    if n <= _BLOCK:
        return 0.0 + _block_sum(values, 0, n)
    # A frame is a range: ``halves[top]`` 1 while its left half is summed, 2 while its right
    # half is (its left half's sum in ``left[top]``).
    start = np.empty(_DEPTH, np.int64)
    count = np.empty(_DEPTH, np.int64)
    halves = np.empty(_DEPTH, np.int8)
    left = np.empty(_DEPTH)
    start[0], count[0] = 0, n
    top = 0
    total = 0.0  # the sum of the range just finished
    finished = False
    while True:
        if not finished:
            if count[top] <= _BLOCK:
                total = _block_sum(values, start[top], count[top])
                finished = True
            else:  # sum its left half first
                halves[top] = 1
                start[top + 1], count[top + 1] = start[top], _left_count(count[top])
                top += 1
            continue
        if top == 0:
            break
        top -= 1
        if halves[top] == 1:  # its left half is done: sum its right half
            left[top] = total
            halves[top] = 2
            half = _left_count(count[top])
            start[top + 1], count[top + 1] = start[top] + half, count[top] - half
            top += 1
            finished = False
        else:  # both halves done; this range is finished too
            total = left[top] + total
    return 0.0 + total


@_inline
def _left_count(count: int) -> int:
    """How many items of a range numpy sums as its left half: half, less its rest modulo 8."""
    half = count // 2
    return half - half % 8
