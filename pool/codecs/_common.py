"""Helpers shared by the precision codecs: byte views, 2-D views, dtype names."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from pool.errors import TensorMismatchError


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise TensorMismatchError(f"dtype {name!r} is not a torch dtype")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def as_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a 1-D uint8 numpy array (a view when the tensor is contiguous)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def from_bytes(data: np.ndarray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor viewing ``data`` (1-D uint8) as ``dtype`` with ``shape``; no copy.

    ``data`` may be read-only (a memory-mapped file): the result must then be treated as
    read-only, which every caller in ``pool.codecs`` does (decoders only read their inputs).
    """
    with warnings.catch_warnings():
        # torch warns that it cannot mark a tensor read-only; decoders never write to inputs.
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.from_numpy(data) if data.size else torch.empty(0, dtype=torch.uint8)
    return raw.view(torch_dtype(dtype)).reshape(shape)


def rows_view(tensor: torch.Tensor) -> torch.Tensor:
    """A 2-D view ``[output channels, everything else]`` of a tensor with ``ndim >= 2``."""
    return tensor.reshape(tensor.shape[0], -1)


def check_finite_amax(amax: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(amax).all()):
        raise TensorMismatchError(
            f"tensor {name!r} holds NaN or infinite values; quantized encodings need finite "
            "weights (keep this block at full precision)"
        )


F32_TINY = float(torch.finfo(torch.float32).tiny)  # smallest normal float32


def positive_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """``amax / qmax`` in float32, 1 where ``amax`` is 0, never below the smallest normal float32
    (so that dividing by it cannot overflow when ``amax`` is itself subnormal)."""
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return scale.clamp_min_(F32_TINY)


def rounding_slack(magnitude: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Bound on the error that float rounding adds to a decoded value of at most ``magnitude``:
    a few float32 operations (relative error each, plus float32's subnormal spacing) and the final
    cast to ``out_dtype`` (its relative error, plus half its smallest subnormal)."""
    u32 = float(torch.finfo(torch.float32).eps) / 2
    out = torch.finfo(out_dtype)
    relative = 4 * u32 + float(out.eps) / 2
    absolute = 4 * 2.0**-149 + float(out.smallest_normal) * float(out.eps) / 2
    return magnitude * relative + absolute
