"""Real codecs: encode a block's tensors to an :class:`Encoding` and decode them back.

A block is encoded tensor by tensor. Quantizable tensors (see ``TensorSpec.quantizable``) take
the encoding's precision; the others stay at full precision. Each encoded tensor is a few named
parts (``values``, ``scale``), each held as raw bytes; lossless compression (pyarrow's zstd or
lz4) then applies to every part's bytes. Sizes are exact: :func:`encoded_nbytes` predicts the size
of an uncompressed copy to the byte, and :attr:`EncodedBlock.nbytes` is the size actually held.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import xxhash

from pool.blocks import DTYPE_ITEMSIZE, BlockSpec, TensorSpec
from pool.codecs import fp8, int4, int8
from pool.codecs._common import as_bytes, dtype_name, from_bytes, torch_dtype
from pool.encoding import Compression, Encoding, Precision
from pool.errors import TensorMismatchError


@dataclass(frozen=True)
class CodecOptions:
    """Tunables of the codecs. ``int4_group_size`` must be even; ``zstd_level`` is zstd's own."""

    int4_group_size: int = int4.DEFAULT_GROUP_SIZE
    zstd_level: int = 3

    def __post_init__(self) -> None:
        int4.check_group_size(self.int4_group_size)


DEFAULT_OPTIONS = CodecOptions()


@dataclass(frozen=True)
class Part:
    """One named array of an encoded tensor, as bytes.

    ``dtype`` and ``shape`` describe the decoded part; ``data`` is a 1-D uint8 array holding it,
    compressed when the copy's encoding says so (its length is then the compressed size).
    """

    role: str
    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def raw_nbytes(self) -> int:
        n = DTYPE_ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class EncodedTensor:
    name: str
    precision: Precision  # FULL for tensors that are not quantizable, whatever the block's encoding
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class EncodedBlock:
    block_id: str
    encoding: Encoding
    tensors: tuple[EncodedTensor, ...]

    @property
    def nbytes(self) -> int:
        """Bytes held by this copy's parts (compressed bytes where compressed)."""
        return sum(p.data.nbytes for t in self.tensors for p in t.parts)

    def content_checksum(self) -> str:
        """xxh3-128 over every part's bytes in order: equal for equal encoded content."""
        digest = xxhash.xxh3_128()
        for tensor in self.tensors:
            for part in tensor.parts:
                digest.update(part.data.data)
        return digest.hexdigest()


@dataclass(frozen=True)
class _PrecisionCodec:
    encode: Callable[[torch.Tensor, str, CodecOptions], dict[str, torch.Tensor]]
    decode: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]
    nbytes: Callable[[tuple[int, ...], CodecOptions], int]
    error_bound: Callable[[torch.Tensor, torch.dtype, CodecOptions], torch.Tensor]


_CODECS: dict[Precision, _PrecisionCodec] = {
    Precision.FP8: _PrecisionCodec(
        encode=lambda x, name, o: fp8.encode(x, name),
        decode=fp8.decode,
        nbytes=lambda shape, o: fp8.nbytes(shape),
        error_bound=lambda x, dt, o: fp8.error_bound(x, dt),
    ),
    Precision.INT8: _PrecisionCodec(
        encode=lambda x, name, o: int8.encode(x, name),
        decode=int8.decode,
        nbytes=lambda shape, o: int8.nbytes(shape),
        error_bound=lambda x, dt, o: int8.error_bound(x, dt),
    ),
    Precision.INT4: _PrecisionCodec(
        encode=lambda x, name, o: int4.encode(x, name, o.int4_group_size),
        decode=int4.decode,
        nbytes=lambda shape, o: int4.nbytes(shape, o.int4_group_size),
        error_bound=lambda x, dt, o: int4.error_bound(x, dt, o.int4_group_size),
    ),
}


def _compressor(compression: Compression, options: CodecOptions) -> pa.Codec | None:
    if compression is Compression.NONE:
        return None
    if compression is Compression.ZSTD:
        return pa.Codec("zstd", compression_level=options.zstd_level)
    return pa.Codec(compression.value)


def applied_precision(tensor: TensorSpec, encoding: Encoding) -> Precision:
    return encoding.precision if tensor.quantizable else Precision.FULL


def check_tensors(spec: BlockSpec, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse tensors whose names, dtypes or shapes differ from the spec's.

    Raises:
        TensorMismatchError: naming the block, the tensor, the expected and the found value.
    """
    if set(tensors) != set(spec.names):
        raise TensorMismatchError(
            f"block {spec.block_id!r}: got tensors {sorted(tensors)}; expected {sorted(spec.names)}"
        )
    for ts in spec.tensors:
        tensor = tensors[ts.name]
        if dtype_name(tensor.dtype) != ts.dtype:
            raise TensorMismatchError(
                f"block {spec.block_id!r}, tensor {ts.name!r}: dtype {dtype_name(tensor.dtype)}; "
                f"expected {ts.dtype}"
            )
        if tuple(tensor.shape) != ts.shape:
            raise TensorMismatchError(
                f"block {spec.block_id!r}, tensor {ts.name!r}: shape {tuple(tensor.shape)}; "
                f"expected {ts.shape}"
            )


def encode_block(
    spec: BlockSpec,
    tensors: Mapping[str, torch.Tensor],
    encoding: Encoding,
    options: CodecOptions = DEFAULT_OPTIONS,
) -> EncodedBlock:
    """Encode a block's tensors. Uncompressed full-precision parts view the inputs (no copy).

    Raises:
        TensorMismatchError: the tensors do not match the spec, or a tensor to be quantized holds
            NaN or infinite values.
    """
    check_tensors(spec, tensors)
    compressor = _compressor(encoding.compression, options)
    encoded = []
    for ts in spec.tensors:
        tensor = tensors[ts.name].detach().cpu()
        precision = applied_precision(ts, encoding)
        if precision is Precision.FULL:
            arrays = {"values": tensor}
        else:
            arrays = _CODECS[precision].encode(tensor, f"{spec.block_id}:{ts.name}", options)
        parts = []
        for role, array in arrays.items():
            data = as_bytes(array)
            if compressor is not None:
                data = np.frombuffer(compressor.compress(data, asbytes=False), dtype=np.uint8)
            parts.append(Part(role, dtype_name(array.dtype), tuple(array.shape), data))
        encoded.append(EncodedTensor(ts.name, precision, tuple(parts)))
    return EncodedBlock(spec.block_id, encoding, tuple(encoded))


def _part_tensors(encoded: EncodedTensor, compression: Compression) -> dict[str, torch.Tensor]:
    arrays = {}
    codec = None if compression is Compression.NONE else pa.Codec(compression.value)
    for part in encoded.parts:
        data = part.data
        if codec is not None:
            buffer = codec.decompress(data, decompressed_size=part.raw_nbytes, asbytes=False)
            data = np.frombuffer(buffer, dtype=np.uint8)
        arrays[part.role] = from_bytes(data, part.dtype, part.shape)
    return arrays


def decode_block(
    spec: BlockSpec,
    encoded: EncodedBlock,
    out: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Decode to the spec's dtypes and shapes, into ``out`` when given (pre-allocated buffers).

    The result never aliases ``encoded``'s bytes: it is safe to write to even when ``encoded``
    views a read-only memory-mapped file.

    ``out`` buffers must have the spec's shape and dtype; they may be strided (a decoder then
    decodes into a contiguous temporary and copies).

    Raises:
        TensorMismatchError: ``encoded`` is for another block, a part's shape disagrees, or an
            ``out`` buffer has another shape or dtype than the spec.
    """
    if encoded.block_id != spec.block_id:
        raise TensorMismatchError(
            f"encoded copy is of block {encoded.block_id!r}; expected {spec.block_id!r}"
        )
    if out is not None:
        check_tensors(spec, out)
    result = {}
    for et in encoded.tensors:
        ts = spec.tensor(et.name)
        given = out[et.name] if out is not None else None
        target = (
            given
            if given is not None and given.is_contiguous()
            else torch.empty(ts.shape, dtype=torch_dtype(ts.dtype))
        )
        parts = _part_tensors(et, encoded.encoding.compression)
        if et.precision is Precision.FULL:
            values = parts["values"]
            if tuple(values.shape) != ts.shape:
                raise TensorMismatchError(
                    f"block {spec.block_id!r}, tensor {ts.name!r}: stored shape "
                    f"{tuple(values.shape)}; expected {ts.shape}"
                )
            target.copy_(values)
        else:
            _CODECS[et.precision].decode(parts, target)
        if given is not None and target is not given:
            given.copy_(target)
            target = given
        result[et.name] = target
    return result


def encoded_nbytes(
    spec: BlockSpec, precision: Precision, options: CodecOptions = DEFAULT_OPTIONS
) -> int:
    """Exact bytes of an uncompressed copy of ``spec`` at ``precision``, computed from shapes alone.

    Compressed sizes depend on the data; :attr:`EncodedBlock.nbytes` gives them after encoding.
    """
    total = 0
    for ts in spec.tensors:
        p = applied_precision(ts, Encoding(precision))
        total += ts.nbytes if p is Precision.FULL else _CODECS[p].nbytes(ts.shape, options)
    return total


def error_bound(
    x: torch.Tensor, precision: Precision, options: CodecOptions = DEFAULT_OPTIONS
) -> torch.Tensor:
    """Per-element analytic bound on the round-trip error of a quantizable tensor ``x``.

    ``FULL`` is exact: the bound is zero. The bound covers quantization, float32 arithmetic and
    the cast back to ``x``'s dtype.
    """
    if precision is Precision.FULL:
        return torch.zeros(x.shape, dtype=torch.float64)
    return _CODECS[precision].error_bound(x, x.dtype, options)


__all__ = [
    "DEFAULT_OPTIONS",
    "CodecOptions",
    "EncodedBlock",
    "EncodedTensor",
    "Part",
    "check_tensors",
    "decode_block",
    "encode_block",
    "encoded_nbytes",
    "error_bound",
]
