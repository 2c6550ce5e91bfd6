"""Small helpers shared by several modules."""

from __future__ import annotations

import ctypes
import ctypes.util
import queue
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["prefetch", "release_free_memory"]

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
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and others: nothing to do
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True
