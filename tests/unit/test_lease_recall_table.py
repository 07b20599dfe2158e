"""The lease table's recalls, without Ray: which leases the step sees, barriers, no extension,
and which of a plan's moves the controller holds back."""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from types import SimpleNamespace

import numpy as np

from actors.granting import LeaseService
from actors.leases import LeaseTable
from pool.blocks import BlockSpec, TensorSpec
from pool.encoding import FULL, Encoding

INT8 = Encoding.parse("int8")
COPY = ("m/x", "t/hbm0", FULL)


def test_recallable_leases_are_not_pins_for_the_policy_but_pin_the_copy():
    table = LeaseTable(ttl_s=10.0, generation="g")
    kept = table.grant("A", "m/x", "t/hbm0", FULL, epoch=3, now_s=0.0, recallable=True)
    table.grant("B", "m/y", "t/hbm0", FULL, epoch=4, now_s=0.0)
    assert table.pinned_blocks(now_s=1.0) == {"m/y"}
    assert table.leased_blocks(now_s=1.0) == {"m/x", "m/y"}
    assert table.pins(*COPY, now_s=1.0)
    assert table.live_on(COPY, now_s=1.0) == [kept]


def test_a_recall_bars_the_copy_and_stops_renewal_until_release_or_expiry():
    table = LeaseTable(ttl_s=10.0, generation="g")
    a = table.grant("A", "m/x", "t/hbm0", FULL, epoch=3, now_s=0.0, recallable=True)
    b = table.grant("B", "m/x", "t/hbm0", FULL, epoch=3, now_s=0.0, recallable=True)
    hard = table.grant("C", "m/x", "t/hbm0", INT8, epoch=5, now_s=0.0)
    assert table.renew(a, now_s=4.0).expires_s == 14.0
    assert {x.lease_id for x in table.recall(COPY, now_s=5.0)} == {a.lease_id, b.lease_id}
    assert table.recall(COPY, now_s=6.0) == []  # recalled once
    assert table.recall(("m/x", "t/hbm0", INT8), now_s=6.0) == []  # a hard pin is not recalled
    assert table.is_barred(COPY)
    assert table.recalls_of("A") == [a.lease_id] and table.recalls_of("C") == []
    # Renewal returns a recalled lease unchanged: it ends at its expiry at the latest.
    assert table.renew(a, now_s=7.0).expires_s == 14.0
    assert table.release([a]) == 1 and table.recalls_of("A") == []
    assert [x.lease_id for x in table.live_on(COPY, now_s=8.0)] == [b.lease_id]
    assert table.renew(b, now_s=11.0) is None  # expired (granted at 0, never extended)
    assert table.live_on(COPY, now_s=11.0) == [] and not table.pins(*COPY, now_s=11.0)
    assert table.recalled == set() and table.is_barred(COPY)
    assert table.lift(COPY) and not table.is_barred(COPY) and not table.lift(COPY)
    assert table.pins("m/x", "t/hbm0", INT8, now_s=8.0) and hard.lease_id in table.leases


def test_a_lease_presented_with_another_kind_is_refused():
    table = LeaseTable(ttl_s=10.0, generation="g")
    kept = table.grant("A", "m/x", "t/hbm0", FULL, epoch=3, now_s=0.0, recallable=True)
    forged = dataclasses.replace(kept, recallable=False)
    assert table.renew(forged, now_s=1.0) is None  # a holder cannot turn it into a hard pin
    assert table.release([forged]) == 0
    assert table.release([kept]) == 1 and table.by_copy == {}


class Recaller(LeaseService):
    """The controller's lease service over a real registry and lease table, with an executor
    that has only its busy set (the blocks whose chains run)."""

    def __init__(self, registry, table: LeaseTable, busy: set[str]) -> None:
        self.registry, self.leases = registry, table
        self.executor = SimpleNamespace(lock=threading.Lock(), busy=busy)
        self.lock = threading.RLock()
        self.grace_until_s = 0.0
        self.counters: Counter[str] = Counter()
        self.records: list[tuple[str, str, str]] = []

    def now(self) -> float:
        return 1.0

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] += n

    def record(self, kind: str, block_id: str, detail: str) -> None:
        self.records.append((kind, block_id, detail))


def test_moves_the_executor_would_find_leased_or_running_wait_for_the_next_step():
    # Four evictions of HBM copies planned from one snapshot: by the time the plan is handed
    # on, a plain lease was granted on block 0's copy, block 1's chain is still running, a
    # kept lease pins block 2's. Only block 3's eviction runs now, and only its copy is barred.
    from tests.unit.test_runtime_parts import entry, registry_with_model

    reg = registry_with_model()
    weight = TensorSpec("weight", "layers.0.weight", (64, 64), "float32")
    reg.add_model("n", [BlockSpec("n/layers.0", (weight,), layer=0)], "n1/hbm0")
    blocks = ["m/layers.0", "m/layers.1", "m/layers.2", "n/layers.0"]
    for epoch, block in enumerate(blocks):
        reg.add_copy(entry(block, "n1/hbm0", FULL, epoch + 1))
    table = LeaseTable(ttl_s=10.0, generation="g")
    table.grant("C", blocks[0], "n1/hbm0", FULL, epoch=1, now_s=0.5)
    kept = table.grant("A", blocks[2], "n1/hbm0", FULL, epoch=3, now_s=0.5, recallable=True)
    service = Recaller(reg, table, busy={blocks[1]})
    rows = SimpleNamespace(block=np.arange(4), target_encoding=np.full(4, -1))
    plan = SimpleNamespace(block_ids=blocks, transition_rows=rows)

    assert service.recall_for_plan(plan) == ({0, 1, 2}, [])
    assert table.recalled == {kept.lease_id}
    assert {key[0] for key in table.barred} == {blocks[2], blocks[3]}
    assert service.counters["transitions_held_for_recall"] == 1
    assert service.counters["transitions_held_for_lease_or_chain"] == 2
