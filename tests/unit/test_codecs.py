"""Property tests of the real codecs: exact round trips, analytic error bounds, exact sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pool.blocks import BlockSpec, TensorSpec
from pool.codecs import (
    CodecOptions,
    decode_block,
    encode_block,
    encoded_nbytes,
    error_bound,
)
from pool.codecs._common import dtype_name
from pool.encoding import Compression, Encoding, Precision
from pool.errors import TensorMismatchError

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def weight_tensors(draw, min_dims=2):
    """Real-valued weights of varied shapes and magnitudes, zero rows and outliers included."""
    n_dims = draw(st.integers(min_dims, 3))
    shape = tuple(draw(st.integers(1, 9 if i else 6)) for i in range(n_dims))
    magnitude = draw(st.sampled_from([1e-40, 1e-3, 1.0, 300.0]))  # 1e-40: float32 subnormals
    values = draw(
        arrays(
            np.float32,
            shape,
            elements=st.floats(-4, 4, width=32, allow_nan=False, allow_infinity=False),
        )
    )
    x = torch.from_numpy(values * np.float32(magnitude))
    if draw(st.booleans()):
        x[0] = 0  # an all-zero output channel
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    return x.to(dtype)


def block_of(x: torch.Tensor, extra_bias: bool = True) -> tuple[BlockSpec, dict[str, torch.Tensor]]:
    tensors = {"weight": x}
    specs = [TensorSpec("weight", "m.l.weight", tuple(x.shape), dtype_name(x.dtype))]
    if extra_bias:
        bias = torch.arange(x.shape[0], dtype=x.dtype) / 3
        tensors["bias"] = bias
        specs.append(TensorSpec("bias", "m.l.bias", tuple(bias.shape), dtype_name(bias.dtype)))
    return BlockSpec("m/l", tuple(specs), layer=0), tensors


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


group_sizes = st.sampled_from([2, 4, 6, 128])


@settings(max_examples=150, deadline=None)
@given(weight_tensors(), st.sampled_from(list(Compression)))
def test_full_and_lossless_round_trips_are_bit_exact(x, compression) -> None:
    spec, tensors = block_of(x)
    encoded = encode_block(spec, tensors, Encoding(Precision.FULL, compression))
    decoded = decode_block(spec, encoded)
    for name, tensor in tensors.items():
        assert decoded[name].dtype == tensor.dtype
        assert raw(decoded[name]) == raw(tensor)


@settings(max_examples=150, deadline=None)
@given(
    weight_tensors(), st.sampled_from([Precision.FP8, Precision.INT8, Precision.INT4]), group_sizes
)
def test_lossless_compression_of_a_quantized_copy_is_exact(x, precision, group_size) -> None:
    options = CodecOptions(int4_group_size=group_size)
    spec, tensors = block_of(x)
    plain = decode_block(spec, encode_block(spec, tensors, Encoding(precision), options))
    for compression in (Compression.ZSTD, Compression.LZ4):
        packed = encode_block(spec, tensors, Encoding(precision, compression), options)
        again = decode_block(spec, packed)
        assert all(raw(again[n]) == raw(plain[n]) for n in tensors)


@settings(max_examples=200, deadline=None)
@given(
    weight_tensors(), st.sampled_from([Precision.FP8, Precision.INT8, Precision.INT4]), group_sizes
)
def test_quantized_error_is_within_the_analytic_bound(x, precision, group_size) -> None:
    options = CodecOptions(int4_group_size=group_size)
    spec, tensors = block_of(x)
    decoded = decode_block(spec, encode_block(spec, tensors, Encoding(precision), options))
    error = (decoded["weight"].double() - x.double()).abs()
    bound = error_bound(x, precision, options)
    assert bound.shape == x.shape
    worst = (error - bound).max()
    assert bool((error <= bound).all()), f"error exceeds bound by {float(worst)}"
    # Vectors (bias) are never quantized: bit-exact at every precision.
    assert raw(decoded["bias"]) == raw(tensors["bias"])


def test_bound_is_not_vacuous() -> None:
    """The bound must be tight enough to catch a broken codec: a decode off by one step fails."""
    x = torch.linspace(-1, 1, 256).reshape(2, 128)
    spec, tensors = block_of(x, extra_bias=False)
    decoded = decode_block(spec, encode_block(spec, tensors, Encoding(Precision.INT8)))["weight"]
    bound = error_bound(x, Precision.INT8)
    assert bool(((decoded - x).abs() <= bound).all())
    step = x.abs().amax(dim=1, keepdim=True) / 127
    assert not bool(((decoded + step - x).abs() <= bound).all())
    # INT4's step is amax / 7 per group; its bound is half of that, not more.
    assert float(error_bound(x, Precision.INT4).max()) == pytest.approx(1 / 14, rel=1e-4)
    # FP8: the bound is 1/16 relative (3 mantissa bits); a decoder one e4m3 step off breaks it.
    fp8 = decode_block(spec, encode_block(spec, tensors, Encoding(Precision.FP8)))["weight"]
    fp8_bound = error_bound(x, Precision.FP8)
    assert bool(((fp8 - x).abs() <= fp8_bound).all())
    assert not bool(((fp8 * (1 + 2.0**-3) - x).abs() <= fp8_bound).all())
    assert float((fp8_bound / x.abs().clamp_min(1e-3)).max()) < 0.07


@settings(max_examples=150, deadline=None)
@given(weight_tensors(min_dims=1), st.sampled_from(list(Precision)), group_sizes)
def test_sizes_are_exact(x, precision, group_size) -> None:
    options = CodecOptions(int4_group_size=group_size)
    spec, tensors = block_of(x)
    encoded = encode_block(spec, tensors, Encoding(precision), options)
    assert encoded.nbytes == encoded_nbytes(spec, precision, options)
    for tensor in encoded.tensors:
        for part in tensor.parts:
            assert part.data.nbytes == part.raw_nbytes
    # A compressed copy decompresses to exactly the uncompressed parts' sizes.
    compressed = encode_block(spec, tensors, Encoding(precision, Compression.ZSTD), options)
    raw = [p.raw_nbytes for t in compressed.tensors for p in t.parts]
    assert raw == [p.data.nbytes for t in encoded.tensors for p in t.parts]


def test_known_sizes() -> None:
    spec, _ = block_of(torch.zeros(256, 384))
    bias = 256 * 4
    assert encoded_nbytes(spec, Precision.FULL) == 256 * 384 * 4 + bias
    assert encoded_nbytes(spec, Precision.INT8) == 256 * 384 + 256 * 4 + bias
    assert encoded_nbytes(spec, Precision.FP8) == 256 * 384 + 256 * 4 + bias
    # 3 groups of 128 per row, 64 packed bytes and one float32 scale per group.
    assert encoded_nbytes(spec, Precision.INT4) == 256 * 3 * (64 + 4) + bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
def test_decode_into_preallocated_buffers(dtype, strided) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 8, 40).to(dtype)  # 3-D, K = 320: INT4 groups of 128 with padding
    spec, tensors = block_of(x)
    for precision in Precision:
        if strided:  # the right shape, but a transposed view: not contiguous
            backing = torch.full((16, 40, 8), float("nan"), dtype=dtype)
            weight_out = backing.transpose(1, 2)
            assert not weight_out.is_contiguous()
        else:
            weight_out = torch.full(x.shape, float("nan"), dtype=dtype)
        out = {"weight": weight_out, "bias": torch.full((16,), float("nan"), dtype=dtype)}
        result = decode_block(spec, encode_block(spec, tensors, Encoding(precision)), out)
        assert result["weight"] is weight_out
        error = (weight_out.double() - x.double()).abs()
        assert bool((error <= error_bound(x, precision)).all()), precision


def test_decode_refuses_out_buffers_of_another_shape_or_dtype() -> None:
    spec, tensors = block_of(torch.randn(4, 8))
    encoded = encode_block(spec, tensors, Encoding(Precision.INT8))
    with pytest.raises(
        TensorMismatchError, match=r"tensor 'weight': shape \(2, 4, 8\); expected \(4, 8\)"
    ):
        decode_block(spec, encoded, {"weight": torch.empty(2, 4, 8), "bias": torch.empty(4)})
    with pytest.raises(
        TensorMismatchError, match=r"tensor 'weight': dtype float16; expected float32"
    ):
        decode_block(
            spec,
            encoded,
            {"weight": torch.empty(4, 8, dtype=torch.float16), "bias": torch.empty(4)},
        )


def test_fp8_uses_torch_float8() -> None:
    spec, tensors = block_of(torch.randn(8, 16), extra_bias=False)
    part = encode_block(spec, tensors, Encoding(Precision.FP8)).tensors[0].parts[0]
    assert (part.role, part.dtype) == ("values", "float8_e4m3fn")


def test_non_finite_weights_refuse_quantization_but_keep_full() -> None:
    x = torch.randn(4, 8)
    x[2, 3] = float("nan")
    spec, tensors = block_of(x, extra_bias=False)
    with pytest.raises(TensorMismatchError, match=r"'m/l:weight' holds NaN or infinite"):
        encode_block(spec, tensors, Encoding(Precision.INT8))
    decoded = decode_block(spec, encode_block(spec, tensors, Encoding()))
    assert raw(decoded["weight"]) == raw(x)


def test_tensor_mismatch_names_block_tensor_and_values() -> None:
    spec, tensors = block_of(torch.zeros(4, 8))
    with pytest.raises(
        TensorMismatchError, match=r"'m/l', tensor 'weight': dtype float16; expected float32"
    ):
        encode_block(
            spec, {**tensors, "weight": torch.zeros(4, 8, dtype=torch.float16)}, Encoding()
        )
    with pytest.raises(
        TensorMismatchError, match=r"tensor 'weight': shape \(4, 9\); expected \(4, 8\)"
    ):
        encode_block(spec, {**tensors, "weight": torch.zeros(4, 9)}, Encoding())
    with pytest.raises(
        TensorMismatchError, match=r"got tensors \['weight'\]; expected \['bias', 'weight'\]"
    ):
        encode_block(spec, {"weight": tensors["weight"]}, Encoding())


def test_bad_group_size() -> None:
    with pytest.raises(ValueError, match="group_size is 3; expected an even integer"):
        CodecOptions(int4_group_size=3)
