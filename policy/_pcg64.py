"""numpy's PCG64 generator, compiled: ``np.random.PCG64(seed).random_raw(count)`` in a kernel.

The co-activation sample (``policy._observe_kernels.sample_pairs``) is drawn from this raw
stream, seeded once a step. Drawn here, the step makes no numpy generator (a ``SeedSequence``
hash, the generator object and its draws: about 30 us warm, far more with numpy's code cold)
and the kernel that needs the stream makes it, without returning to Python for it.

Bit for bit numpy's: ``SeedSequence`` (a pool of four 32-bit words mixed from the seed's
words, then hashed out as the generator's 128-bit state and increment) and PCG64's XSL-RR
output of a 128-bit LCG, with 128-bit arithmetic on pairs of 64-bit words.
``tests/unit/test_policy_kernels.py`` checks both against numpy.
"""

from __future__ import annotations

import numpy as np

from policy._select import _inline, _jit

_LOW32 = np.uint64(0xFFFFFFFF)
_INIT_A, _MULT_A = np.uint64(0x43B0D7E5), np.uint64(0x931E8875)  # SeedSequence's constants
_INIT_B, _MULT_B = np.uint64(0x8B51F9DD), np.uint64(0x58F38DED)
_MIX_L, _MIX_R = np.uint64(0xCA01F9DD), np.uint64(0x4973F715)
_MULT_HI, _MULT_LO = np.uint64(2549297995355413924), np.uint64(4865540595714422341)  # PCG64's
_ZERO, _ONE = np.uint64(0), np.uint64(1)
_16, _32, _58, _63, _64 = np.uint64(16), np.uint64(32), np.uint64(58), np.uint64(63), np.uint64(64)


@_inline
def _hashed(
    value: np.uint64, hash_const: np.uint64, mult: np.uint64
) -> tuple[np.uint64, np.uint64]:
    """SeedSequence's hash of a 32-bit word; returns it and the next hash constant."""
    value = (value ^ hash_const) & _LOW32
    hash_const = (hash_const * mult) & _LOW32
    value = (value * hash_const) & _LOW32
    return value ^ (value >> _16), hash_const


@_jit
def seed_words(seed: int) -> np.ndarray:
    """``np.random.SeedSequence(seed).generate_state(4, np.uint64)`` for ``0 <= seed < 2**63``."""
    entropy = np.zeros(4, np.uint64)  # the seed's 32-bit words, then zeros: the pool's size
    entropy[0] = np.uint64(seed) & _LOW32
    entropy[1] = np.uint64(seed) >> _32
    pool = np.empty(4, np.uint64)
    hash_const = _INIT_A
    for i in range(4):
        pool[i], hash_const = _hashed(entropy[i], hash_const, _MULT_A)
    for source in range(4):
        for target in range(4):
            if source != target:
                value, hash_const = _hashed(pool[source], hash_const, _MULT_A)
                mixed = (_MIX_L * pool[target] - _MIX_R * value) & _LOW32
                pool[target] = mixed ^ (mixed >> _16)
    words = np.zeros(4, np.uint64)
    hash_const = _INIT_B
    for i in range(8):  # eight 32-bit words, two (low, then high) to each 64-bit one
        value, hash_const = _hashed(pool[i % 4], hash_const, _MULT_B)
        words[i // 2] |= value << np.uint64(32 * (i % 2))
    return words


@_inline
def _high_product(a: np.uint64, b: np.uint64) -> np.uint64:
    """The high 64 bits of the 128-bit product of ``a`` and ``b``."""
    a0, a1, b0, b1 = a & _LOW32, a >> _32, b & _LOW32, b >> _32
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    middle = (p00 >> _32) + (p01 & _LOW32) + (p10 & _LOW32)
    return p11 + (p01 >> _32) + (p10 >> _32) + (middle >> _32)


@_inline
def _lcg_step(
    high: np.uint64, low: np.uint64, inc_high: np.uint64, inc_low: np.uint64
) -> tuple[np.uint64, np.uint64]:
    """``state * multiplier + increment`` modulo 2**128, as (high, low) words."""
    product_high = _high_product(low, _MULT_LO) + high * _MULT_LO + low * _MULT_HI
    product_low = low * _MULT_LO
    new_low = product_low + inc_low
    return product_high + inc_high + (_ONE if new_low < product_low else _ZERO), new_low


@_jit
def pcg64_raw(seed: int, count: int) -> np.ndarray:
    """``np.random.PCG64(seed).random_raw(count)`` for ``0 <= seed < 2**63``."""
    words = seed_words(seed)  # state (high, low), then increment (high, low)
    inc_high = (words[2] << _ONE) | (words[3] >> _63)  # (increment << 1) | 1
    inc_low = (words[3] << _ONE) | _ONE
    high, low = _lcg_step(_ZERO, _ZERO, inc_high, inc_low)
    seeded_low = low + words[1]
    high = high + words[0] + (_ONE if seeded_low < low else _ZERO)
    high, low = _lcg_step(high, seeded_low, inc_high, inc_low)
    raw = np.empty(count, np.uint64)
    for k in range(count):
        high, low = _lcg_step(high, low, inc_high, inc_low)
        value, rotation = high ^ low, high >> _58  # XSL-RR: xor the halves, rotate right
        raw[k] = (value >> rotation) | (value << ((_64 - rotation) & _63))
    return raw
