"""HBM on a real CUDA device: the backend a tier actor uses when its HBM tier is not emulated and
CUDA is available in its process (see :class:`actors.tier.TierActor`).

Each copy's parts are held as uint8 tensors in device memory, allocated by torch's caching
allocator, whose pool is reserved up front to the tier's capacity (device allocation is
expensive); accounting is exact and as :class:`actors.tier_backends.MemoryBackend`'s, against
the device bytes. Host-to-device uploads go through two pre-allocated pinned staging buffers: a
chunk of the source (a mapped object-store view) is copied into one while the other's DMA to the
device runs on the tier's own CUDA stream.

Each device copy keeps a host mirror: the object-store object :class:`MemoryBackend` would hold.
Leases map that mirror (the client decodes on the host), exports and peer copies read it, and it
outlives nothing: dropping the copy frees both. :meth:`DeviceBackend.ipc_handles` gives CUDA IPC
handles of the device parts to a consumer process on the same node; the lease protocol does not
carry them yet. Not run on a GPU in development (no GPU was available): ``bench/gpu_check.py``
exercises it where one is.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from actors.registry import CopyEntry
from actors.tier_backends import MemoryBackend
from pool.codecs import EncodedBlock
from pool.encoding import Encoding
from pool.errors import UnknownBlockError
from pool.tiers import TierSpec

STAGING_BYTES = 32 << 20  # each of the two pinned staging buffers


def cuda_available() -> bool:
    return bool(torch.cuda.is_available())


class DeviceBackend(MemoryBackend):
    """Copies in device memory (module docstring); the memory backend's protocol and
    accounting, with :meth:`materialize` uploading to the device."""

    shares_copies = False  # a shared key would hold no device parts of its own (not built)

    def __init__(self, spec: TierSpec):
        super().__init__(spec)
        self.device = torch.device("cuda", spec.device or 0)
        self.stream = torch.cuda.Stream(self.device)
        if self.capacity:
            # Reserve the tier's capacity in the caching allocator, on the stream copies are
            # allocated on (its cached blocks serve only that stream): freed at once, the segment
            # stays cached and later copies are carved from it without cudaMalloc.
            with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                torch.empty(self.capacity, dtype=torch.uint8, device=self.device)
        self.staging = [
            torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)
        ]
        self.upload_lock = threading.Lock()  # the staging buffers serve one upload at a time
        self.parts: dict[tuple[str, Encoding], tuple[torch.Tensor, ...]] = {}

    def materialize(self, encoded: EncodedBlock) -> Any:
        """The host mirror (an owned object) and the device parts, uploaded in full."""
        return super().materialize(encoded), self.upload(encoded)

    def upload(self, encoded: EncodedBlock) -> tuple[torch.Tensor, ...]:
        """Copy every part to the device through the pinned staging buffers; returns once the
        bytes are on the device."""
        out = []
        done: list[torch.cuda.Event | None] = [None, None]
        slot = 0
        with self.upload_lock, torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for tensor in encoded.tensors:
                for part in tensor.parts:
                    src = part.data
                    dst = torch.empty(src.nbytes, dtype=torch.uint8, device=self.device)
                    for start in range(0, src.nbytes, STAGING_BYTES):
                        n = min(STAGING_BYTES, src.nbytes - start)
                        event = done[slot]
                        if event is not None:
                            event.synchronize()  # this staging buffer's last DMA is finished
                        stage = self.staging[slot][:n]
                        np.copyto(stage.numpy(), src[start : start + n])
                        dst[start : start + n].copy_(stage, non_blocking=True)
                        done[slot] = torch.cuda.Event()
                        done[slot].record(self.stream)  # type: ignore[union-attr]
                        slot ^= 1
                    out.append(dst)
            self.stream.synchronize()
        return tuple(out)

    def commit(self, held: Any, entry: CopyEntry) -> None:
        mirror, parts = held
        super().commit(mirror, entry)
        self.parts[(entry.block_id, entry.encoding)] = parts

    def drop(self, block_id: str, encoding: Encoding) -> int:
        self.parts.pop((block_id, encoding), None)
        return super().drop(block_id, encoding)

    def device_parts(self, block_id: str, encoding: Encoding) -> tuple[torch.Tensor, ...]:
        parts = self.parts.get((block_id, encoding))
        if parts is None:
            raise UnknownBlockError(f"no device copy {block_id!r}@{encoding.name} on this tier")
        return parts

    def ipc_handles(self, block_id: str, encoding: Encoding) -> list[Any]:
        """``(rebuild, args)`` per part (torch's CUDA IPC reduction); another process on this
        node rebuilds the tensor with ``rebuild(*args)`` while this copy is held."""
        from torch.multiprocessing.reductions import reduce_tensor

        return [reduce_tensor(t) for t in self.device_parts(block_id, encoding)]
