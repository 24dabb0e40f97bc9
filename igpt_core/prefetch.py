"""A bounded background producer: the next items are made in a thread while the caller works.

`Prefetcher(make, depth)` calls `make()` over and over in one daemon thread and keeps at most `depth`
results waiting, in the order made (one producer, a FIFO queue: the order is the order a plain loop of
`make()` calls would give). `get()` returns the next one, or raises in the caller the exception `make`
raised (the thread stops there). `close()` stops the thread and waits for it; a `make()` call in progress
finishes first, and its result is dropped.

Decoding a batch is numpy and file reads, and a training step spends most of its time in torch kernels
that release the GIL, so the thread's work overlaps the step's.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher(Generic[T]):
    """Makes items with `make()` in a background thread, at most `depth` ahead of `get()`."""

    def __init__(self, make: Callable[[], T], depth: int = 2, name: str = "igpt-prefetch") -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self._make = make
        self._queue: queue.Queue[T | _Failed] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item: T | _Failed = self._make()
            except BaseException as exc:  # handed to the consumer, which re-raises it
                item = _Failed(exc)
            self._queue.put(item)  # blocks while `depth` items wait; close() makes room
            if isinstance(item, _Failed):
                return

    def get(self) -> T:
        """The next item in order; raises what `make()` raised instead of a result."""
        if self._stop.is_set():
            raise RuntimeError("Prefetcher.get after close")
        item = self._queue.get()
        if isinstance(item, _Failed):
            self.close()
            raise item.error
        return item

    def close(self) -> None:
        """Stops the thread and waits for it (its `make()` in progress, if any, ends first)."""
        self._stop.set()
        while self._thread.is_alive():
            self._drain()  # a producer blocked on a full queue gets its room and sees the stop
            self._thread.join(timeout=0.05)
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
