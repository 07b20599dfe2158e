"""Compiled kernels of the predict phase (``policy.predict``).

They evaluate the numpy expressions they replaced in the same order of operations. Powers are
numpy's: numpy evaluates ``**`` with its own vectorized routine, whose last bit can differ from
the C library's ``pow`` that compiled code calls, and plans must not change. Where that routine
is SVML's ``__svml_pow8_ha`` (AVX-512), ``use_probability`` calls it (``_pow8``); elsewhere
the powers run in numpy between ``shrunk_popularity``, ``widened`` and ``expert_probability``.
"""

from __future__ import annotations

import ctypes
import importlib
from collections.abc import Callable
from typing import Any, cast

import llvmlite.binding as llvm  # type: ignore[import-untyped]
import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils
from numba.extending import intrinsic

from policy._select import _inline, _jit
from policy.snapshot import NONE


def _numpy_pow8() -> bool:
    """Whether numpy evaluates float64 ``**`` with SVML's ``__svml_pow8_ha`` (its AVX-512
    dispatch, SVML linked in: its extension module exports the function) and compiled code can
    call that function (numba targets this CPU, which has AVX-512, and passes 8-double vectors
    in its registers): then registers the function for ``_pow8`` and checks one call of it
    against numpy's ``**``."""
    try:
        umath = importlib.import_module("numpy._core._multiarray_umath")
        if not umath.__cpu_features__.get("AVX512_SKX"):
            return False
        address = ctypes.cast(ctypes.CDLL(umath.__file__).__svml_pow8_ha, ctypes.c_void_p).value
    except (ImportError, OSError, AttributeError):
        return False
    host = llvm.get_host_cpu_features()
    config = cast(Any, numba).config  # numba's code for another CPU, or without AVX: no zmm
    if config.CPU_NAME or config.CPU_FEATURES or not config.ENABLE_AVX:
        return False
    if not address or not host.get("avx512f"):
        return False
    llvm.add_symbol("__svml_pow8_ha", address)
    base = np.linspace(0.0, 1.75, 8)
    exponent = np.linspace(0.25, 4.0, 8)
    return bool(np.array_equal(_pow8_of(base, exponent), base**exponent))  # the calls agree


def _pow8_codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
    vector = ir.VectorType(ir.DoubleType(), 8)
    pointer = vector.as_pointer()
    function = cast(Any, cgutils).get_or_insert_function(
        builder.module, ir.FunctionType(vector, [vector, vector]), "__svml_pow8_ha"
    )
    data = [
        builder.gep(context.make_array(kind)(context, builder, value).data, [args[3]])
        for kind, value in zip(signature.args[:3], args[:3], strict=True)
    ]
    base = builder.load(builder.bitcast(data[0], pointer), align=8)
    exponent = builder.load(builder.bitcast(data[1], pointer), align=8)
    result = builder.call(function, [base, exponent])
    builder.store(result, builder.bitcast(data[2], pointer), align=8)
    return context.get_dummy_value()


def _pow8_typing(typing_context: Any, base: Any, exponent: Any, out: Any, at: Any) -> Any:
    return numba.types.none(base, exponent, out, at), _pow8_codegen


# ``out[at:at + 8] = base[at:at + 8] ** exponent[at:at + 8]`` as numpy computes it (float64 C
# arrays, unchecked bounds); only where ``NUMPY_POW8``.
_pow8 = cast(Callable[[np.ndarray, np.ndarray, np.ndarray, int], None], intrinsic(_pow8_typing))


@_jit
def _pow8_of(base: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """``base ** exponent`` of eight values by ``_pow8``."""
    out = np.empty(8)
    _pow8(base, exponent, out, 0)
    return out


# PERF: numpy's own vector power (the same function, so the same bits: checked against numpy's
# ``**`` in tests/unit/test_predict_pow8.py), called from a kernel: the powers' operands and
# results stay in a run's scratch instead of six arrays over every expert between four calls.
NUMPY_POW8 = _numpy_pow8()


@_inline
def _remainder(a: float, b: float) -> float:
    """``np.mod(a, b)`` for ``b != 0``: ``fmod``, moved to the sign of ``b`` (numpy's
    ``npy_divmod``)."""
    mod: float = np.fmod(a, b)
    if mod != 0.0:
        if (b < 0) != (mod < 0):
            mod += b
    else:
        mod = np.copysign(0.0, b)
    return mod


@_jit
def block_times(
    layer_time_s: np.ndarray,
    period_s: np.ndarray,
    current_position: np.ndarray,
    concurrency: np.ndarray,
    model: np.ndarray,
    position: np.ndarray,
    idle_use_probability: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block: time until its position is next visited (``period_s`` of its model, at
    least 1e-12, for an idle model), and p(use) before expert evidence (1 for a running
    model, ``idle_use_probability`` for an idle one); and per model, whether it runs.

    PERF: the positions' start times and times until their next visit here too: seven numpy
    calls before, 12 us a step warm, several times that in the step, where numpy's code is
    cold (lockstep with the base tree, with ``fold_times``: predict phase x0.67 at 1,000
    blocks, x0.88 at 16,384)."""
    m, p = layer_time_s.shape
    active = np.empty(m, np.bool_)
    until = np.empty((m, p))
    for i in range(m):
        active[i] = current_position[i] != NONE and concurrency[i] > 0
        running = 0.0
        for j in range(p):  # the start of each position: np.cumsum(lt, axis=1) - lt
            running = layer_time_s[i, 0] if j == 0 else running + layer_time_s[i, j]
            until[i, j] = running - layer_time_s[i, j]
        origin = until[i, max(current_position[i], 0)]
        for j in range(p):
            since = until[i, j] - origin
            until[i, j] = _remainder(since, period_s[i]) if active[i] else period_s[i]
    n = len(model)
    time_to_next = np.empty(n)
    probability = np.empty(n)
    for r in range(n):
        time_to_next[r] = until[model[r], position[r]]
        probability[r] = 1.0 if active[model[r]] else idle_use_probability
    return time_to_next, probability, active


@_inline
def _shrunk_run(
    start: int,
    end: int,
    model: np.ndarray,
    layer: np.ndarray,
    flat: np.ndarray,
    layer_visits: np.ndarray,
    unvisited_weight: np.ndarray,
    layer_sum: np.ndarray,
    flat_popularity: np.ndarray,
    n_experts: int,
    observed_concurrency: np.ndarray,
    decay: float,
    prior_visits: float,
    base: np.ndarray,
    exponent: np.ndarray,
    at: int,
) -> None:
    """``shrunk_popularity`` of the run of experts ``start:end``, written from ``at``."""
    m, layer_r = model[start], layer[start]
    weight = 1.0 - unvisited_weight[m, layer_r]
    floor = weight if weight >= 1e-12 or np.isnan(weight) else 1e-12  # np.maximum
    prior = prior_visits * (layer_sum[m, layer_r] / n_experts / floor)  # of the layer's mean
    evidence = weight / decay  # the effective number of visits behind the average
    total = evidence + prior_visits
    visited = layer_visits[m, layer_r] > 0
    inverse = 1 / observed_concurrency[m]
    offset = flat[start]
    for k in range(end - start):
        pop = flat_popularity[offset + k] / floor if visited else 0.0
        pop = (evidence * pop + prior) / total
        pop = 1.0 if pop > 1.0 else pop  # np.minimum(pop, 1.0): NaN stays NaN
        base[at + k] = 1 - pop
        exponent[at + k] = inverse


@_inline
def _probability_run(
    start: int,
    end: int,
    powered: np.ndarray,
    at: int,
    rows: np.ndarray,
    model: np.ndarray,
    layer: np.ndarray,
    expert: np.ndarray,
    flat: np.ndarray,
    chosen_last: np.ndarray,
    persistence: np.ndarray,
    follow_layer: np.ndarray,
    follow: np.ndarray,
    active: np.ndarray,
    idle_use_probability: float,
    threshold: float,
    probability: np.ndarray,
    predicted: np.ndarray,
) -> None:
    """``expert_probability`` of the run of experts ``start:end``, ``powered`` read from
    ``at``."""
    m = model[start]
    other = persistence[m]
    follows = layer[start] == follow_layer[m]
    running = active[m]
    row, cell, index = rows[start], flat[start], expert[start]
    for k in range(end - start):
        p = 1 - powered[at + k]
        if chosen_last[cell + k]:
            p = p if p >= other or np.isnan(p) else other  # np.maximum
        if follows:
            after = follow[m, index + k]
            p = p if p >= after or np.isnan(p) else after
        value = p if running else idle_use_probability * p
        probability[row + k] = value
        predicted[cell + k] = value >= threshold


@_jit
def shrunk_popularity(
    runs: np.ndarray,
    model: np.ndarray,
    layer: np.ndarray,
    flat: np.ndarray,
    layer_visits: np.ndarray,
    unvisited_weight: np.ndarray,
    layer_sum: np.ndarray,
    popularity: np.ndarray,
    observed_concurrency: np.ndarray,
    decay: float,
    prior_visits: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Per expert: ``1 - pop`` and ``1 / observed concurrency``, where ``pop`` is its decayed
    popularity corrected for the weight accumulated so far (``1 - unvisited_weight``, per
    layer) and shrunk toward its layer's mean (``layer_sum`` over its experts, corrected
    likewise; see ``policy.predict.predict``). ``runs``: ``Static.expert_runs``.

    PERF: the layers' weights and means here too (four numpy calls before). A run's divisors,
    prior share and exponent once, not once an expert: two divisions an expert, four before
    (16,384 blocks, captured inputs, trees alternating: 0.119 -> 0.098 ms), and per expert
    only its own cells, read in order along a run (0.098 -> 0.036 ms; with ``expert_probability``
    likewise, policy_ab: predict phase 0.70 -> 0.55 ms, step x0.953 at 16,384 blocks; 30.3 ->
    23.3 ms, step x0.965 at a million)."""
    n_experts = popularity.shape[2]
    flat_popularity = popularity.reshape(-1)
    n = len(flat)
    base = np.empty(n)
    exponent = np.empty(n)
    for r in range(len(runs) - 1):
        _shrunk_run(
            runs[r], runs[r + 1], model, layer, flat, layer_visits, unvisited_weight, layer_sum,
            flat_popularity, n_experts, observed_concurrency, decay, prior_visits, base,
            exponent, runs[r],
        )  # fmt: skip
    return base, exponent


@_jit
def widened(
    powered: np.ndarray, model: np.ndarray, concurrency: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per expert: ``1 - per_sequence`` (``per_sequence = 1 - powered``) and the concurrency now
    (at least 1), as the base and exponent of the next power."""
    n = len(powered)
    base = np.empty(n)
    exponent = np.empty(n)
    for j in range(n):
        per_sequence = 1 - powered[j]
        base[j] = 1 - per_sequence
        exponent[j] = float(max(concurrency[model[j]], 1))
    return base, exponent


@_jit
def expert_probability(
    powered: np.ndarray,
    runs: np.ndarray,
    rows: np.ndarray,
    model: np.ndarray,
    layer: np.ndarray,
    expert: np.ndarray,
    flat: np.ndarray,
    chosen_last: np.ndarray,
    persistence: np.ndarray,
    follow_layer: np.ndarray,
    follow: np.ndarray,
    active: np.ndarray,
    idle_use_probability: float,
    threshold: float,
    probability: np.ndarray,
    predicted: np.ndarray,
) -> None:
    """Per expert: p(use) from ``1 - powered``, raised to its model's persistence if it was
    chosen at its layer's last visit and to its co-activation probability if its layer is the
    one after the current one (``follow_layer`` per model, -1 for none); written into
    ``probability`` (damped for an idle model) and the predicted set. ``runs``:
    ``Static.expert_runs``.

    PERF: by run, its model's and layer's terms once (16,384 blocks, captured inputs, trees
    alternating: 0.074 -> 0.043 ms; see ``shrunk_popularity`` for the step). ``widened`` by run
    was slower (0.025 -> 0.029 ms)."""
    for r in range(len(runs) - 1):
        _probability_run(
            runs[r], runs[r + 1], powered, runs[r], rows, model, layer, expert, flat,
            chosen_last, persistence, follow_layer, follow, active, idle_use_probability,
            threshold, probability, predicted,
        )  # fmt: skip


@_jit
def coactivation_follow(
    chosen_last: np.ndarray,
    base: int,
    pairs: np.ndarray,
    given: np.ndarray,
    layer: int,
    out: np.ndarray,
) -> bool:
    """P(expert f at ``layer + 1`` | the experts chosen at the last visit of ``layer``, those of
    ``chosen_last[base:]`` seen before there), averaged over them, into ``out[:f]`` (one
    model's co-activation ``pairs`` and ``given``); False, ``out`` untouched, when there are
    none. As numpy's ``np.minimum(pairs[layer, chosen] / given[:, None], 1.0).mean(axis=0)``:
    summed over the chosen experts in order, then divided by their number."""
    count = 0
    for e in range(pairs.shape[1]):
        count += int(chosen_last[base + e] and given[layer, e] > 0)
    if count == 0:
        return False
    first = True
    for e in range(pairs.shape[1]):
        if not (chosen_last[base + e] and given[layer, e] > 0):
            continue
        seen = given[layer, e]
        for f in range(pairs.shape[2]):
            ratio = pairs[layer, e, f] / seen
            ratio = ratio if ratio <= 1.0 or np.isnan(ratio) else 1.0  # np.minimum
            out[f] = ratio if first else out[f] + ratio
        first = False
    for f in range(pairs.shape[2]):
        out[f] = out[f] / count
    return True


@_jit
def use_probability(
    runs: np.ndarray,
    rows: np.ndarray,
    model: np.ndarray,
    layer: np.ndarray,
    expert: np.ndarray,
    flat: np.ndarray,
    layer_visits: np.ndarray,
    unvisited_weight: np.ndarray,
    layer_sum: np.ndarray,
    popularity: np.ndarray,
    observed_concurrency: np.ndarray,
    concurrency: np.ndarray,
    decay: float,
    prior_visits: float,
    chosen_last: np.ndarray,
    persistence: np.ndarray,
    follow_layer: np.ndarray,
    follow: np.ndarray,
    active: np.ndarray,
    idle_use_probability: float,
    threshold: float,
    probability: np.ndarray,
    predicted: np.ndarray,
) -> None:
    """``shrunk_popularity``, numpy's power, ``widened``, numpy's power and
    ``expert_probability`` (their arguments, the same arithmetic) a run at a time, the powers
    by ``_pow8`` over the run's scratch. Only where ``NUMPY_POW8``.

    PERF: one pass over the experts, no array over all of them but ``probability``; three
    kernels and two numpy powers before, six such arrays between them (policy_ab against
    b6b43fd, loaded machine: 16,384 blocks step x0.955; a million x0.955, predict 35.5 -> 25.7
    ms)."""
    n_experts = popularity.shape[2]
    flat_popularity = popularity.reshape(-1)
    longest = 0
    for r in range(len(runs) - 1):
        longest = max(longest, runs[r + 1] - runs[r])
    lanes = (longest + 7) // 8 * 8
    base = np.ones(lanes)
    exponent = np.ones(lanes)
    powered = np.empty(lanes)
    for r in range(len(runs) - 1):
        start, end = runs[r], runs[r + 1]
        count = end - start
        m = model[start]
        _shrunk_run(
            start, end, model, layer, flat, layer_visits, unvisited_weight, layer_sum,
            flat_popularity, n_experts, observed_concurrency, decay, prior_visits, base,
            exponent, 0,
        )  # fmt: skip
        for k in range(count, (count + 7) // 8 * 8):  # lanes past the run: any operands
            base[k] = 1.0
            exponent[k] = 1.0
        for k in range(0, count, 8):
            _pow8(base, exponent, powered, k)
        now = float(max(concurrency[m], 1))  # widened
        for k in range(count):
            per_sequence = 1 - powered[k]
            base[k] = 1 - per_sequence
            exponent[k] = now
        for k in range(0, count, 8):
            _pow8(base, exponent, powered, k)
        _probability_run(
            start, end, powered, 0, rows, model, layer, expert, flat, chosen_last,
            persistence, follow_layer, follow, active, idle_use_probability, threshold,
            probability, predicted,
        )  # fmt: skip
