"""bigcat's own reader and writer of sharded 1-D Zarr v3 arrays (the sparse layout's
``X/data`` and ``X/indices``), producing and reading the bytes zarr-python does.

Why not zarr-python's own path: it decodes every inner chunk into a fresh array and copies
it into the output, and joins each shard it writes into fresh buffers; on a VM the
first touch of that memory cost as much as the codec work (docs/design.md, "The store").
Both classes apply only to arrays encoded exactly as bigcat writes them
(:meth:`ShardIndex.of` returns ``None`` otherwise, and zarr does the work); tests check
the bytes against zarr's own.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from bigcat.errors import BigcatInputError

__all__ = ["DoesNotFit", "GrowingArray", "ShardIndex", "ShardReader", "ShardWriter"]

#: the index entry of an inner chunk never written (read as fill values)
EMPTY = np.iinfo(np.uint64).max

#: each thread's buffer for the compressed bytes it reads from local shards, shared by every
#: reader: one per reader kept that reader's largest read alive with it, and Dask workers
#: hold every task's (deserialized) reader until the graph is done — hundreds per worker
_SCRATCH = threading.local()


class ShardIndex:
    """How one 1-D array is sharded (inner chunk length, chunks per shard, Blosc codec), where
    its shards are stored, and the shard index format (``(offset, nbytes)`` per inner chunk
    as little-endian uint64, then its CRC-32C, at the end of the shard).

    Local stores are the one special case: their shards are files read with ``pread``.
    """

    def __init__(self, array: Any, chunk: int, blosc: Any) -> None:
        from zarr.storage import LocalStore

        self.array, self.chunk, self.blosc = array, chunk, blosc
        self.per_shard = int(array.shards[0]) // chunk
        store = array.store_path.store
        self.root = Path(store.root) if isinstance(store, LocalStore) else None

    @classmethod
    def of(cls, array: Any) -> ShardIndex | None:
        """The index of ``array`` when it is a 1-D Zarr v3 array sharded exactly as bigcat
        writes it (inner chunks ``bytes`` (little-endian) + ``blosc``, index ``bytes`` +
        ``crc32c`` at the end of each shard, fill value 0), else ``None``."""
        from numcodecs import Blosc
        from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec

        codecs: tuple[Any, ...] = tuple(array.metadata.codecs) if array.metadata.zarr_format == 3 else ()
        if sys.byteorder != "little" or array.ndim != 1 or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return None
        sharding = codecs[0]
        inner, index = sharding.codecs, sharding.index_codecs
        if not (
            sharding.index_location.value == "end"
            and len(inner) == 2
            and isinstance(inner[0], BytesCodec)
            and isinstance(inner[1], BloscCodec)
            and len(index) == 2
            and isinstance(index[0], BytesCodec)
            and isinstance(index[1], Crc32cCodec)
            and all(c.endian is None or c.endian.value == "little" for c in (inner[0], index[0]))
            and array.fill_value == 0
            and array.dtype.isnative
        ):
            return None
        blosc = inner[1]
        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[blosc.shuffle.value]
        codec = Blosc(
            cname=blosc.cname.value,
            clevel=blosc.clevel,
            shuffle=shuffle,
            blocksize=blosc.blocksize,
            typesize=array.dtype.itemsize,
        )
        return cls(array, int(sharding.chunk_shape[0]), codec)

    # -- where shards live ----------------------------------------------------------------
    def key(self, shard: int) -> str:
        """The store key of shard number ``shard``."""
        key = self.array.metadata.encode_chunk_key((shard,))
        return f"{self.array.path}/{key}" if self.array.path else key

    def where(self, shard: int) -> str:
        """The shard, for messages."""
        return (
            str(self.root / self.key(shard)) if self.root is not None else f"{self.array.store_path}/{self.key(shard)}"
        )

    def get(self, shard: int, byte_range: Any = None) -> memoryview | None:
        """Bytes of a shard through the array's store (``None``: never written)."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        buffer = sync(self.array.store_path.store.get(self.key(shard), default_buffer_prototype(), byte_range))
        if buffer is None:
            return None
        data: Any = buffer.as_numpy_array()
        return memoryview(data)

    def set(self, shard: int, data: np.ndarray) -> None:
        """Store a whole encoded shard."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        buffer = default_buffer_prototype().buffer.from_array_like(data)
        sync(self.array.store_path.store.set(self.key(shard), buffer))

    # -- the index format ---------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of a shard's index, CRC excluded."""
        return 16 * self.per_shard

    def decode(self, shard: int, raw: bytes) -> np.ndarray:
        """The ``(offset, nbytes)`` rows of a shard's index from its last bytes, checked."""
        import google_crc32c

        size = self.nbytes
        crc = int(np.frombuffer(raw[size:], dtype="<u4")[0]) if len(raw) == size + 4 else -1
        if google_crc32c.value(raw[:size]) != crc:
            msg = f"{self.where(shard)}: damaged shard index (checksum mismatch)"
            raise BigcatInputError(msg)
        return np.frombuffer(raw[:size], dtype="<u8").reshape(-1, 2)

    def encode(self, sizes: np.ndarray) -> tuple[np.ndarray, bytes]:
        """The index of a shard whose first ``len(sizes)`` inner chunks hold ``sizes`` bytes,
        stored one after another from offset 0: ``(index rows, index bytes + CRC)``."""
        import google_crc32c

        index = np.full((self.per_shard, 2), EMPTY, dtype="<u8")
        index[: len(sizes), 0] = np.cumsum(sizes) - sizes
        index[: len(sizes), 1] = sizes
        raw = index.tobytes()
        return index, raw + np.array([google_crc32c.value(raw)], dtype="<u4").tobytes()


class ShardReader:
    """Reads element ranges of a sharded 1-D array, decoding straight into the caller's
    array: one ranged read per shard a range touches (its chunks are contiguous in the
    shard) and one Blosc decode per chunk, into the destination itself except for the
    partial chunks at the ends. Shard indexes are read once (their CRC-32C checked) and
    cached. Works on any Zarr store (local or fsspec).
    """

    def __init__(self, shards: ShardIndex) -> None:
        self.shards = shards
        self.indexes: dict[int, np.ndarray | None] = {}

    @classmethod
    def for_array(cls, array: Any) -> ShardReader | None:
        """A reader of ``array``, or ``None`` when zarr must read it (see :meth:`ShardIndex.of`)."""
        shards = ShardIndex.of(array)
        return None if shards is None else cls(shards)

    def _get_range(self, shard: int, start: int, stop: int) -> memoryview:
        """Bytes ``start:stop`` of a shard. From a local store they are read with one
        ``pread`` into a reused per-thread buffer: bytes objects of tens of MB are fresh
        memory for every read (glibc maps and unmaps them), whose first touch costs more
        than the read on a VM."""
        shards = self.shards
        if shards.root is None:
            from zarr.abc.store import RangeByteRequest

            raw = shards.get(shard, RangeByteRequest(start, stop))
            if raw is None or len(raw) != stop - start:
                msg = f"{shards.where(shard)}: shard shorter than its index says"
                raise BigcatInputError(msg)
            return raw
        size = stop - start
        buffer: Any = getattr(_SCRATCH, "buffer", None)
        if buffer is None or len(buffer) < size:
            buffer = _SCRATCH.buffer = None  # the smaller one freed before the new one is taken
            buffer = _SCRATCH.buffer = np.empty(size + size // 8, dtype=np.uint8)
        view = memoryview(buffer)[:size]
        fd = os.open(shards.root / shards.key(shard), os.O_RDONLY)
        try:
            n = os.preadv(fd, [view], start)
        finally:
            os.close(fd)
        if n != size:
            msg = f"{shards.where(shard)}: shard shorter than its index says ({n} of {size} bytes at {start})"
            raise BigcatInputError(msg)
        return view

    def _index(self, shard: int) -> np.ndarray | None:
        if shard not in self.indexes:
            from zarr.abc.store import SuffixByteRequest

            raw = self.shards.get(shard, SuffixByteRequest(self.shards.nbytes + 4))
            # a shard never written holds fill values
            self.indexes[shard] = None if raw is None else self.shards.decode(shard, bytes(raw))
        return self.indexes[shard]

    def read(self, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
        """Elements ``lo:hi`` into ``out``: ``hi - lo`` elements of the array's dtype, or of a
        narrower integer dtype (each chunk decoded into a reused buffer and copied while in
        cache; :class:`DoesNotFit` names the first value out of its range)."""
        chunk, per_shard, blosc = self.shards.chunk, self.shards.per_shard, self.shards.blosc
        if hi <= lo:
            return out
        dtype = self.shards.array.dtype
        narrow = None
        if out.dtype != dtype:
            if not (dtype.kind in "iu" and out.dtype.kind in "iu"):
                msg = f"cannot read {dtype} into {out.dtype}"
                raise TypeError(msg)
            from bigcat.kernels import narrow_into

            info = np.iinfo(out.dtype)
            narrow = (narrow_into, info.min, info.max)
        whole: np.ndarray | None = None  # an edge chunk, or any narrowed one, decoded first
        first, last = lo // chunk, (hi - 1) // chunk
        for shard in range(first // per_shard, last // per_shard + 1):
            c0, c1 = max(first, shard * per_shard), min(last, (shard + 1) * per_shard - 1)
            found = self._index(shard)
            index = found if found is not None else np.full((per_shard, 2), EMPTY, dtype="<u8")
            stored = [c for c in range(c0, c1 + 1) if index[c - shard * per_shard, 0] != EMPTY]
            view, base = memoryview(b""), 0
            if stored:
                rows = index[[c - shard * per_shard for c in stored]]
                base, end = int(rows[:, 0].min()), int((rows[:, 0] + rows[:, 1]).max())
                view = self._get_range(shard, base, end)
            for c in range(c0, c1 + 1):
                s, e = c * chunk, (c + 1) * chunk
                a, b = max(s, lo), min(e, hi)
                target = out[a - lo : b - lo]
                if c not in stored:
                    target[...] = 0
                    continue
                offset, nbytes = (int(v) for v in index[c - shard * per_shard])
                piece = view[offset - base : offset - base + nbytes]
                if a == s and b == e and narrow is None:
                    blosc.decode(piece, out=target)
                    continue
                if whole is None:
                    whole = np.empty(chunk, dtype=dtype)
                blosc.decode(piece, out=whole)
                if narrow is None:
                    target[...] = whole[a - s : b - s]
                    continue
                kernel, low, high = narrow
                bad = kernel(whole[a - s : b - s], target, low, high)
                if bad >= 0:
                    raise DoesNotFit(a + int(bad), int(whole[a - s + bad]))
        return out


class DoesNotFit(ValueError):
    """A value read does not fit the narrower integer dtype asked for: ``position`` (an
    element of the array) and ``value``."""

    def __init__(self, position: int, value: int) -> None:
        super().__init__(f"element {position} = {value} does not fit")
        self.position, self.value = position, value


class ShardWriter:
    """Encodes whole shards of a sharded 1-D array from the caller's buffer, through one
    reused output buffer, and hands them to the array's store (the Zarr v3
    ``sharding_indexed`` format: the inner chunks encoded with ``bytes`` + ``blosc``, then
    the index)."""

    def __init__(self, shards: ShardIndex) -> None:
        self.shards = shards
        self.output = np.empty(0, dtype=np.uint8)

    @classmethod
    def for_array(cls, array: Any) -> ShardWriter | None:
        """A writer of ``array``, or ``None`` when zarr must write it (see :meth:`ShardIndex.of`)."""
        shards = ShardIndex.of(array)
        return None if shards is None else cls(shards)

    def write(self, shard: int, values: np.ndarray) -> None:
        """Store shard number ``shard`` holding ``values`` (a whole shard, or the last one)."""
        chunk = self.shards.chunk
        encoded = []
        for lo in range(0, len(values), chunk):
            piece = values[lo : lo + chunk]
            if len(piece) < chunk:  # zarr encodes an edge chunk padded with the fill value
                piece = np.concatenate([piece, np.zeros(chunk - len(piece), dtype=piece.dtype)])
            encoded.append(self.shards.blosc.encode(np.ascontiguousarray(piece)))
        index, index_bytes = self.shards.encode(np.array([len(e) for e in encoded], dtype=np.uint64))
        body = int(sum(len(e) for e in encoded))
        total = body + len(index_bytes)
        if len(self.output) < total:
            self.output = np.empty(max(total, 2 * len(self.output)), dtype=np.uint8)
        out = self.output[:total]
        for start, piece in zip(index[: len(encoded), 0], encoded, strict=True):
            out[start : start + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
        out[body:] = np.frombuffer(index_bytes, dtype=np.uint8)
        self.shards.set(shard, out)


class GrowingArray:
    """Appends 1-D data to a Zarr array in whole shards, written in the background.

    Values are copied into one of two reusable shard-sized buffers; a full buffer is
    handed to a writer thread (Zarr encodes and writes it) while the next one fills, so
    reading the input, compressing and writing overlap. Reusing two buffers instead of
    allocating a new one per shard also avoids first-touch page faults, which are costly
    on virtual machines.
    """

    def __init__(self, array: Any, shard: int, dtype: np.dtype) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.array = array
        self.shard = shard
        self.dtype = np.dtype(dtype)
        self.buffers = [np.empty(0, dtype=self.dtype), np.empty(0, dtype=self.dtype)]
        self.pending: list[Any] = [None, None]  # the write of each buffer in flight
        self.current = 0
        self.fill = 0
        self.n_written = 0
        #: elements safely in the array (every write up to here has completed)
        self.durable = 0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="bigcat-write")
        self.writer = ShardWriter.for_array(array)

    def _buffer(self) -> np.ndarray:
        i = self.current
        if self.pending[i] is not None:
            self.pending[i].result()
            self.pending[i] = None
        if len(self.buffers[i]) < self.shard:
            self.buffers[i] = np.empty(self.shard, dtype=self.dtype)
        return self.buffers[i]

    def append(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=self.dtype)
        while len(values):
            buffer = self._buffer()
            n = min(len(values), self.shard - self.fill)
            buffer[self.fill : self.fill + n] = values[:n]
            self.fill += n
            values = values[n:]
            if self.fill == self.shard:
                self._submit()

    def _submit(self) -> None:
        if not self.fill:
            return
        start, n, i = self.n_written, self.fill, self.current

        def write() -> None:
            self.array.resize((start + n,))
            if self.writer is not None and start % self.shard == 0:
                self.writer.write(start // self.shard, self.buffers[i][:n])
            else:
                self.array[start : start + n] = self.buffers[i][:n]
            self.durable = start + n  # writes run one at a time, in order

        self.pending[i] = self.pool.submit(write)
        self.n_written += n
        self.fill = 0
        self.current = 1 - i

    def restart(self, n_values: int) -> None:
        """Continue after the first ``n_values`` elements of an interrupted write.

        The array is cut back to the last whole shard; the elements of the shard in
        progress are read back from it into the buffer, so that shard is rewritten whole,
        exactly as an uninterrupted write would have.
        """
        shard_start = n_values // self.shard * self.shard
        head = np.asarray(self.array[shard_start:n_values])
        self.array.resize((shard_start,))
        self.n_written = self.durable = shard_start
        self.append(head)

    def close(self) -> None:
        """Write the tail and wait for every write (re-raising its error, if any)."""
        try:
            self._submit()
            for future in self.pending:
                if future is not None:
                    future.result()
        finally:
            self.pool.shutdown(wait=True)
            self.buffers = []
