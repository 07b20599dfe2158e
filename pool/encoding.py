"""Encodings: how a copy's bytes represent a block (a precision, and lossless compression or not).

Precisions are not ordered by enum value: "is INT8 allowed for a block whose floor is FP8?" is
answered by the explicit table :data:`PRECISION_BITS` through :func:`precision_allowed`, so that
adding a precision never silently changes what the guardrail permits.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Precision(enum.Enum):
    """The numeric format of a copy's quantizable tensors.

    ``FULL`` is the checkpoint's own dtype. The others are real codecs (see ``pool.codecs``):
    ``FP8`` is e4m3 with a scale per output channel, ``INT8`` symmetric per output channel,
    ``INT4`` symmetric group-wise with two values packed per byte.
    """

    FULL = "full"
    FP8 = "fp8"
    INT8 = "int8"
    INT4 = "int4"


class Compression(enum.Enum):
    """Lossless compression applied on top of a precision (pyarrow's codecs)."""

    NONE = "none"
    ZSTD = "zstd"
    LZ4 = "lz4"


# Bits per weight value of each precision, FULL counted as "as many as the checkpoint has". Used
# only to decide what a precision floor allows; never for size accounting (see pool.codecs).
PRECISION_BITS: dict[Precision, int] = {
    Precision.FULL: 64,
    Precision.FP8: 8,
    Precision.INT8: 8,
    Precision.INT4: 4,
}


def precision_allowed(precision: Precision, floor: Precision) -> bool:
    """Whether a copy at ``precision`` respects a block whose precision floor is ``floor``.

    FP8 and INT8 carry the same number of bits and satisfy each other's floor.
    """
    return PRECISION_BITS[precision] >= PRECISION_BITS[floor]


@dataclass(frozen=True, order=False)
class Encoding:
    """A precision plus lossless compression.

    A copy with ``compression`` other than ``NONE`` must be decoded (decompressed) before compute:
    in HBM it is the ``HOLDING`` state. Without compression, every precision is directly usable by
    a kernel that reads it (FP8 and INT8 matmuls, packed INT4 weight-only kernels): ``COMPACT``.
    """

    precision: Precision = Precision.FULL
    compression: Compression = Compression.NONE

    @property
    def directly_usable(self) -> bool:
        return self.compression is Compression.NONE

    @property
    def name(self) -> str:
        """Stable text form, e.g. ``int8`` or ``int4+zstd``; :meth:`parse` reads it back."""
        if self.compression is Compression.NONE:
            return self.precision.value
        return f"{self.precision.value}+{self.compression.value}"

    @classmethod
    def parse(cls, text: str) -> Encoding:
        """Read the form :attr:`name` writes.

        Raises:
            ValueError: naming the text and the accepted precisions and compressions.
        """
        precision_text, _, compression_text = text.strip().lower().partition("+")
        try:
            precision = Precision(precision_text)
            compression = Compression(compression_text) if compression_text else Compression.NONE
        except ValueError:
            raise ValueError(
                f"encoding {text!r} is not valid: expected PRECISION[+COMPRESSION] with PRECISION "
                f"one of {[p.value for p in Precision]} and COMPRESSION one of "
                f"{[c.value for c in Compression if c is not Compression.NONE]}"
            ) from None
        return cls(precision, compression)

    def __str__(self) -> str:
        return self.name


FULL = Encoding()
