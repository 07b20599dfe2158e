from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pool.encoding import Compression, Encoding, Precision
from pool.errors import IllegalTransitionError
from pool.states import (
    ALLOWED_TRANSITIONS,
    BlockState,
    Copy,
    CopyStatus,
    check_transition,
    derive_state,
)
from pool.tiers import TierKind

FULL = Encoding()
INT8 = Encoding(Precision.INT8)
INT8_ZSTD = Encoding(Precision.INT8, Compression.ZSTD)
STORE = Copy("disk", TierKind.STORAGE, FULL)


def hbm(encoding: Encoding, device: int = 0, status: CopyStatus = CopyStatus.READY) -> Copy:
    return Copy(f"hbm{device}", TierKind.HBM, encoding, status, device)


@pytest.mark.parametrize(
    ("copies", "regenerable", "device", "expected"),
    [
        ([STORE], False, None, BlockState.COLD),
        ([STORE, Copy("cxl", TierKind.CXL, FULL)], False, None, BlockState.COLD),
        ([STORE], True, None, BlockState.REGENERABLE),
        ([STORE, Copy("host", TierKind.HOST, INT8)], True, None, BlockState.WARM),
        ([STORE, hbm(FULL), hbm(INT8)], False, None, BlockState.PREMIUM),
        ([STORE, hbm(INT8)], False, None, BlockState.COMPACT),
        ([STORE, hbm(INT8_ZSTD)], False, None, BlockState.HOLDING),
        (
            [STORE, hbm(INT8_ZSTD), hbm(INT8, status=CopyStatus.IN_FLIGHT)],
            False,
            None,
            BlockState.PROMOTING,
        ),
        (
            [STORE, hbm(INT8), hbm(FULL, status=CopyStatus.IN_FLIGHT)],
            False,
            None,
            BlockState.COMPACT,
        ),
        (
            [STORE, Copy("host", TierKind.HOST, FULL, CopyStatus.IN_FLIGHT)],
            False,
            None,
            BlockState.COLD,
        ),
        # Device 1 sees device 0's copy as a peer: WARM; device 0 sees it as its own: PREMIUM.
        ([STORE, hbm(FULL, device=0)], False, 1, BlockState.WARM),
        ([STORE, hbm(FULL, device=0)], False, 0, BlockState.PREMIUM),
        ([STORE, hbm(FULL, device=0, status=CopyStatus.IN_FLIGHT)], False, 1, BlockState.COLD),
    ],
)
def test_derive_state(copies, regenerable, device, expected) -> None:
    assert derive_state(copies, regenerable=regenerable, device=device) is expected


def test_check_transition_refuses_skipping_promoting() -> None:
    check_transition("m/b", BlockState.COLD, BlockState.PROMOTING)
    check_transition("m/b", BlockState.PROMOTING, BlockState.PREMIUM)
    check_transition("m/b", BlockState.WARM, BlockState.WARM)
    with pytest.raises(IllegalTransitionError, match=r"'m/b': transition cold -> premium") as info:
        check_transition("m/b", BlockState.COLD, BlockState.PREMIUM)
    assert "'promoting'" in str(info.value) and "'warm'" in str(info.value)
    with pytest.raises(IllegalTransitionError):
        check_transition("m/b", BlockState.HOLDING, BlockState.COMPACT)


def _reachable(start: BlockState) -> set[BlockState]:
    seen, frontier = {start}, [start]
    while frontier:
        state = frontier.pop()
        for a, b in ALLOWED_TRANSITIONS:
            if a is state and b not in seen:
                seen.add(b)
                frontier.append(b)
    return seen


def test_every_state_reaches_hbm_and_can_be_evicted_to_cold() -> None:
    for state in BlockState:
        reachable = _reachable(state)
        assert {BlockState.PREMIUM, BlockState.COMPACT, BlockState.COLD} <= reachable, state
    assert BlockState.PROMOTING in _reachable(BlockState.COLD)
    # No state reaches usable HBM from outside HBM except through PROMOTING.
    outside = {BlockState.WARM, BlockState.COLD, BlockState.REGENERABLE, BlockState.HOLDING}
    for a, b in ALLOWED_TRANSITIONS:
        if a in outside:
            assert b not in {BlockState.PREMIUM, BlockState.COMPACT}, (a, b)


def test_dropping_the_full_copy_for_one_in_flight_is_refused() -> None:
    copies = [STORE, hbm(FULL), hbm(INT8, status=CopyStatus.IN_FLIGHT)]
    before = derive_state(copies, device=0)
    after = derive_state([c for c in copies if c != hbm(FULL)], device=0)
    assert (before, after) == (BlockState.PREMIUM, BlockState.PROMOTING)
    with pytest.raises(IllegalTransitionError):
        check_transition("m/b", before, after)


# -- the table agrees with the copy protocol the registry follows --------------------------------
# Protocol: a copy bound for local HBM is announced IN_FLIGHT before it lands; while one is in
# flight, a ready full-precision HBM copy stays (reduced ones may go to make room); the storage
# copy is never removed.

ENCODINGS = [FULL, INT8, INT8_ZSTD, Encoding(Precision.INT4)]
OTHER_TIERS = [TierKind.HOST, TierKind.CXL, TierKind.HBM]  # HBM on device 1: a peer of device 0


@st.composite
def operations(draw):
    return draw(
        st.lists(
            st.tuples(
                st.sampled_from(["announce", "land", "cancel", "evict", "add-other", "regen"]),
                st.sampled_from(ENCODINGS),
                st.sampled_from(OTHER_TIERS),
                st.integers(0, 7),
            ),
            max_size=30,
        )
    )


def _other(kind: TierKind, encoding: Encoding) -> Copy:
    return Copy(kind.value, kind, encoding, CopyStatus.READY, 1 if kind is TierKind.HBM else None)


@settings(max_examples=300, deadline=None)
@given(operations())
def test_protocol_operations_only_make_allowed_transitions(ops) -> None:
    copies, regen = [STORE], False
    state = derive_state(copies, device=0)
    for op, encoding, kind, pick in ops:
        in_flight = [c for c in copies if c.status is CopyStatus.IN_FLIGHT]
        ready = [c for c in copies if c is not STORE and c.status is CopyStatus.READY]
        if op == "announce":
            copies.append(hbm(encoding, status=CopyStatus.IN_FLIGHT))
        elif op == "land" and in_flight:
            target = in_flight[pick % len(in_flight)]
            copies[copies.index(target)] = hbm(target.encoding)
        elif op == "cancel" and in_flight:
            copies.remove(in_flight[pick % len(in_flight)])
        elif op == "evict" and ready:
            victim = ready[pick % len(ready)]
            full_in_hbm = (
                victim.tier_kind is TierKind.HBM and victim.device == 0 and victim.encoding == FULL
            )
            if not (in_flight and full_in_hbm):
                copies.remove(victim)
        elif op == "add-other":
            copies.append(_other(kind, encoding))
        elif op == "regen":
            regen = not regen
        new = derive_state(copies, regenerable=regen, device=0)
        check_transition("m/b", state, new)
        state = new


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(ENCODINGS), st.booleans(), st.sampled_from([TierKind.HOST, TierKind.CXL]))
def test_unannounced_arrival_in_hbm_is_refused(encoding, regen, other) -> None:
    copies = [STORE, _other(other, FULL)]
    before = derive_state(copies, regenerable=regen, device=0)
    after = derive_state([*copies, hbm(encoding)], regenerable=regen, device=0)
    with pytest.raises(IllegalTransitionError):
        check_transition("m/b", before, after)


def test_the_schedules_table_of_state_changes_agrees_with_check_transition() -> None:
    # policy.schedule checks a step's state changes against a table made from
    # ALLOWED_TRANSITIONS; every change it lets through must pass check_transition, every one it
    # refuses must raise (directly, or through PROMOTING where the change goes through it).
    from policy.plan import STATE_CODES
    from policy.schedule import _ALLOWED_CHANGES

    def passes(*path: BlockState) -> bool:
        try:
            for old, new in itertools.pairwise(path):
                check_transition("b", old, new)
        except IllegalTransitionError:
            return False
        return True

    refused = 0
    for i, a in enumerate(STATE_CODES):
        for j, z in enumerate(STATE_CODES):
            assert _ALLOWED_CHANGES[i, j, 0] == passes(a, z)
            assert _ALLOWED_CHANGES[i, j, 1] == passes(a, BlockState.PROMOTING, z)
            refused += int(not _ALLOWED_CHANGES[i, j, 0]) + int(not _ALLOWED_CHANGES[i, j, 1])
    assert refused > 0  # the table refuses some changes (PREMIUM -> PROMOTING among them)
    premium, promoting = (
        STATE_CODES.index(BlockState.PREMIUM),
        STATE_CODES.index(BlockState.PROMOTING),
    )
    assert not _ALLOWED_CHANGES[premium, promoting, 0]
