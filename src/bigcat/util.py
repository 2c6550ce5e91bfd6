"""Small helpers shared by several modules."""

from __future__ import annotations

import ctypes
import functools
import itertools
import mmap
import os
import queue
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import numpy as np

__all__ = ["PageArena", "prefault", "prefetch", "release_free_memory", "small_pages"]

#: Linux 5.14+: fault pages in, writable, without writing to them
MADV_POPULATE_WRITE = 23

#: arrays smaller than this (bytes) are plain NumPy arrays
SMALL_PAGES_ABOVE = 1 << 24

T = TypeVar("T")
_DONE = object()


def prefetch(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Iterate ``items`` with the next ``depth`` items produced ahead on a background thread.

    Overlaps reading (I/O, decompression) with whatever the consumer does. Exceptions of
    the producer are re-raised in the consumer; abandoning the iterator stops the producer.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put((_DONE, None))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            buffer.put((_DONE, error))

    thread = threading.Thread(target=produce, daemon=True, name="bigcat-prefetch")
    thread.start()
    try:
        while True:
            item, error = buffer.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                buffer.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.1)


def release_free_memory() -> bool:
    """Hand memory that is free inside the process back to the operating system.

    glibc keeps freed blocks below its mmap threshold (32 MB at most) in per-thread arenas;
    after a pass that decoded thousands of blocks on several threads that is hundreds of MB
    that still count as resident, and the next large allocation (the float32 statistics)
    adds to them instead of reusing them. ``malloc_trim(0)`` returns every free page of
    every arena. Returns whether it ran (only glibc has it).
    """
    trim = _libc_function("malloc_trim")
    if trim is None:  # not Linux, or musl and others: nothing to do
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def _layout(shape: int | tuple[int, ...], dtype: Any) -> tuple[np.dtype, tuple[int, ...], int]:
    """The dtype, the shape as a tuple and the size in bytes of an array to allocate."""
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int | np.integer) else tuple(shape)
    return dtype, shape, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _small_page_map(nbytes: int) -> mmap.mmap:
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_NOHUGEPAGE)
    return memory


def small_pages(shape: int | tuple[int, ...], dtype: Any) -> np.ndarray:
    """A zero-filled array on its own anonymous memory mapping, in 4 kB pages.

    For the large arrays of a pass (accumulators, block buffers), written all over and
    freed at the end. NumPy asks for transparent huge pages on every large allocation; on
    virtual machines whose host takes back free guest memory (a balloon with free-page
    reporting, as on Firecracker), first-touching fresh huge pages is slower and far less
    steady than small pages (docs/design.md, "Memory on a virtual machine"). The kernel
    zeroes the pages when they are first touched and takes them back when the array is
    freed. Elsewhere (no ``madvise``) and for small arrays it is ``np.zeros``.

    The array is the base of every view of it (the mapping is its buffer), so
    ``sys.getrefcount`` on it counts its views (see ``bigcat.readers.BufferPool``).
    """
    dtype, shape, nbytes = _layout(shape, dtype)
    if nbytes < SMALL_PAGES_ABOVE or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.zeros(shape, dtype)
    return np.ndarray(shape, dtype, buffer=_small_page_map(nbytes))


def _libc_function(name: str) -> Any:
    """A function of the C library already loaded in this process (Linux), or ``None``.

    Not ``ctypes.util.find_library``: it runs ``ldconfig -p`` as a child process, forked
    from a process that may hold gigabytes (process-tree memory monitors count them twice).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None


@functools.cache
def _madvise() -> Any:
    function = _libc_function("madvise")
    if function is None:
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def prefault(array: np.ndarray) -> bool:
    """Fault in the pages under ``array`` (writable) without writing to them; whether it
    could (Linux 5.14+, ``MADV_POPULATE_WRITE``).

    For arrays on fresh zero pages (:func:`small_pages`) this replaces ``fill(0)``: one
    system call instead of a page fault per page and a pass of writes (docs/design.md).
    Whole pages are populated, also where they
    stretch past the array's ends; the contents never change.
    """
    madvise = _madvise()
    if madvise is None or array.nbytes == 0 or not array.flags.c_contiguous:
        return False
    start = array.ctypes.data // mmap.PAGESIZE * mmap.PAGESIZE
    end = -(-(array.ctypes.data + array.nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE
    return madvise(start, end - start, MADV_POPULATE_WRITE) == 0


class PageArena:
    """One mapping of small pages (see :func:`small_pages`), handed out in consecutive pieces.

    Lets one pass's memory be used twice without going back to the system: the blocks
    engine reads its blocks into pieces of an arena the size of the float32 statistics,
    then, once every block is gone, :meth:`reset` and builds the statistics in the same,
    already touched, pages. Each piece is an array whose buffer is the mapping itself (it
    is the base of its views); the mapping lives as long as any piece does.
    """

    ALIGN = 4096

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        self.memory = _small_page_map(self.nbytes) if hasattr(mmap, "MADV_NOHUGEPAGE") else None
        self.used = 0

    def take(self, shape: int | tuple[int, ...], dtype: Any) -> np.ndarray | None:
        """The next piece of ``shape`` and ``dtype`` (contents undefined), or ``None`` when
        it does not fit in what is left."""
        dtype, shape, nbytes = _layout(shape, dtype)
        start = -(-self.used // self.ALIGN) * self.ALIGN
        end = start + nbytes
        if self.memory is None or end > self.nbytes:
            return None
        self.used = end
        return np.ndarray(shape, dtype, buffer=self.memory, offset=start)

    def trim(self) -> None:
        """Give the pages past the pieces handed out since :meth:`reset` back to the system
        (they read as zeros if touched again)."""
        start = -(-self.used // mmap.PAGESIZE) * mmap.PAGESIZE
        if self.memory is not None and start < self.nbytes:
            self.memory.madvise(mmap.MADV_DONTNEED, start, self.nbytes - start)

    def reset(self) -> None:
        """Hand out the memory again from the start (every earlier piece must be unused)."""
        self.used = 0


#: values handed to tasks of an in-process Dask worker by reference (see :class:`ByReference`)
_BY_REFERENCE: dict[str, Any] = {}
_KEYS = itertools.count()


def _by_reference(key: str) -> Any:
    try:
        return _BY_REFERENCE[key]
    except KeyError:
        msg = f"a task was sent to another process with an in-process-only value ({key}); this is a bigcat bug"
        raise RuntimeError(msg) from None


class ByReference:
    """Hands ``value`` to the tasks of a worker *in this process* without copying it.

    distributed pickles every graph it is given, also for a ``LocalCluster`` whose worker
    runs in this process: the preallocated result views and the buffer pool of a
    statistics pass (gigabytes with thousands of clusters) were copied into the graph, and
    the tasks then filled those copies. An instance pickles as a key and unpickles as
    the value itself; :meth:`release` forgets it.
    """

    __slots__ = ("key",)

    def __init__(self, value: Any) -> None:
        self.key = f"{os.getpid()}-{next(_KEYS)}"
        _BY_REFERENCE[self.key] = value

    def __reduce__(self) -> tuple:
        return (_by_reference, (self.key,))

    def release(self) -> None:
        _BY_REFERENCE.pop(self.key, None)
