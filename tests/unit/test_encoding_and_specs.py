from __future__ import annotations

import math

import pydantic
import pytest

from pool.blocks import BlockKind, BlockSpec, TensorSpec
from pool.encoding import Compression, Encoding, Precision, precision_allowed
from pool.errors import SpecError
from pool.tiers import TierKind, TierSpec

W = TensorSpec("weight", "m.l.weight", (4, 8), "float32")


def test_encoding_names_round_trip() -> None:
    for precision in Precision:
        for compression in Compression:
            encoding = Encoding(precision, compression)
            assert Encoding.parse(encoding.name) == encoding
    assert Encoding.parse("INT4+ZSTD") == Encoding(Precision.INT4, Compression.ZSTD)
    assert Encoding.parse("int8").directly_usable
    assert not Encoding.parse("int8+lz4").directly_usable


def test_bad_encoding_names_the_text_and_the_choices() -> None:
    with pytest.raises(ValueError, match=r"'int3' is not valid.*'int4'"):
        Encoding.parse("int3")
    with pytest.raises(ValueError, match=r"'int8\+gzip'.*'zstd'"):
        Encoding.parse("int8+gzip")


def test_precision_floor_table() -> None:
    assert precision_allowed(Precision.FULL, Precision.INT4)
    assert precision_allowed(Precision.INT8, Precision.FP8)
    assert precision_allowed(Precision.FP8, Precision.INT8)
    assert not precision_allowed(Precision.INT4, Precision.INT8)
    assert not precision_allowed(Precision.FP8, Precision.FULL)


def test_spec_sizes_and_quantizable() -> None:
    bias = TensorSpec("bias", "m.l.bias", (4,), "float32")
    ids = TensorSpec("ids", "m.l.ids", (1, 8), "int64")
    spec = BlockSpec("m/l", (W, bias, ids), layer=0)
    assert spec.full_nbytes == 4 * 8 * 4 + 4 * 4 + 8 * 8
    assert [t.quantizable for t in spec.tensors] == [True, False, False]
    assert spec.model == "m"


@pytest.mark.parametrize(
    ("sensitivity", "message"),
    [
        ({Precision.INT4: math.nan}, r"sensitivity at int4 is nan; expected a finite number >= 0"),
        ({Precision.INT8: -0.5}, r"sensitivity at int8 is -0.5; expected a finite number >= 0"),
        ({Precision.FP8: math.inf}, r"sensitivity at fp8 is inf"),
        ({Precision.FULL: 0.1}, r"sensitivity at full is 0.1; expected 0"),
    ],
)
def test_bad_sensitivity_is_refused_with_block_and_value(sensitivity, message) -> None:
    with pytest.raises(SpecError, match=message) as info:
        BlockSpec("m/l", (W,), layer=0, sensitivity=sensitivity)
    assert "'m/l'" in str(info.value)


def test_spec_field_checks() -> None:
    with pytest.raises(SpecError, match="expected an expert index exactly when"):
        BlockSpec("m/e", (W,), layer=0, kind=BlockKind.EXPERT)
    with pytest.raises(SpecError, match="expected '<model>/<module path>'"):
        BlockSpec("noslash", (W,), layer=0)
    with pytest.raises(SpecError, match="duplicate tensor names"):
        BlockSpec("m/l", (W, W), layer=0)
    with pytest.raises(SpecError, match="dtype 'complex64' is not supported"):
        TensorSpec("w", "m.w", (2, 2), "complex64")


def test_spec_fields_of_the_wrong_type_are_refused() -> None:
    with pytest.raises(SpecError, match=r"floor 'int8'; expected a Precision"):
        BlockSpec("m/l", (W,), layer=0, floor="int8")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match=r"kind 'dense'; expected a BlockKind"):
        BlockSpec("m/l", (W,), layer=0, kind="dense")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match=r"layer 1.5; expected an int"):
        BlockSpec("m/l", (W,), layer=1.5)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match=r"sensitivity at int8 is True"):
        BlockSpec("m/l", (W,), layer=0, sensitivity={Precision.INT8: True})
    assert len({BlockSpec("m/l", (W,), layer=0), BlockSpec("m/l", (W,), layer=0)}) == 1


def test_spec_sensitivity_is_frozen() -> None:
    spec = BlockSpec("m/l", (W,), layer=0, sensitivity={Precision.INT4: 0.1})
    with pytest.raises(TypeError):
        spec.sensitivity[Precision.INT4] = 0.0  # type: ignore[index]


def test_tier_spec_validation_names_the_field() -> None:
    hbm = TierSpec(
        tier_id="n0/hbm0", kind=TierKind.HBM, capacity_bytes=1 << 30, device=0, emulated=True
    )
    assert hbm.emulated and hbm.device == 0
    assert TierSpec(tier_id="n0/disk", kind=TierKind.STORAGE).capacity_bytes is None
    with pytest.raises(pydantic.ValidationError, match="capacity_bytes"):
        TierSpec(tier_id="h", kind=TierKind.HOST, capacity_bytes=-1)
    with pytest.raises(pydantic.ValidationError, match="needs capacity_bytes"):
        TierSpec(tier_id="h", kind=TierKind.HOST)
    with pytest.raises(pydantic.ValidationError, match="'peer' is not configurable"):
        TierSpec(tier_id="p", kind=TierKind.PEER, capacity_bytes=1)
    with pytest.raises(pydantic.ValidationError, match="expected a device index exactly for 'hbm'"):
        TierSpec(tier_id="h", kind=TierKind.HBM, capacity_bytes=1)
    with pytest.raises(
        pydantic.ValidationError, match=r"capacty\n  Extra inputs are not permitted"
    ):
        TierSpec(tier_id="h", kind=TierKind.HOST, capacity_bytes=1, capacty=2)
