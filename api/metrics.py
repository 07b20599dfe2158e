"""Prometheus exposition of a pool (``GET /metrics`` of the admin API).

A custom collector in a :class:`CollectorRegistry` of its own (not the process-global one) asks
the controller for its overview on every scrape, so values are never older than the scrape.
Families (labels in brackets; no block id is ever a label, to keep cardinality bounded by tiers,
states, rules and links):

- ``weightpool_up``: 1 if the controller answered this scrape (every other family is absent if 0)
- ``weightpool_tier_capacity_bytes`` / ``_used_bytes`` / ``_copies`` / ``_alive`` / ``_draining``
  [tier, kind, node, emulated]
- ``weightpool_blocks`` [state]: blocks per state, every state present
- ``weightpool_transitions_total`` [to_state]: executed transitions
- ``weightpool_vetoes_total`` [rule]: transitions the accuracy veto rejected, every rule present
- ``weightpool_lease_hits_total`` / ``weightpool_lease_misses_total`` [path]: ``client_cache``
  (served in-process by a client's lease cache, as clients report) and ``acquire`` (an acquire
  the controller served from a resident copy, or had to promote)
- ``weightpool_stall_seconds_total``: compute time spent waiting for weights, as clients report
- ``weightpool_moved_bytes_total`` [src, dst]: bytes moved per link (tier kinds; ``peer``)
- ``weightpool_transfers_total``, ``weightpool_drops_total``, ``weightpool_leases``,
  ``weightpool_lease_fenced_total``, ``weightpool_errors_total`` [kind], ``weightpool_steps_total``,
  ``weightpool_step_seconds_total``, ``weightpool_phase_seconds_total`` [phase],
  ``weightpool_quality_cost``, ``weightpool_quality_budget``, ``weightpool_pins``,
  ``weightpool_drains``, ``weightpool_models``
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from actors.admin_views import Overview
from pool.states import BlockState

CONTENT_TYPE = CONTENT_TYPE_LATEST
ERROR_COUNTERS = {
    "step_errors": "step",
    "execute_errors": "execute",
    "tier_faults": "tier_fault",
    "lease_violations": "lease_violation",
}


class PoolCollector:
    """Reads the pool's overview with ``fetch`` (None: the pool did not answer) on collect."""

    def __init__(self, fetch: Callable[[], Overview | None]):
        self.fetch = fetch

    def collect(self) -> Iterator[Metric]:
        overview = self.fetch()
        up = GaugeMetricFamily("weightpool_up", "1 if the pool's controller answered this scrape")
        up.add_metric([], 0.0 if overview is None else 1.0)
        yield up
        if overview is not None:
            yield from _tiers(overview)
            yield from _blocks(overview)
            yield from _counters(overview)


def _tiers(o: Overview) -> Iterator[Metric]:
    labels = ["tier", "kind", "node", "emulated"]
    capacity = GaugeMetricFamily(
        "weightpool_tier_capacity_bytes",
        "capacity of the tier (unbounded tiers absent)",
        labels=labels,
    )
    used = GaugeMetricFamily(
        "weightpool_tier_used_bytes", "bytes held, as the tier actor accounts them", labels=labels
    )
    copies = GaugeMetricFamily("weightpool_tier_copies", "copies held by the tier", labels=labels)
    alive = GaugeMetricFamily("weightpool_tier_alive", "1 if the tier actor answers", labels=labels)
    draining = GaugeMetricFamily(
        "weightpool_tier_draining", "1 while a drain goal is set on the tier", labels=labels
    )
    for t in o.tiers:
        values = [t.tier_id, t.kind, t.node_id, str(t.emulated).lower()]
        if t.capacity_bytes is not None:
            capacity.add_metric(values, t.capacity_bytes)
        if t.used_bytes is not None:
            used.add_metric(values, t.used_bytes)
        if t.copies is not None:
            copies.add_metric(values, t.copies)
        alive.add_metric(values, float(t.alive))
        draining.add_metric(values, float(t.draining))
    yield from (capacity, used, copies, alive, draining)


def _blocks(o: Overview) -> Iterator[Metric]:
    blocks = GaugeMetricFamily("weightpool_blocks", "blocks per state", labels=["state"])
    for state in BlockState:
        blocks.add_metric([state.value], o.states.get(state.value, 0))
    yield blocks
    for name, doc, value in (
        ("weightpool_leases", "live leases", o.leases),
        ("weightpool_pins", "pin goals set", o.pins),
        ("weightpool_drains", "drain goals set", o.drains),
        ("weightpool_models", "registered models", len(o.models)),
        ("weightpool_quality_budget", "the policy's quality budget", o.quality_budget),
    ):
        gauge = GaugeMetricFamily(name, doc)
        gauge.add_metric([], value)
        yield gauge
    if o.quality_cost is not None:
        cost = GaugeMetricFamily(
            "weightpool_quality_cost", "predicted quality cost of the last step's placement"
        )
        cost.add_metric([], o.quality_cost)
        yield cost


def _counters(o: Overview) -> Iterator[Metric]:
    c = o.counters
    transitions = CounterMetricFamily(
        "weightpool_transitions", "executed transitions, by the state reached", labels=["to_state"]
    )
    for state in BlockState:
        transitions.add_metric([state.value], c.get(f"transition:{state.value}", 0))
    vetoes = CounterMetricFamily(
        "weightpool_vetoes", "transitions the accuracy veto rejected, by rule", labels=["rule"]
    )
    for rule in o.rules:
        vetoes.add_metric([rule], c.get(f"veto:{rule}", 0))
    hits = CounterMetricFamily(
        "weightpool_lease_hits", "reads served from a resident copy", labels=["path"]
    )
    hits.add_metric(["client_cache"], c.get("cache_hits", 0))
    hits.add_metric(["acquire"], c.get("lease_grants_resident", 0))
    misses = CounterMetricFamily(
        "weightpool_lease_misses", "reads that found no resident copy", labels=["path"]
    )
    misses.add_metric(["client_cache"], c.get("cache_misses", 0))
    misses.add_metric(["acquire"], c.get("lease_misses", 0))
    moved = CounterMetricFamily(
        "weightpool_moved_bytes", "bytes moved, per link", labels=["src", "dst"]
    )
    for key, value in sorted(c.items()):
        if key.startswith("bytes:") and "->" in key:
            src, dst = key[len("bytes:") :].split("->", 1)
            moved.add_metric([src, dst], value)
    errors = CounterMetricFamily("weightpool_errors", "failures, by kind", labels=["kind"])
    for key, kind in ERROR_COUNTERS.items():
        errors.add_metric([kind], c.get(key, 0))
    phases = CounterMetricFamily(
        "weightpool_phase_seconds", "time in each phase of the control step", labels=["phase"]
    )
    for key, value in sorted(c.items()):
        if key.startswith("phase_us:"):
            phases.add_metric([key[len("phase_us:") :]], value / 1e6)
    yield from (transitions, vetoes, hits, misses, moved, errors, phases)
    for name, doc, value in (
        ("weightpool_stall_seconds", "compute time spent waiting for weights", "stall_us"),
        ("weightpool_step_seconds", "time in control steps (whole step)", "step_us"),
    ):
        seconds = CounterMetricFamily(name, doc)
        seconds.add_metric([], c.get(value, 0) / 1e6)
        yield seconds
    for name, doc, key in (
        ("weightpool_steps", "control steps run", "steps"),
        ("weightpool_transfers", "copies made by transfers", "transfers"),
        ("weightpool_drops", "copies dropped", "drops"),
        ("weightpool_lease_fenced", "lease renewals refused (stale epoch)", "lease_fenced"),
    ):
        counter = CounterMetricFamily(name, doc)
        counter.add_metric([], c.get(key, 0))
        yield counter


def metrics_registry(fetch: Callable[[], Overview | None]) -> CollectorRegistry:
    """A registry of its own holding one :class:`PoolCollector` (nothing is fetched here)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(fetch))  # type: ignore[arg-type]
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition (blocking: the collector calls the controller)."""
    return generate_latest(registry)


def parse_metrics(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Prometheus text, parsed by prometheus_client: sample name -> sorted labels -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples
