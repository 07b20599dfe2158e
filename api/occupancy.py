"""Tier occupancy over time: a sampler thread that polls the controller, and its plot.

The main job shows how the pool fills and drains its tiers while a workload runs. The sampler
asks the controller for its status (every tier actor's own byte count, not a model of it) every
``period_s`` and keeps the series; :func:`plot_occupancy` draws one line per tier kind.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class OccupancySeries:
    """Samples of bytes used per tier (by tier id), with the tiers' kinds and capacities."""

    times_s: list[float] = field(default_factory=list)
    used_bytes: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    kinds: dict[str, str] = field(default_factory=dict)
    capacity_bytes: dict[str, int | None] = field(default_factory=dict)

    def add(self, t_s: float, status: dict[str, Any]) -> None:
        self.times_s.append(t_s)
        for tier_id, report in status["tiers"].items():
            if report is None:
                self.used_bytes[tier_id].append(0)
                continue
            self.kinds[tier_id] = report.kind
            self.capacity_bytes[tier_id] = report.capacity_bytes
            self.used_bytes[tier_id].append(int(report.used_bytes))


class OccupancySampler:
    """Polls ``controller.status`` on a thread until :meth:`stop`; errors skip a sample."""

    def __init__(self, controller: Any, period_s: float = 0.5):
        self.controller = controller
        self.period_s = period_s
        self.series = OccupancySeries()
        self._stop = threading.Event()
        self.start_s = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True, name="occupancy")

    def __enter__(self) -> OccupancySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def sample(self) -> None:
        import ray

        status = ray.get(self.controller.status.remote(), timeout=30)
        self.series.add(time.monotonic() - self.start_s, status)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # a slow or restarting controller: skip it
                self.sample()
            self._stop.wait(self.period_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)


def plot_occupancy(
    series: OccupancySeries, path: Path, title: str, marks: list[tuple[float, str]] = ()
) -> Path:
    """One panel per memory tier kind (HBM, host, CXL; storage is left out: it holds
    everything), MiB used over time against capacity, with ``marks`` (time, label) as vertical
    lines. Needs matplotlib (in the dev extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({k for k in series.kinds.values() if k != "storage"})
    fig, axes = plt.subplots(len(kinds), 1, figsize=(8, 2.4 * len(kinds) + 0.6), sharex=True)
    axes = [axes] if len(kinds) == 1 else list(axes)
    for ax, kind in zip(axes, kinds, strict=True):
        for tier_id in sorted(t for t, k in series.kinds.items() if k == kind):
            used = [b / 2**20 for b in series.used_bytes[tier_id]]
            line = ax.plot(series.times_s[: len(used)], used, label=f"{tier_id} used")[0]
            cap = series.capacity_bytes.get(tier_id)
            if cap:
                ax.axhline(cap / 2**20, color=line.get_color(), linestyle="--", linewidth=0.8)
        for t_s, label in marks:
            ax.axvline(t_s, color="grey", linewidth=0.6)
            if ax is axes[0]:
                ax.annotate(
                    label,
                    (t_s, 1.0),
                    xycoords=("data", "axes fraction"),
                    fontsize=7,
                    rotation=90,
                    va="top",
                    ha="right",
                )
        ax.set_ylabel(f"{kind} MiB")
        ax.legend(loc="lower right", fontsize=7)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("seconds since the pool started (dashed: capacity)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
