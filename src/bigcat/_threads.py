"""Threads: a background producer for iterators, and values shared with in-process workers."""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["ByReference", "prefetch"]

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
