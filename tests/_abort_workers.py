"""Programs for the abort tests: owners that get signals, producers that die early.

Run the owners as scripts (``python -c``), so that they have a process group,
a resource tracker and signal handling of their own, as a user's program has.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys

from _workers import SCHEMA, events_of

import shmwriter


def own_and_put_until_stopped(path: str, mode: str) -> None:
    """Own a Writer and put frames 1, 2, 3, ... from this process (frame 0 never comes),
    printing each index once its put() has returned, until a signal stops it.

    On Ctrl-C (SIGINT) the ``with`` block raises KeyboardInterrupt and aborts the run; the
    script then prints ``interrupted`` and exits with 130 as a shell program would.
    """
    try:
        with shmwriter.Writer(path, SCHEMA, total_frames=10**6, slots=8, write_threshold=7,
                              mode=mode) as writer:  # type: ignore[arg-type]
            print(json.dumps({"writer_pid": writer.statistics().writer_pid}), flush=True)
            producer = writer.producer()
            for frame in range(1, 10**6):
                producer.put(frame, events_of(frame))
                print(frame, flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)


def die_before_first_put(producer: shmwriter.Producer) -> None:
    """A worker that crashes while it sets up, before its first put (a SIGKILL, say OOM)."""
    os.kill(os.getpid(), signal.SIGKILL)


def put_when_told(producer: shmwriter.Producer, frames: list[int], gates, report) -> None:
    """Put each frame once its gate opens (odd frames empty); report each outcome, then
    stop at the first error. Two of these sharing one producer act in a set order."""
    for frame, gate in zip(frames, gates, strict=True):
        gate.wait(60)
        try:
            producer.put(frame, None if frame % 2 else events_of(frame))
        except shmwriter.ShmWriterError as exc:
            report.put((frame, f"{type(exc).__name__}: {exc}"))
            return
        report.put((frame, "ok"))


def spawn_context() -> multiprocessing.context.SpawnContext:
    return multiprocessing.get_context("spawn")


def start_writers_until_stopped(path: str) -> None:
    """Make Writers one after another (each run closed at once), printing ``go`` first, so
    that a Ctrl-C can strike while one is starting."""
    print("go", flush=True)
    try:
        for run in range(10**6):
            with shmwriter.Writer(f"{path}.{run % 2}", SCHEMA, total_frames=1,
                                  allow_gaps=True):
                pass
    except KeyboardInterrupt:
        sys.exit(130)


def sigterm_to_the_writer(path: str, report) -> None:
    """A run whose writer process gets SIGTERM (a service manager, say): close() must say so."""
    writer = shmwriter.Writer(path, SCHEMA, total_frames=1000, write_threshold=10)
    with writer.producer() as producer:
        for frame in range(100):
            producer.put(frame, events_of(frame))
        os.kill(writer.statistics().writer_pid, signal.SIGTERM)
    try:
        writer.close(timeout_s=60)
        report.put("close() returned")
    except shmwriter.ShmWriterError as exc:
        report.put(f"{type(exc).__name__}: {exc}")
