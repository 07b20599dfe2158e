"""The storage file format: one encoded block copy per Arrow IPC file.

A file holds one record batch with a row per part: ``tensor``, ``precision``, ``role``, ``dtype``,
``shape``, ``nbytes`` and ``data`` (large binary). Each part's bytes start on a 64-byte boundary
of the data buffer, which Arrow's IPC writer places on an 8-byte boundary of the file: a reader
maps every part as an aligned array (any dtype up to 8 bytes) straight from the memory-mapped
file. Schema metadata names the block, the encoding and the format version.

Files are written atomically (a temporary file in the same directory, flushed and fsynced, then
renamed over the target, then the directory fsynced) and checksummed whole (xxh3-128); a reader
verifies the checksum of the mapped bytes before it interprets a single one of them.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import xxhash

from pool.codecs import EncodedBlock, EncodedTensor, Part
from pool.encoding import Encoding, Precision
from pool.errors import CorruptBlockError

FORMAT_VERSION = "1"
ALIGNMENT = 64
SCHEMA = pa.schema(
    [
        ("tensor", pa.string()),
        ("precision", pa.string()),
        ("role", pa.string()),
        ("dtype", pa.string()),
        ("shape", pa.list_(pa.int64())),
        ("nbytes", pa.int64()),
        ("data", pa.large_binary()),
    ]
)


def _aligned(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _record_batch(encoded: EncodedBlock) -> pa.RecordBatch:
    rows = [(t, p) for t in encoded.tensors for p in t.parts]
    # Value i spans [offsets[i], offsets[i + 1]): its bytes, then zero padding up to the next
    # 64-byte boundary. The ``nbytes`` column says where the bytes end.
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    for i, (_, part) in enumerate(rows):
        offsets[i + 1] = offsets[i] + _aligned(part.data.nbytes)
    data = pa.allocate_buffer(int(offsets[-1]))
    view = np.frombuffer(data, dtype=np.uint8)
    for i, (_, part) in enumerate(rows):
        start, end = int(offsets[i]), int(offsets[i + 1])
        view[start : start + part.data.nbytes] = part.data
        view[start + part.data.nbytes : end] = 0
    column = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(rows), [None, pa.py_buffer(offsets), data]
    )
    return pa.record_batch(
        [
            pa.array([t.name for t, _ in rows], pa.string()),
            pa.array([t.precision.value for t, _ in rows], pa.string()),
            pa.array([p.role for _, p in rows], pa.string()),
            pa.array([p.dtype for _, p in rows], pa.string()),
            pa.array([list(p.shape) for _, p in rows], pa.list_(pa.int64())),
            pa.array([p.data.nbytes for _, p in rows], pa.int64()),
            column,
        ],
        schema=SCHEMA.with_metadata(
            {
                "block_id": encoded.block_id,
                "encoding": encoded.encoding.name,
                "format_version": FORMAT_VERSION,
            }
        ),
    )


def write_atomic(path: Path, encoded: EncodedBlock) -> tuple[int, str]:
    """Write ``encoded`` to ``path`` atomically; return the file's size and xxh3-128 checksum.

    A reader sees either the old file or the complete new one, never a partial write. The
    temporary file is removed if anything fails.
    """
    _make_durable_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    batch = _record_batch(encoded)
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        size, checksum = file_checksum(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return size, checksum


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_durable_dirs(directory: Path) -> None:
    """``mkdir -p``, fsyncing each new directory's parent so that the entry survives a crash."""
    missing = []
    probe = directory
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        _fsync_dir(new.parent)


def file_checksum(path: Path) -> tuple[int, str]:
    with pa.memory_map(str(path), "r") as mapped:
        buffer = mapped.read_buffer()
        return buffer.size, xxhash.xxh3_128_hexdigest(memoryview(buffer))


def read_verified(
    path: Path, expected_checksum: str, block_id: str, encoding: Encoding
) -> EncodedBlock:
    """Map ``path``, verify it against ``expected_checksum``, and return its parts as zero-copy,
    read-only numpy views of the mapping (the mapping lives as long as any view does).

    Raises:
        CorruptBlockError: the file is missing, torn, fails its checksum, or holds another block
            or encoding than the catalog says. Nothing of it is returned.
    """
    where = f"block {block_id!r} at {encoding.name} ({path})"
    try:
        mapped = pa.memory_map(str(path), "r")
    except OSError as err:
        raise CorruptBlockError(f"{where}: file cannot be opened ({err})") from None
    buffer = mapped.read_buffer()
    actual = xxhash.xxh3_128_hexdigest(memoryview(buffer))
    if actual != expected_checksum:
        raise CorruptBlockError(
            f"{where}: checksum {actual} over {buffer.size} bytes; expected {expected_checksum} "
            "(file corrupt or torn); not served"
        )
    try:
        reader = pa.ipc.open_file(buffer)
        batch = reader.get_batch(0)
        batch.validate(full=True)
        meta = {k.decode(): v.decode() for k, v in (reader.schema.metadata or {}).items()}
    except (pa.ArrowException, IndexError, UnicodeDecodeError) as err:
        raise CorruptBlockError(f"{where}: not a readable Arrow IPC block file ({err})") from None
    if meta.get("block_id") != block_id or meta.get("encoding") != encoding.name:
        raise CorruptBlockError(
            f"{where}: file says block {meta.get('block_id')!r} at {meta.get('encoding')!r}; "
            "expected the catalog's block and encoding"
        )
    return _parts_from_batch(batch, block_id, encoding)


def _parts_from_batch(batch: pa.RecordBatch, block_id: str, encoding: Encoding) -> EncodedBlock:
    column = batch.column("data")
    _, offsets_buffer, data_buffer = column.buffers()
    offsets = np.frombuffer(
        offsets_buffer, dtype=np.int64, count=len(column) + 1, offset=column.offset * 8
    )
    tensors: dict[str, tuple[Precision, list[Part]]] = {}
    names = batch.column("tensor").to_pylist()
    precisions = batch.column("precision").to_pylist()
    roles = batch.column("role").to_pylist()
    dtypes = batch.column("dtype").to_pylist()
    shapes = batch.column("shape").to_pylist()
    sizes = batch.column("nbytes").to_pylist()
    for i, name in enumerate(names):
        start, end = int(offsets[i]), int(offsets[i + 1])
        if not 0 <= sizes[i] <= end - start:
            raise CorruptBlockError(
                f"block {block_id!r} at {encoding.name}: part {name}:{roles[i]} claims "
                f"{sizes[i]} bytes in a slot of {end - start}"
            )
        data = np.frombuffer(data_buffer, dtype=np.uint8, count=sizes[i], offset=start)
        part = Part(roles[i], dtypes[i], tuple(shapes[i]), data)
        tensors.setdefault(name, (Precision(precisions[i]), []))[1].append(part)
    return EncodedBlock(
        block_id,
        encoding,
        tuple(EncodedTensor(name, prec, tuple(parts)) for name, (prec, parts) in tensors.items()),
    )
