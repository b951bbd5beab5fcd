"""pipelines/stages.py's prefetch: items in order, errors re-raised, and a consumer that stops early leaves no
thread behind and no source open (the decoder is closed by the producer itself, at once)."""

from __future__ import annotations

import threading
import time

import pytest

from deid.pipelines.stages import prefetch

PROMPT_S = 1.0  # well under the old 5 s stall; the producer polls every 0.05 s


class Source:
    """A generator of `count` integers (endless when None) that records where and when its `finally` ran."""

    def __init__(self, count: int | None = None, fail_at: int | None = None):
        self.count, self.fail_at = count, fail_at
        self.produced = 0
        self.closed_in: str | None = None

    def __iter__(self):
        try:
            while self.count is None or self.produced < self.count:
                if self.produced == self.fail_at:
                    raise ValueError(f"bad item {self.produced}")
                yield self.produced
                self.produced += 1
        finally:
            self.closed_in = threading.current_thread().name


def _prefetch_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "deid-prefetch"}


def _wait_until(condition, seconds: float = 2.0) -> None:
    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        time.sleep(0.01)


def test_items_arrive_in_order_and_errors_reraise():
    assert list(prefetch(iter(Source(7)), maxsize=2)) == list(range(7))
    source = Source(10, fail_at=4)
    with pytest.raises(ValueError, match="bad item 4"):
        list(prefetch(iter(source), maxsize=2))
    assert source.closed_in == "deid-prefetch"


def test_a_consumer_that_stops_after_one_item_ends_the_producer_and_closes_the_source():
    before = _prefetch_threads()
    source = Source()  # endless, like a decoder on a long video
    stream = prefetch(iter(source), maxsize=2)
    assert next(stream) == 0
    _wait_until(lambda: source.produced >= 3)  # the producer is blocked on the full queue
    start = time.monotonic()
    stream.close()
    elapsed = time.monotonic() - start
    assert elapsed < PROMPT_S
    assert source.closed_in == "deid-prefetch"  # closed in the producer's thread, before close() returned
    assert not any(t.is_alive() for t in _prefetch_threads() - before)
    assert source.produced <= 4  # stopped within one item of the full queue


@pytest.mark.parametrize("count, fail_at", [(2, None), (3, 2)], ids=["end of the source", "failing source"])
def test_the_end_or_failure_marker_never_blocks_on_a_full_queue(count, fail_at):
    """The source ends (or fails) while the queue is full and the consumer has stopped reading: the marker's put
    gives up instead of blocking, so closing the stream does not wait (it used to take 5 s and leak the thread)."""
    before = _prefetch_threads()
    source = Source(count, fail_at=fail_at)
    stream = prefetch(iter(source), maxsize=1)
    assert next(stream) == 0
    _wait_until(lambda: source.closed_in is not None)  # item 1 fills the queue, the source ends (or fails)...
    assert source.closed_in == "deid-prefetch" and source.produced == 2  # ...and its marker waits for a slot
    start = time.monotonic()
    stream.close()
    assert time.monotonic() - start < PROMPT_S
    assert source.closed_in == "deid-prefetch"
    assert not any(t.is_alive() for t in _prefetch_threads() - before)


def test_an_error_in_the_consumer_stops_the_producer():
    before = _prefetch_threads()
    source = Source()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="encoder failed"):
        for item in prefetch(iter(source), maxsize=2):
            if item == 2:
                raise RuntimeError("encoder failed")
    assert time.monotonic() - start < PROMPT_S + 0.5
    assert source.closed_in == "deid-prefetch"
    assert not any(t.is_alive() for t in _prefetch_threads() - before)
