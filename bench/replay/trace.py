"""Routing traces: the format of DESIGN section 7, read, written, generated and recorded.

A trace is an Arrow table in long form, one row per selected expert: ``step: int64, layer: int32,
expert: int32`` (MoE layers numbered from 0), with schema metadata ``num_layers``,
``num_experts``, ``top_k`` and ``source``. With several sequences decoded together, a step's rows
at a layer are the union of the experts the sequences chose.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([("step", pa.int64()), ("layer", pa.int32()), ("expert", pa.int32())])


class TraceError(ValueError):
    """A trace file that is not in the format, or that does not fit the model."""


@dataclass(frozen=True)
class Trace:
    step: np.ndarray
    layer: np.ndarray
    expert: np.ndarray
    num_layers: int
    num_experts: int
    top_k: int
    source: str

    @property
    def steps(self) -> int:
        return int(self.step.max()) + 1 if len(self.step) else 0

    def chosen(self) -> list[list[np.ndarray]]:
        """Per step, per MoE layer, the experts chosen (sorted)."""
        order = np.lexsort((self.expert, self.layer, self.step))
        step, layer, expert = self.step[order], self.layer[order], self.expert[order]
        key = step * self.num_layers + layer
        bounds = np.searchsorted(key, np.arange(self.steps * self.num_layers + 1))
        per_step = self.num_layers
        return [
            [
                expert[bounds[s * per_step + layer] : bounds[s * per_step + layer + 1]]
                for layer in range(per_step)
            ]
            for s in range(self.steps)
        ]

    def table(self) -> pa.Table:
        return pa.table(
            [
                pa.array(self.step, pa.int64()),
                pa.array(self.layer, pa.int32()),
                pa.array(self.expert, pa.int32()),
            ],
            schema=SCHEMA.with_metadata(
                {
                    "num_layers": str(self.num_layers),
                    "num_experts": str(self.num_experts),
                    "top_k": str(self.top_k),
                    "source": self.source,
                }
            ),
        )

    def write(self, path: str | Path) -> None:
        """Write as Parquet when the name ends in ``.parquet``, else as Arrow IPC."""
        path = Path(path)
        if path.suffix == ".parquet":
            pq.write_table(self.table(), path)
        else:
            table = self.table()
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)

    def check_fits(self, moe_layers: int, experts: int) -> None:
        if self.num_layers != moe_layers or self.num_experts != experts:
            raise TraceError(
                f"trace '{self.source}' has {self.num_layers} MoE layers of {self.num_experts} "
                f"experts; the model has {moe_layers} of {experts}"
            )


def read(path: str | Path) -> Trace:
    """Read an Arrow IPC or Parquet trace and check it.

    Raises:
        TraceError: naming the file and what is wrong (missing column or metadata, values out of
            range).
    """
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            table = pq.read_table(path)
        else:
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowInvalid) as err:
        raise TraceError(f"{path}: not a readable Arrow IPC or Parquet file ({err})") from None
    missing = [f.name for f in SCHEMA if f.name not in table.column_names]
    if missing:
        raise TraceError(f"{path}: columns {missing} are missing; expected step, layer, expert")
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    try:
        num_layers, num_experts, top_k = (
            int(meta[k]) for k in ("num_layers", "num_experts", "top_k")
        )
    except (KeyError, ValueError):
        raise TraceError(
            f"{path}: schema metadata {sorted(meta)}; "
            "expected integer num_layers, num_experts, top_k"
        ) from None
    step = table.column("step").to_numpy().astype(np.int64)
    layer = table.column("layer").to_numpy().astype(np.int64)
    expert = table.column("expert").to_numpy().astype(np.int64)
    for name, values, bound in (("layer", layer, num_layers), ("expert", expert, num_experts)):
        if len(values) and (values.min() < 0 or values.max() >= bound):
            raise TraceError(
                f"{path}: {name} values span {values.min()}..{values.max()}; "
                f"expected 0..{bound - 1}"
            )
    if len(step) and step.min() < 0:
        raise TraceError(f"{path}: step values must be >= 0")
    return Trace(step, layer, expert, num_layers, num_experts, top_k, meta.get("source", path.name))


@dataclass(frozen=True)
class SyntheticKnobs:
    """Named knobs of the synthetic router, defaults calibrated as noted.

    - ``zipf_exponent``: per-layer popularity skew; expert ``r``-th most popular at a layer is
      chosen with weight ``r ** -zipf_exponent``. Expert activation within a workload is
      markedly unbalanced (Huang et al. 2023, "Towards MoE Deployment", arXiv:2303.06182; Xue et
      al. 2024, MoE-Infinity, arXiv:2401.14361). 0.6 gives the most popular eighth of experts
      37 % of the activations at 128 experts.
    - ``drift_per_step``: share of adjacent popularity ranks swapped per step (popularity moves
      over time, as requests change).
    - ``persistence``: logit bonus (nats) for the experts a sequence chose at the same layer for
      its previous token. Calibrated (with the skew above) so that consecutive tokens share at
      least one of their top-2 Mixtral experts about 61 % of the time at middle layers, against
      46 % by chance: the Mixtral paper measures repetition well above chance at middle and late
      layers (Jiang et al. 2024, "Mixtral of Experts", arXiv:2401.04088, section 5). The figure is
      checked by a test through :func:`repeat_rate`.
    - ``cross_layer``: logit bonus for the experts that usually follow the token's experts of the
      previous layer (inter-layer expert affinity, Yao et al. 2024, arXiv:2401.08383).
    - ``concurrency``: sequences decoded together; a step's rows are the union of their choices.
    """

    zipf_exponent: float = 0.6
    drift_per_step: float = 0.01
    persistence: float = 0.3
    cross_layer: float = 1.0
    concurrency: int = 1


SYNTHETIC_PRESETS: dict[str, SyntheticKnobs] = {
    "default": SyntheticKnobs(),
    "batch8": SyntheticKnobs(concurrency=8),
    "uniform": SyntheticKnobs(zipf_exponent=0.0, persistence=0.0, cross_layer=0.0),
    "skewed": SyntheticKnobs(zipf_exponent=1.2, persistence=1.0),
}


def drift_ranks(ranks: np.ndarray, rng: np.random.Generator, swaps: int) -> None:
    """Swap ``swaps`` random pairs of adjacent popularity ranks, in place. One swap at a time:
    done as one vectorized assignment, overlapping swaps wrote the same cell twice and left a row
    that was no longer a permutation (and the popularity table partly uninitialized)."""
    layers, experts = ranks.shape
    rows = rng.integers(0, layers, swaps).tolist()
    cols = rng.integers(0, experts - 1, swaps).tolist()
    for row, col in zip(rows, cols, strict=True):
        ranks[row, col], ranks[row, col + 1] = ranks[row, col + 1], ranks[row, col]


def synthesize(
    moe_layers: int,
    experts: int,
    top_k: int,
    steps: int,
    knobs: SyntheticKnobs,
    seed: int = 0,
    name: str = "synthetic",
) -> Trace:
    rng = np.random.default_rng(seed)
    c = knobs.concurrency
    ranks = np.argsort(rng.random((moe_layers, experts)), axis=1)  # ranks[l, r] = expert
    follower = rng.integers(0, experts, (moe_layers, experts))  # affinity to the next layer
    previous = np.zeros((c, moe_layers, experts), bool)
    log_weights = np.array([-knobs.zipf_exponent * math.log(r) for r in range(1, experts + 1)])
    rows_step, rows_layer, rows_expert = [], [], []
    swaps = max(0, round(knobs.drift_per_step * moe_layers * experts))
    for t in range(steps):
        if swaps and t:
            drift_ranks(ranks, rng, swaps)
        log_popularity = np.zeros((moe_layers, experts))
        np.put_along_axis(log_popularity, ranks, log_weights[None, :], axis=1)
        chosen = np.zeros((c, moe_layers, experts), bool)
        bonus = np.zeros((c, experts))
        for layer in range(moe_layers):
            gumbel = rng.gumbel(size=(c, experts))
            logits = (
                log_popularity[layer][None, :] + gumbel + knobs.persistence * previous[:, layer]
            )
            logits += bonus
            top = np.argpartition(-logits, top_k - 1, axis=1)[:, :top_k]
            np.put_along_axis(chosen[:, layer], top, True, axis=1)
            bonus = np.zeros((c, experts))
            np.put_along_axis(bonus, follower[layer][top], knobs.cross_layer, axis=1)
        previous = chosen
        layer, expert = np.nonzero(chosen.any(axis=0))
        rows_step.append(np.full(len(layer), t, np.int64))
        rows_layer.append(layer.astype(np.int64))
        rows_expert.append(expert.astype(np.int64))
    return Trace(
        np.concatenate(rows_step),
        np.concatenate(rows_layer),
        np.concatenate(rows_expert),
        moe_layers,
        experts,
        top_k,
        name,
    )


def repeat_rate(trace: Trace, layer: int) -> float:
    """Share of consecutive steps whose expert sets at ``layer`` intersect (the Mixtral paper's
    "first or second choice" repetition, for single-sequence traces)."""
    chosen = trace.chosen()
    hits = [len(np.intersect1d(a[layer], b[layer])) > 0 for a, b in itertools.pairwise(chosen)]
    return float(np.mean(hits)) if hits else float("nan")
