"""SinkThread: chunks written in order, a bounded queue, a failure that blocks nobody."""

from __future__ import annotations

import threading

import pytest

from shmwriter._write.sink_thread import SinkThread


def test_chunks_are_written_in_order_and_counted():
    written, sizes = [], []
    sink = SinkThread(written.append, where="mem", queue_size=1,
                      on_written=lambda c: sizes.append(("written", c)),
                      on_queue_size=lambda n: sizes.append(n))
    sink.start()
    for chunk in range(50):
        sink.put(chunk)
    sink.finish()
    assert written == list(range(50))
    assert [c for what, c in (s for s in sizes if isinstance(s, tuple))] == list(range(50))
    assert all(0 <= s <= 1 for s in sizes if isinstance(s, int))
    assert "idle" in repr(sink)


def test_the_disk_being_behind_makes_put_wait():
    gate = threading.Event()
    sink = SinkThread(lambda _: gate.wait(10), where="slow", queue_size=1)
    sink.start()
    sink.put(1)  # taken by the thread, which waits at the gate
    sink.put(2)  # fills the queue
    third = threading.Thread(target=sink.put, args=(3,))
    third.start()
    third.join(0.3)
    assert third.is_alive()  # bounded: the third chunk waits for room
    gate.set()
    third.join(10)
    sink.finish()


def test_a_failed_write_is_raised_by_the_next_put_and_finish_never_hangs():
    def write(chunk):
        if chunk == 2:
            raise OSError(28, "No space left on device")

    sink = SinkThread(write, where="/full/out.rtdc", queue_size=1)
    sink.start()
    sink.put(1)
    sink.put(2)
    with pytest.raises(OSError, match=r"writing /full/out\.rtdc failed: .*No space left") as info:
        for chunk in range(3, 100):
            sink.put(chunk)
    assert isinstance(info.value.__cause__, OSError)
    sink.finish()
    assert isinstance(sink.error, OSError)
    assert "failed" in repr(sink)


def test_finish_without_start_returns():
    sink = SinkThread(print, where="x", queue_size=1)
    sink.finish()
    sink.raise_if_failed()


def test_a_failing_callback_is_a_failure_too_and_nothing_vanishes():
    written = []

    def count(chunk):
        if chunk == 2:
            raise RuntimeError("the header is gone")

    sink = SinkThread(written.append, where="x.rtdc", queue_size=1, on_written=count)
    sink.start()
    with pytest.raises(OSError, match=r"writing x\.rtdc failed: the header is gone"):
        for chunk in range(100):  # no put may return as if its chunk were taken
            sink.put(chunk)
    sink.finish()
    assert written[:3] == [0, 1, 2] and isinstance(sink.error, RuntimeError)
