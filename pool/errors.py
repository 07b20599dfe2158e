"""The errors weightpool raises on bad input and broken data.

Every error names the thing at fault, the value found and the value expected, so that an operator
can act on the message alone. All inherit from :class:`WeightpoolError`; catching that catches
everything the pool raises on purpose.
"""

from __future__ import annotations


class WeightpoolError(Exception):
    """Base class of every error weightpool raises on purpose."""


class SpecError(WeightpoolError, ValueError):
    """A block, tensor or tier spec has a field with a value outside its contract."""


class CheckpointError(WeightpoolError, ValueError):
    """A checkpoint (safetensors file or state dict) is malformed or cannot be grouped."""


class TensorMismatchError(WeightpoolError, ValueError):
    """A tensor's dtype or shape differs from what its block spec declares."""


class DuplicateBlockError(WeightpoolError, ValueError):
    """A block id is registered twice (in one batch, or already in the catalog)."""


class CapacityError(WeightpoolError, ValueError):
    """A block cannot fit in any configured tier that could serve it."""


class UnknownBlockError(WeightpoolError, KeyError):
    """A block id, or a copy of it at an encoding, is not in the catalog."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CorruptBlockError(WeightpoolError):
    """A stored file is torn, truncated or fails its checksum: its bytes are never served."""


class IllegalTransitionError(WeightpoolError):
    """A state change that ``ALLOWED_TRANSITIONS`` does not contain."""
