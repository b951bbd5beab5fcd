"""Background stages of the per-frame loop: a producer thread ahead of the consumer, a consumer thread behind the
producer, and fixed-size batches of a stream."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")


_DONE = object()
POLL_S = 0.05  # how often a producer waiting for a free slot checks whether the consumer has stopped
JOIN_S = 30.0  # bound on waiting for a producer that is inside its source's next() (one decode, normally)


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetch(items: Iterator[T], maxsize: int) -> Iterator[T]:
    """Run an iterator in a background thread, `maxsize` items ahead (bounded memory); errors re-raise here.

    When the consumer stops early (closes this generator, or an error unwinds it), the producer stops within one
    item, closes `items` in its own thread (a decoder's container is closed before this generator's close returns)
    and ends: no put is left blocking on a full queue nobody reads."""
    slots: queue.Queue = queue.Queue(maxsize=maxsize)
    stop = threading.Event()

    def offer(item) -> bool:
        """Queue `item` once there is room; False (and nothing queued) when the consumer has stopped."""
        while not stop.is_set():
            try:
                slots.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        outcome: object = _DONE
        try:
            for item in items:
                if not offer(item):
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            outcome = _Failure(exc)
        finally:
            try:
                _close(items)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                outcome = outcome if isinstance(outcome, _Failure) else _Failure(exc)
        offer(outcome)

    thread = threading.Thread(target=produce, daemon=True, name="deid-prefetch")
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join(timeout=JOIN_S)


def _close(items: Iterator) -> None:
    """Close a generator (runs its `finally`: a decoder closes its file); other iterators have nothing to close."""
    close = getattr(items, "close", None)
    if close is not None:
        close()


class BackgroundSink:
    """Consume items in a background thread (e.g. the encoder) through a bounded queue; errors re-raise on put/close.

    As a context manager it closes (waiting for the consumer) on success and abandons on an error."""

    def __init__(self, consume: Callable[[T], None], maxsize: int):
        self.consume = consume
        self.slots: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="deid-sink")
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.slots.get()
            if item is _DONE:
                return
            if self.error is None:
                try:
                    self.consume(item)
                except BaseException as exc:  # noqa: BLE001 - handed to the producer
                    self.error = exc

    def put(self, item: T) -> None:
        if self.error is not None:
            raise self.error
        self.slots.put(item)

    def close(self) -> None:
        self.slots.put(_DONE)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abandon(self) -> None:
        """Stop without raising (the caller is already handling an error)."""
        self.error = self.error or RuntimeError("abandoned")
        self.slots.put(_DONE)
        # Queued items are skipped once `error` is set, so this waits for at most the item being consumed, and
        # the writers it uses are not closed under it.
        self.thread.join()

    def __enter__(self) -> "BackgroundSink":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()


def batched(items: Iterator[T], size: int) -> Iterator[list[T]]:
    """Group an iterator into lists of `size` (the last may be shorter)."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
