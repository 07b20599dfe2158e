"""The lease table's recalls, without Ray: which leases the step sees, barriers, no extension."""

from __future__ import annotations

import dataclasses

from actors.leases import LeaseTable
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
