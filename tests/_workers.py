"""Worker functions for spawned test processes, and the data they put.

Every frame's events are derived from the frame index, so a test can
recompute what any frame must look like in the file.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable

import h5py
import numpy as np

import shmwriter

SCHEMA = shmwriter.Schema({
    "image": shmwriter.Feature("uint8", (8, 10)),
    "mask": shmwriter.Feature("bool", (8, 10)),
    "deform": shmwriter.Feature("float32"),
    "area": shmwriter.Feature("int64"),
})


def nevents_of(frame: int, most: int = 3) -> int:
    """Events of a frame: 0 to ``most``, with some frames larger than one slot."""
    if most > 3 and frame % 7 == 3:
        return most
    return (frame * 7919) % (min(most, 3) + 1)


def events_of(frame: int, most: int = 3) -> dict[str, np.ndarray] | None:
    """The events of ``frame`` (None when it has none)."""
    n = nevents_of(frame, most)
    if n == 0:
        return None
    rng = np.random.default_rng(frame)
    return {
        "image": rng.integers(0, 256, (n, 8, 10), dtype=np.uint8),
        "mask": rng.random((n, 8, 10)) > 0.5,
        "deform": rng.random(n).astype(np.float32),
        "area": np.arange(n, dtype=np.int64) + 1000 * frame,
    }


def put_frames(producer: shmwriter.Producer, frames: list[int], most: int = 3) -> None:
    """Put ``frames`` in the given order, then close."""
    with producer:
        for frame in frames:
            producer.put(frame, events_of(frame, most))


def put_frames_in_place(producer: shmwriter.Producer, frames: list[int], most: int = 3) -> None:
    """Like put_frames, but through the zero-copy ``frame()`` context."""
    with producer:
        for frame in frames:
            events = events_of(frame, most)
            n = 0 if events is None else len(events["area"])
            with producer.frame(frame, n) as ev:
                for name, array in (events or {}).items():
                    ev[name][:] = array


def expected_arrays(frames: range | list[int], most: int = 3) -> dict[str, np.ndarray]:
    """Concatenated events of ``frames`` in order, as the file must hold them."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in [*SCHEMA, "frame", "nevents"]}
    for frame in frames:
        events = events_of(frame, most)
        if events is None:
            continue
        n = len(events["area"])
        for name, array in events.items():
            parts[name].append(array.astype(np.uint8) * 255 if name == "mask" else array)
        parts["frame"].append(np.full(n, frame))
        parts["nevents"].append(np.full(n, n))
    return {name: np.concatenate(p) if p else np.zeros(0) for name, p in parts.items()}


def put_then_die(producer: shmwriter.Producer, frames: list[int], most: int = 3,
                 die_after: int = 10, hold_events: int = 6) -> None:
    """Put ``die_after`` frames, then SIGKILL itself while holding a half-filled frame."""
    import os
    import signal
    for frame in frames[:die_after]:
        producer.put(frame, events_of(frame, most))
    with producer.frame(frames[die_after], hold_events) as ev:
        ev["area"][:hold_events // 2] = -1  # half filled
        os.kill(os.getpid(), signal.SIGKILL)


def put_until_broken(producer: shmwriter.Producer, frames: list[int], most: int = 3) -> None:
    """Put frames until the writer goes away; exit code 42 if it did so as BrokenError."""
    import sys
    try:
        for frame in frames:
            producer.put(frame, events_of(frame, most), timeout_s=20)
    except shmwriter.BrokenError:
        sys.exit(42)
    sys.exit(0)


def write_until_disk_full(path: str, limit_nbytes: int, frames: int, report) -> None:
    """Run a writer process whose files may not grow past ``limit_nbytes`` until it fails."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_nbytes, hard))
    outcome = {"put": None, "close": None, "written_frames": 0}
    try:  # the writer process inherits the limit (Python ignores SIGXFSZ: writes get EFBIG)
        writer = shmwriter.Writer(path, SCHEMA, total_frames=frames, slots=4, write_threshold=20,
                                  hdf5_dataset_kwargs={"compression": None}, timeout_s=20,
                                  mode="process")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    producer = writer.producer()
    try:
        for frame in range(frames):
            producer.put(frame, events_of(frame, 3))
    except Exception as exc:
        outcome["put"] = f"{type(exc).__name__}: {exc}"
    try:
        writer.close()
    except Exception as exc:
        outcome["close"] = f"{type(exc).__name__}: {exc}"
    outcome["written_frames"] = writer.written_frames
    report.put(outcome)


def random_events(schema: shmwriter.Schema, frame: int,
                  nevents: int) -> dict[str, np.ndarray] | None:
    """Reproducible events of any schema: values depend on the frame only."""
    if nevents == 0:
        return None
    rng = np.random.default_rng(frame)
    events = {}
    for name, feature in schema.items():
        shape = (nevents, *feature.shape)
        if feature.dtype.kind == "b":
            events[name] = rng.random(shape) > 0.5
        elif feature.dtype.kind == "f":
            events[name] = rng.standard_normal(shape).astype(feature.dtype)
        else:
            info = np.iinfo(feature.dtype)
            events[name] = rng.integers(info.min, info.max, shape, dtype=feature.dtype,
                                        endpoint=True)
    return events


def put_plan(producer: shmwriter.Producer, schema: shmwriter.Schema,
             plan: list[tuple[int, int]], die_after: int | None) -> None:
    """Put (frame, nevents) pairs in order; SIGKILL itself after ``die_after`` of them."""
    import os
    import signal
    for done, (frame, nevents) in enumerate(plan):
        if done == die_after:
            os.kill(os.getpid(), signal.SIGKILL)
        producer.put(frame, random_events(schema, frame, nevents))
    producer.close()


def own_a_run_then_wait(path: str, frames: int) -> None:
    """Own a Writer (writer in its own process) with one producer child, print their pids
    and wait to be killed. Run it as a script, so it has a resource tracker of its own."""
    import multiprocessing
    import sys
    ctx = multiprocessing.get_context("spawn")
    writer = shmwriter.Writer(path, SCHEMA, total_frames=frames, slots=4, write_threshold=10,
                              mode="process")
    producer = writer.producer()
    for frame in range(100):  # the owner puts the first frames itself
        producer.put(frame, events_of(frame))
    child = ctx.Process(target=put_until_broken, args=(writer.producer(),
                                                       list(range(100, frames))))
    child.start()
    print(writer.statistics().writer_pid, child.pid, flush=True)
    sys.stdin.read()  # until killed


def batch_of(frames: list[int], most: int = 3) -> tuple[list[int], dict[str, np.ndarray] | None]:
    """``(nevents, events)`` of ``frames`` for put_many: their events concatenated."""
    counts = [nevents_of(frame, most) for frame in frames]
    parts = [events_of(frame, most) for frame in frames]
    present = [p for p in parts if p is not None]
    if not present:
        return counts, None
    return counts, {name: np.concatenate([p[name] for p in present]) for name in present[0]}


def put_batches(producer: shmwriter.Producer, frames: list[int], batch: int,
                most: int = 3) -> None:
    """Put ``frames`` in batches of ``batch`` with put_many; every third batch frame by
    frame with put instead, so the two mix on one producer."""
    with producer:
        for k, at in enumerate(range(0, len(frames), batch)):
            block = frames[at:at + batch]
            if k % 3 == 2:
                for frame in block:
                    producer.put(frame, events_of(frame, most))
            else:
                counts, events = batch_of(block, most)
                producer.put_many(block, counts, events)


def run_workers(writer: shmwriter.Writer, shares: list[list[int]], target=put_frames,
                most: int = 3, batch: int | None = None) -> None:
    """One spawned worker per share, each with its own producer; they must all succeed."""
    context = multiprocessing.get_context("spawn")
    extra = (most,) if batch is None else (batch, most)
    workers = [context.Process(target=target, args=(writer.producer(), share, *extra))
               for share in shares]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0


def assert_file_holds(path, frames, most: int = 3) -> None:
    """The file holds exactly the events of ``frames``, in order, and says how many."""
    expected = expected_arrays(frames, most)
    with h5py.File(path, "r") as h5:
        events = h5["events"]
        assert set(events) == set(expected)
        for name, array in expected.items():
            np.testing.assert_array_equal(events[name][:], array, err_msg=name)
        assert h5.attrs["experiment:event count"] == len(expected["area"])


def fill_batches_in_place(producer: shmwriter.Producer, frames: list[int], batch: int,
                          most: int = 3) -> None:
    """Put ``frames`` in batches of ``batch`` filled in place with ``frames()``; every
    third batch with put_many and every fourth frame by frame, so all three mix."""
    with producer:
        for k, at in enumerate(range(0, len(frames), batch)):
            block = frames[at:at + batch]
            counts, events = batch_of(block, most)
            if k % 4 == 3:
                for frame in block:
                    producer.put(frame, events_of(frame, most))
            elif k % 3 == 2:
                producer.put_many(block, counts, events)
            else:
                with producer.frames(block, counts) as ev:
                    for name, array in (events or {}).items():
                        ev[name][:] = array


def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0,
               interval_s: float = 0.05) -> bool:
    """Whether ``condition()`` became true within ``timeout_s`` (checked every
    ``interval_s``: for figures another process publishes, which nothing can wait on)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


def hold_memory(nbytes: int, ready, release, children: int = 0) -> None:
    """Touch ``nbytes`` of private memory, start ``children`` processes that do the same
    (grandchildren of the caller), set ``ready`` once all hold it, and wait for
    ``release`` (at most a minute)."""
    held = np.ones(nbytes, np.uint8)
    ctx = multiprocessing.get_context("spawn")
    grand_ready = [ctx.Event() for _ in range(children)]
    workers = [ctx.Process(target=hold_memory, args=(nbytes, event, release))
               for event in grand_ready]
    for worker in workers:
        worker.start()
    for event in grand_ready:
        event.wait(60)
    ready.set()
    release.wait(60)
    for worker in workers:
        worker.join(60)
    del held
