"""Worker functions for spawned processes in the EventQueue and dcnum-compat tests.

Every frame's events are derived from the frame index (as dcnum's workers
would hand them over: a dict of arrays, or None for a frame without events),
so a test can recompute what any frame must look like.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np


def nevents_of(frame: int) -> int:
    """0 to 3 events; every 11th frame has 9 (more than one slot of 4)."""
    return 9 if frame % 11 == 5 else (frame * 7919) % 4


def dcnum_events(frame: int) -> dict[str, np.ndarray] | None:
    """A dcnum-like event dict: bool masks, uint8 images, float64/float32/int32 scalars."""
    n = nevents_of(frame)
    if n == 0:
        return None
    rng = np.random.default_rng(frame)
    return {
        "mask": rng.random((n, 8, 10)) > 0.5,
        "image": rng.integers(0, 256, (n, 8, 10), dtype=np.uint8),
        "deform": rng.random(n),
        "temp": rng.random(n).astype(np.float32),
        "area_um": rng.integers(0, 1000, n).astype(np.int32),
    }


def put_events(event_queue, frames: list[int]) -> None:
    """Put ``(frame, events)`` for ``frames`` in the given order."""
    for frame in frames:
        event_queue.put((frame, dcnum_events(frame)))


def put_like_dcnum(event_queue, feat_nevents, frames: list[int]) -> None:
    """As dcnum's workers do: set feat_nevents[frame] first, then put the frame."""
    for frame in frames:
        events = dcnum_events(frame)
        feat_nevents[frame] = 0 if events is None else len(events["mask"])
        event_queue.put((frame, events))


def get_frames(event_queue, count: int, report) -> None:
    """Consumer: get ``count`` frames and report {frame: events} through ``report``."""
    got = {}
    for _ in range(count):
        frame, events = event_queue.get(timeout=30)
        got[frame] = events
    report.put(got)


def take_slots_and_wait(event_queue, count: int, taken) -> None:
    """A producer granted ``count`` slots that sends no frame; the test kills it."""
    slots = event_queue._client().grants.take(0, count, 30)
    assert len(slots) == count
    taken.send(len(slots))  # a Connection: sent at once (an mp.Queue sends from a thread)
    time.sleep(60)


def lease_then_die(event_queue) -> None:
    """A consumer killed while it holds a frame's slots (a lease)."""
    lease = event_queue.lease(timeout=30)
    assert lease.nslots > 0
    os.kill(os.getpid(), signal.SIGKILL)


def publish_turn_then_die(event_queue) -> None:
    """A process killed while it has the hub's leave to publish the inferred schema."""
    assert event_queue._client().publish_turn()
    os.kill(os.getpid(), signal.SIGKILL)


def lease_slowly_then_get(event_queue, leased, release_after_s: float, report) -> None:
    """A slow consumer: lease a frame, say so, keep its slots a while, then get one more."""
    lease = event_queue.lease(timeout=30)
    leased.put(lease.frame_index)
    time.sleep(release_after_s)  # a writer stall: the producer must wait, not give up
    lease.release()
    report.put(event_queue.get(timeout=30)[0])


def get_one_then_wait(event_queue, got, stop) -> None:
    """A consumer that takes one frame, says so, then takes nothing more until told to stop."""
    got.put(event_queue.get(timeout=30)[0])
    stop.wait(60)


def put_and_report(event_queue, frame: int, started, report) -> None:
    """Put one frame without a timeout; report how the put ended (None or the exception)."""
    started.set()
    try:
        event_queue.put((frame, {"deform": np.full(1, frame, np.float64)}))
    except Exception as exc:
        report.put((type(exc).__name__, str(exc)))
    else:
        report.put(None)


def get_and_report(event_queue, started, report) -> None:
    """A consumer that waits in get() without a timeout; reports how the get ended."""
    started.set()
    try:
        frame, _ = event_queue.get()
    except Exception as exc:
        report.put((type(exc).__name__, str(exc)))
    else:
        report.put(frame)


def wait_in_get_then_die(event_queue, started) -> None:
    """A consumer killed while its get() waits for a frame (its TAKE is at the hub)."""
    import threading
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGKILL)).start()
    started.set()
    event_queue.get(timeout=30)


def get_with_timeout_and_report(event_queue, started, report, timeout: float = 30) -> None:
    """A consumer that attaches, says so, waits in get(timeout) and reports how it ended."""
    event_queue.qsize()  # attached
    started.set()
    try:
        report.put(event_queue.get(timeout=timeout)[0])
    except Exception as exc:
        report.put((type(exc).__name__, str(exc)))


def fork_idle_child_then_close(event_queue_args, attached, closed) -> None:
    """A creator that forks an idle child (as a fork pool would) and then closes its queue."""
    import multiprocessing

    from shmwriter import EventQueue, Feature, Schema
    schema = Schema({"deform": Feature("float64")})
    q = EventQueue(schema, slots=2)
    event_queue_args.send(q)
    assert attached.wait(30)
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,),
                                                        daemon=True)
    child.start()  # it holds copies of every descriptor of this process
    event_queue_args.send(child.pid)
    q.close()
    closed.set()
    time.sleep(60)


def take_in_a_thread_then_again(event_queue, took, again) -> None:
    """A consumer process whose first frames are taken by a thread that then ends."""
    import threading
    thread = threading.Thread(target=lambda: event_queue.get(timeout=30))
    thread.start()
    thread.join()
    took.set()
    assert again.wait(30)
    event_queue.get(timeout=30)
