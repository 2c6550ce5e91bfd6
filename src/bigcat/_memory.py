"""Memory for large arrays: small pages prefaulted, arenas, buffer pools, and handing free
memory back to the operating system (why each: docs/design.md, "Memory")."""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
import threading
from typing import Any

import numpy as np

__all__ = ["BufferPool", "PageArena", "prefault", "release_free_memory", "small_pages"]

#: Linux 5.14+: fault pages in, writable, without writing to them
MADV_POPULATE_WRITE = 23

#: arrays smaller than this (bytes) are plain NumPy arrays
SMALL_PAGES_ABOVE = 1 << 24


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
    ``sys.getrefcount`` on it counts its views (see :class:`BufferPool`).
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


class BufferPool:
    """Reusable 1-D arrays for blocks read concurrently by several tasks.

    Each block read into fresh memory costs first-touch page faults, which on virtual
    machines cost more than decoding the block (docs/design.md). :meth:`take` hands out a
    view of a pooled array that nothing else references any more (CPython's reference
    count: the block, every view of it and every matrix built on it keep the array busy),
    so a buffer is reused exactly when the block
    it held is gone, whichever task or thread let it go. New arrays are pieces of
    ``arena`` while it has room (see :class:`PageArena`), else
    :func:`small_pages`. At most ``limit`` arrays are kept; past that, or for
    a pickled copy (a pool never travels to other processes), plain new arrays are
    returned. Drop the pool to free its memory.
    """

    def __init__(self, limit: int = 16, size: int = 0, arena: PageArena | None = None) -> None:

        self.limit = limit
        #: elements of each new array when the largest block is known (else a little more
        #: than the request): no slack to first-touch, and every buffer fits every block
        self.size = size
        self.arena = arena
        self.buffers: list[np.ndarray] = []
        self.lock = threading.Lock()
        probe = [np.empty(0)]
        for buffer in probe:  # the count of an idle buffer, seen from a loop over the buffers
            self._idle = sys.getrefcount(buffer)

    def __getstate__(self) -> dict:
        return {"limit": self.limit, "size": self.size}

    def __setstate__(self, state: dict) -> None:
        BufferPool.__init__(self, state["limit"], state["size"])

    def take(self, n: int, dtype: Any) -> np.ndarray:
        """An array of ``n`` elements of ``dtype`` (uninitialised), reused when possible."""
        dtype = np.dtype(dtype)
        with self.lock:
            for buffer in self.buffers:
                if buffer.dtype == dtype and len(buffer) >= n and sys.getrefcount(buffer) <= self._idle:
                    return buffer[:n]
            # room for every block, or for blocks a little larger than this one
            size = max(n, self.size) if self.size else n + n // 8 + 1024
            piece = self.arena.take(size, dtype) if self.arena is not None else None
            buffer = small_pages(size, dtype) if piece is None else piece
            if len(self.buffers) < self.limit:
                self.buffers.append(buffer)
            return buffer[:n]

    def release(self) -> bool:
        """Forget every buffer; whether none of them was still in use (by a block, a view
        of one or a matrix built on one) — only then may the arena's memory be reused."""
        with self.lock:
            for buffer in self.buffers:
                if sys.getrefcount(buffer) > self._idle:
                    self.buffers.clear()
                    return False
            self.buffers.clear()
            return True
