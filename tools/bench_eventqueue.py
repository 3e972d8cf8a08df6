"""EventQueue against multiprocessing.Queue: frames per second from 2 producers to 1 consumer.

Usage: ``python tools/bench_eventqueue.py [--frames N] [--repeat R]``

Two spawned producers put frames of 1-3 events (an 80x250 uint8 image, its
bool mask, one float64) as fast as they can; one consumer takes them and
copies the arrays out. The consumer is either a spawned process of its own
or the queue's creator (where an EventQueue's hub thread shares its GIL). It
prints the median frames/s and MB/s of ``R`` runs for each way of taking:

- ``mp.Queue``: ``multiprocessing.Queue.get`` (pickled through a pipe);
- ``EventQueue get``: ``lease`` one frame at a time (a round trip to the hub each);
- ``EventQueue reader``: ``queue.reader()``, with frames on their way ahead.

Numbers, not tests: run it on a quiet machine and compare within one run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from typing import Any

import numpy as np

import shmwriter

CTX = multiprocessing.get_context("spawn")
WAYS = ("mp.Queue", "EventQueue get", "EventQueue reader")


def events_of(frame: int) -> dict[str, np.ndarray[Any, Any]]:
    """1 to 3 events: an image, its mask, one float64."""
    n = 1 + frame % 3
    return {"image": np.full((n, 80, 250), frame % 256, np.uint8),
            "mask": np.ones((n, 80, 250), bool), "deform": np.full(n, frame, np.float64)}


def produce(queue: Any, frames: range) -> None:
    """A producer: put every frame of ``frames``."""
    for frame in frames:
        queue.put((frame, events_of(frame)))


def consume(queue: Any, way: str, nframes: int) -> tuple[float, int]:
    """Take ``nframes`` frames (the first one outside the clock); seconds and bytes."""
    queue.get(timeout=60)
    reader = queue.reader() if way == "EventQueue reader" else None
    source = reader or queue
    started, nbytes = time.perf_counter(), 0
    for _ in range(nframes - 1):
        if way == "mp.Queue":
            _, arrays = queue.get(timeout=60)
        else:
            with source.lease(timeout=60) as lease:
                arrays = lease.arrays()
        nbytes += sum(array.nbytes for array in arrays.values())
    elapsed = time.perf_counter() - started
    if reader is not None:
        reader.close()
    return elapsed, nbytes


def _consume_and_send(queue: Any, way: str, nframes: int, send: Any) -> None:
    send.send(consume(queue, way, nframes))


def one_run(way: str, nframes: int, *, consumer_process: bool) -> tuple[float, int]:
    """One run of 2 producers and 1 consumer; the consumer's seconds and bytes."""
    queue: Any = CTX.Queue() if way == "mp.Queue" else \
        shmwriter.EventQueue(memory_budget_nbytes=64 * 2**20)
    producers = [CTX.Process(target=produce, args=(queue, range(k, nframes, 2)))
                 for k in range(2)]
    receive, send = CTX.Pipe(duplex=False)
    consumer = CTX.Process(target=_consume_and_send, args=(queue, way, nframes, send)) \
        if consumer_process else None
    for process in [*producers, *([consumer] if consumer else [])]:
        process.start()
    result = receive.recv() if consumer else consume(queue, way, nframes)
    for process in [*producers, *([consumer] if consumer else [])]:
        process.join(60)
    queue.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.frames} frames, 2 producers, 1 consumer; medians of {args.repeat}")
    print(f"{'consumer':18} {'way':18} {'frames/s':>10} {'MB/s':>7} {'x mp.Queue':>10}")
    for consumer_process in (True, False):
        where = "its own process" if consumer_process else "the creator"
        base = None
        for way in WAYS:
            runs = [one_run(way, args.frames, consumer_process=consumer_process)
                    for _ in range(args.repeat)]
            seconds = statistics.median(s for s, _ in runs)
            rate = (args.frames - 1) / seconds
            base = base or rate
            print(f"{where:18} {way:18} {rate:10,.0f} {runs[0][1] / seconds / 1e6:7.0f} "
                  f"{rate / base:10.2f}")


if __name__ == "__main__":
    main()
