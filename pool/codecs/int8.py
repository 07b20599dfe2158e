"""INT8, symmetric, one float32 scale per output channel.

``scale[r] = amax(|row r|) / 127``; values are ``round(x / scale)`` clamped to [-127, 127]. Parts:
``values`` (int8 per element) and ``scale`` (float32 per row).
"""

from __future__ import annotations

import math

import torch

from pool.codecs._common import check_finite_amax, positive_scale, rounding_slack, rows_view

QMAX = 127


def encode(x: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    rows = rows_view(x).float()
    amax = rows.abs().amax(dim=1)
    check_finite_amax(amax, name)
    scale = positive_scale(amax, QMAX)
    values = (rows / scale[:, None]).round_().clamp_(-QMAX, QMAX).to(torch.int8)
    return {"values": values, "scale": scale}


def decode(parts: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Decode into ``out``, which must be contiguous (``decode_block`` sees to it)."""
    values, scale = parts["values"], parts["scale"]
    rows_out = rows_view(out)
    # PERF: convert into ``out``, then scale in place: 11 GB/s on a 30522x384 table (2 CPU
    # threads) against 2.4 GB/s for one mixed-dtype torch.mul(int8, float32, out=...), which
    # torch runs unvectorized.
    rows_out.copy_(values.reshape(rows_out.shape))
    rows_out.mul_(scale[:, None])
    return out


def nbytes(shape: tuple[int, ...]) -> int:
    return math.prod(shape) + 4 * shape[0]


def error_bound(x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Per-element bound on ``|x - decode(encode(x))|``: half a step, plus float rounding."""
    rows = rows_view(x).float()
    scale = positive_scale(rows.abs().amax(dim=1, keepdim=True), QMAX).double()
    magnitude = rows.double().abs()
    quant = (scale / 2).expand_as(magnitude)
    return (quant + rounding_slack(magnitude + quant + scale, out_dtype)).reshape(x.shape)
