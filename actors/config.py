"""The pool's configuration: one pydantic model, loadable from YAML.

Capacities are per tier instance. Where a node has no GPU, ``emulated_devices_per_node`` HBM tiers
of ``hbm_bytes_per_device`` each are CPU memory standing in for device memory, and every report
marks them emulated. A bad key or value is refused with its name and value (pydantic's error).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from policy.builder import DEFAULT_ENCODINGS
from policy.config import PolicyConfig
from pool.encoding import FULL, Encoding
from pool.errors import WeightpoolError


class ConfigError(WeightpoolError):
    """A pool config that cannot be used; the message names the key and the value."""


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2}
_UNITS |= {"mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30}
_UNITS |= {"t": 1000**4, "tb": 1000**4, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: Any) -> Any:
    """``"64GiB"``, ``"1.5 GB"``, ``"512MiB"`` or a plain integer, as bytes. Anything else is
    handed on unchanged, for pydantic to refuse with the key's name."""
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match and match.group(2).lower() in _UNITS:
            return round(float(match.group(1)) * _UNITS[match.group(2).lower()])
        raise ValueError(
            f"{value!r} is not a size; expected bytes as an integer or a number with a unit "
            "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '64GiB'"
        )
    return value


Bytes = Annotated[int, BeforeValidator(parse_bytes)]


class PoolConfig(BaseModel):
    """Everything ``start_pool`` needs. Units are in the names."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    namespace: str = Field("weightpool", min_length=1, description="Ray namespace of the actors")
    storage_dir: str = Field(
        "weightpool-store", min_length=1, description="directory of the storage tier"
    )
    hbm_bytes_per_device: Bytes = Field(256 << 20, gt=0, description="HBM capacity per device")
    emulated_devices_per_node: int = Field(
        1, ge=0, le=64, description="CPU-emulated HBM tiers per node that has no GPU"
    )
    host_bytes: Bytes = Field(1 << 30, gt=0, description="host-memory tier per node")
    cxl_bytes: Bytes = Field(
        0, ge=0, description="CXL tier on nodes with a 'weightpool_cxl' resource (0: none)"
    )
    encodings: tuple[str, ...] = Field(
        tuple(e.name for e in DEFAULT_ENCODINGS),
        description="encodings the policy may choose; the first must be 'full'",
    )
    lease_ttl_s: float = Field(10.0, gt=0, description="a lease's time-to-live")
    audit_log_size: int = Field(10_000, ge=1, description="audit records kept (oldest dropped)")
    transfer_threads: int = Field(8, ge=1, le=256, description="transfers executed at once")
    call_timeout_s: float = Field(
        60.0, gt=0, description="a call to a tier actor that takes longer fails (nothing hangs)"
    )
    node_scan_s: float = Field(
        5.0, gt=0, description="how often the controller looks for nodes that joined (their tiers)"
    )
    policy: PolicyConfig = Field(default_factory=lambda: PolicyConfig(tick_s=0.05))

    @field_validator("encodings")
    @classmethod
    def _check_encodings(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        parsed = [Encoding.parse(v) for v in value]  # raises with the bad name
        if not parsed or parsed[0] != FULL:
            raise ValueError(f"encodings {list(value)}: the first must be 'full'")
        if len(set(parsed)) != len(parsed):
            raise ValueError(f"encodings {list(value)} has duplicates")
        return tuple(e.name for e in parsed)

    @property
    def parsed_encodings(self) -> tuple[Encoding, ...]:
        return tuple(Encoding.parse(e) for e in self.encodings)


def load_config(path: str | Path | None = None, **overrides: Any) -> PoolConfig:
    """A config from a YAML file (or the defaults), with ``overrides`` applied on top.

    Raises:
        ConfigError: the file is missing or not YAML, or a key or value is bad (named).
    """
    data: dict[str, Any] = {}
    if path is not None:
        import yaml

        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read pool config {str(path)!r}: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"pool config {str(path)!r} must be a mapping, got {loaded!r}")
        data = loaded or {}
    data.update(overrides)
    try:
        return PoolConfig.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}={e.get('input')!r}: {e['msg']}"
            for e in err.errors()
        )
        raise ConfigError(
            f"bad pool config{f' {str(path)!r}' if path else ''}: {problems}"
        ) from err
