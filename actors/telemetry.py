"""Telemetry as clients batch it to the controller, and its folding into the policy's arrays.

Pure (no Ray). A client appends events to a :class:`TelemetryBatch` and sends the batch every few
milliseconds; the controller folds batches into a :class:`TelemetryBuffer` and, at each step,
turns what arrived since the last step into a :class:`policy.snapshot.Telemetry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from policy.snapshot import NONE, Telemetry


@dataclass
class TelemetryBatch:
    """Events from one client since its last flush. Layer is the model's layer index."""

    holder: str
    layer_times: list[tuple[str, int, float]] = field(default_factory=list)  # model, layer, s
    routes: list[tuple[str, int, int, tuple[int, ...]]] = field(default_factory=list)
    positions: dict[str, int] = field(default_factory=dict)  # model -> layer running now
    concurrency: dict[str, int] = field(default_factory=dict)
    cache_hits: int = 0
    cache_misses: int = 0
    stall_s: float = 0.0

    def empty(self) -> bool:
        return not (
            self.layer_times
            or self.routes
            or self.positions
            or self.concurrency
            or self.cache_hits
            or self.cache_misses
        )


@dataclass
class TelemetryBuffer:
    layer_sum: dict[tuple[str, int], float] = field(default_factory=dict)
    layer_count: dict[tuple[str, int], int] = field(default_factory=dict)
    routes: list[tuple[str, int, int, tuple[int, ...]]] = field(default_factory=list)
    positions: dict[str, int] = field(default_factory=dict)
    concurrency: dict[str, int] = field(default_factory=dict)

    def add(self, batch: TelemetryBatch) -> None:
        for model, layer, seconds in batch.layer_times:
            key = (model, layer)
            self.layer_sum[key] = self.layer_sum.get(key, 0.0) + seconds
            self.layer_count[key] = self.layer_count.get(key, 0) + 1
        self.routes.extend(batch.routes)
        self.positions.update(batch.positions)
        self.concurrency.update(batch.concurrency)

    def drain(self, models: list[str], positions: int, now_s: float) -> Telemetry:
        """What arrived since the last drain, as the step's telemetry; the buffer is emptied
        (positions and concurrency persist: they describe the present, not an interval)."""
        index = {m: i for i, m in enumerate(models)}
        m = len(models)
        layer_time = np.full((m, positions), np.nan)
        for (model, layer), total in self.layer_sum.items():
            if model in index and 0 <= layer + 1 < positions:
                layer_time[index[model], layer + 1] = total / self.layer_count[(model, layer)]
        current = np.full(m, NONE, np.int32)
        for model, layer in self.positions.items():
            if model in index:
                current[index[model]] = min(max(layer + 1, 0), positions - 1)
        concurrency = np.zeros(m, np.int32)
        for model, count in self.concurrency.items():
            if model in index:
                concurrency[index[model]] = count
        rows = [
            (step, index[model], layer, expert)
            for model, step, layer, experts in self.routes
            if model in index
            for expert in experts
        ]
        self.layer_sum.clear()
        self.layer_count.clear()
        self.routes.clear()
        arr = np.array(rows, np.int64).reshape(-1, 4)
        return Telemetry(
            now_s=now_s,
            layer_time_s=layer_time,
            current_position=current,
            concurrency=concurrency,
            route_step=arr[:, 0].copy(),
            route_model=arr[:, 1].astype(np.int32),
            route_layer=arr[:, 2].astype(np.int32),
            route_expert=arr[:, 3].astype(np.int32),
        )
