"""Quality accounting for replays: sensitivity per block and precision, and floors.

Without a calibration file, sensitivities follow a documented synthetic distribution: a base
drift per precision (FP8 2e-5, INT8 1e-5, INT4 4e-4 per block use), spread log-normally
(sigma 1) across blocks, and multiplied for the blocks known to be fragile: x10 in the first and
last layers, x10 for shared experts, x20 for the embedding and the head, x3 for attention. Every
expert of a layer shares that layer's use, so expert sensitivities are per use. A block whose
INT4 drift passes ``floor_threshold`` gets an INT8 floor, as ``weightpool calibrate`` would set.

With ``--calibration FILE`` (a JSON object ``{"<block name>": {"fp8": x, "int8": y, "int4":
z}}``), the listed blocks take the measured values.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.replay.presets import Layout

# Encodings of the replay: full, fp8, int8, int4, int4+zstd (same drift as int4).
BASE = np.array([0.0, 2e-5, 1e-5, 4e-4, 4e-4])


def synthetic_sensitivity(layout: Layout, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = len(layout.block_names)
    factor = rng.lognormal(0.0, 1.0, n)
    layers = layout.model.layers
    edge = (layout.position == 1) | (layout.position == layers)
    factor *= np.where(edge, 10.0, 1.0)
    factor *= np.where(layout.kind == "shared-expert", 10.0, 1.0)
    factor *= np.where(np.isin(layout.kind, ["embedding", "head"]), 20.0, 1.0)
    factor *= np.where(layout.kind == "dense", 3.0, 1.0)
    return factor[:, None] * BASE[None, :]


def load_calibration(path: str | Path, layout: Layout, sensitivity: np.ndarray) -> np.ndarray:
    data = json.loads(Path(path).read_text())
    index = {name: i for i, name in enumerate(layout.block_names)}
    out = sensitivity.copy()
    columns = {"fp8": 1, "int8": 2, "int4": 3}
    for name, values in data.items():
        if name not in index:
            raise ValueError(f"{path}: block {name!r} is not a block of {layout.model.name}")
        for precision, value in values.items():
            out[index[name], columns[precision]] = float(value)
            if precision == "int4":
                out[index[name], 4] = float(value)
    return out


def floors_bits(sensitivity: np.ndarray, floor_threshold: float) -> np.ndarray:
    """INT8 floor (8 bits) where INT4 drift passes the threshold, else INT4 (4 bits)."""
    return np.where(sensitivity[:, 3] > floor_threshold, 8, 4).astype(np.int16)
