"""Running one benchmark run: spawned producers, a start signal, and the clocks around it.

:class:`Window` measures a run from the start signal to the closed file: wall
time, the CPU of this process and of its reaped children, and, from a
background thread, the writer's progress and (in a run that measures memory)
the summed PSS of the process tree. The ``run_*`` functions set up one writer, let the
producers build their frames, then give the signal and wait for the file.

Producers' CPU before the signal (interpreter start-up, building frames) is
not part of a run: each producer reports its CPU at the signal, and that is
subtracted from the children's CPU once they are reaped. The writer's own CPU
is separated too: in thread mode (and for dcnum's writer threads) it is this
process's CPU minus its main and sampling threads; in process mode it is the
children's CPU minus the producers' whole lives (they report it and exit
without the interpreter's teardown) minus the writer process's CPU before the
signal, so it includes that process's exit (a few tens of ms).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import resource
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import h5py
import hdf5plugin
import numpy as np
import psutil

from .._rtdc import chunk_rows
from ..ops.memory import TreeMemory
from ..writer import DEFAULT_SLOT_EVENTS, DEFAULT_SLOTS, Writer
from . import _work as work
from .config import MEMORY_SAMPLE_INTERVAL_S

__all__ = ["Job", "Measured", "ProducerReport", "Window", "read_back", "run_dcnum", "run_h5py",
           "run_overhead", "run_shmwriter", "run_shmwriter_blocks"]

#: Seconds between progress samples of a timed run (reading the writer's event counter: a
#: few microseconds).
SAMPLE_INTERVAL_S = 0.1
_READY_TIMEOUT_S = 300.0
_JOIN_TIMEOUT_S = 600.0
_CTX = multiprocessing.get_context("spawn")


class Window:
    """Measures one run from the start signal (:meth:`open`) to the closed file (:meth:`close`).

    A background thread samples the writer's progress, and with ``memory``
    the tree's summed PSS, every :data:`SAMPLE_INTERVAL_S` (with ``memory``:
    :data:`~.config.MEMORY_SAMPLE_INTERVAL_S`), and once more after the close.
    Its CPU time inside the window is kept apart (:attr:`monitor_cpu_s`), so
    that it can be taken out of the other figures; the cores it takes from the
    run it watches cannot be, so a timed run leaves memory alone.

    The peak is the highest sample, so a run of a few samples can miss a peak
    that lasts less than the interval where a long run catches it: runs whose
    peaks are compared across lengths need a short interval.
    """

    def __init__(self, progress: Callable[[], int], *, memory: bool = False) -> None:
        self._progress = progress
        self._memory = memory
        self._interval_s = MEMORY_SAMPLE_INTERVAL_S if memory else SAMPLE_INTERVAL_S
        self._stop = threading.Event()
        self._lock = threading.Lock()  # held while sampling; close() waits for it
        self._thread = threading.Thread(target=self._sample_loop, daemon=True,
                                        name="shmwriter-bench-monitor")
        #: ``(seconds since the start, events handed to the file)``.
        self.progress: list[tuple[float, int]] = []
        #: ``(seconds since the start, summed PSS)``; empty without ``memory``.
        self.memory: list[tuple[float, int]] = []
        self.monitor_cpu_s = self.wall_s = 0.0
        self.baseline_nbytes = 0
        self.self_cpu_s = self.children_cpu_s = self.main_thread_cpu_s = 0.0
        self._t0 = 0.0
        self._cpu0 = (0.0, 0.0, 0.0)
        self._monitor_cpu_s = 0.0

    def open(self) -> None:
        """Take the baseline and start the clocks; call right before the start signal."""
        self.baseline_nbytes = TreeMemory().sample()
        self._cpu0 = self._cpu_now()
        self._t0 = time.monotonic()
        self._thread.start()

    def close(self) -> None:
        """Stop the clocks; call once the file is closed."""
        self.wall_s = time.monotonic() - self._t0
        with self._lock:  # not in the middle of a sample: the figures below match
            cpu = self._cpu_now()
            self.monitor_cpu_s = self._monitor_cpu_s
            self._stop.set()
        self._thread.join()
        self.self_cpu_s, self.children_cpu_s, self.main_thread_cpu_s = (
            now - before for now, before in zip(cpu, self._cpu0, strict=True))

    @property
    def t0(self) -> float:
        """Monotonic time of the start signal."""
        return self._t0

    @property
    def peak_nbytes(self) -> int | None:
        """Highest summed PSS sampled during the run (None without ``memory``)."""
        if not self._memory:
            return None
        return max([self.baseline_nbytes, *(pss for _, pss in self.memory)])

    @staticmethod
    def _cpu_now() -> tuple[float, float, float]:
        # the same figures as psutil's cpu_times(), but in ns/us instead of 10 ms clock ticks
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (time.process_time(), children.ru_utime + children.ru_stime, time.thread_time())

    def _sample_loop(self) -> None:
        start = time.thread_time()
        memory = TreeMemory()
        events = 0
        while True:
            with self._lock:
                stopping = self._stop.is_set()  # the last sample comes after the close
                try:
                    events = int(self._progress())
                except Exception:  # the writer is closing: keep the last figure
                    pass
                now = time.monotonic() - self._t0
                self.progress.append((now, events))
                if self._memory:
                    self.memory.append((now, memory.sample()))
                self._monitor_cpu_s = time.thread_time() - start
            if stopping:
                return
            self._stop.wait(self._interval_s)


class ProducerReport(NamedTuple):
    """What a spawned producer reports about its run."""

    cpu_start_s: float
    """Its CPU seconds at the start signal (start-up and building frames)."""
    began: float
    """Monotonic time it began putting."""
    done: float
    """Monotonic time its last frame was handed over."""
    cpu_end_s: float
    """Its CPU seconds at the end (its whole life, but for the interpreter's exit)."""


class _Producers:
    """Spawned producer processes that get ready, wait for the start signal, then put."""

    def __init__(self, target: Callable[..., None], arg_lists: Sequence[tuple[Any, ...]]) -> None:
        self.ready = _CTX.Semaphore(0)
        self.start = _CTX.Event()
        self.report: Any = _CTX.RawArray("d", work.REPORT_FIELDS * len(arg_lists))
        self.workers = [
            _CTX.Process(target=target, name=f"bench-producer-{row}", daemon=True,
                         args=(*args, self.ready, self.start, self.report, row))
            for row, args in enumerate(arg_lists)]
        for worker in self.workers:
            worker.start()

    def wait_ready(self) -> None:
        """Block until every producer has built its frames; raise if one died."""
        deadline = time.monotonic() + _READY_TIMEOUT_S
        ready = 0
        while ready < len(self.workers):
            if self.ready.acquire(timeout=0.5):
                ready += 1
                continue
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"producers not ready within {_READY_TIMEOUT_S} s")

    def join(self) -> None:
        """Wait for every producer; raise if one failed."""
        for worker in self.workers:
            worker.join(_JOIN_TIMEOUT_S)
        self._check_alive(finished=True)

    def rows(self) -> list[ProducerReport]:
        """Each producer's report."""
        n = work.REPORT_FIELDS
        values = list(self.report)
        return [ProducerReport(*values[n * k:n * (k + 1)]) for k in range(len(self.workers))]

    def stop(self) -> None:
        """Terminate producers still running (after a failure) and reap them all."""
        for worker in self.workers:
            if worker.is_alive():
                worker.terminate()
            worker.join(10.0)

    def _check_alive(self, finished: bool = False) -> None:
        for worker in self.workers:
            if worker.exitcode not in (None, 0) or (finished and worker.exitcode is None):
                raise RuntimeError(f"{worker.name} failed (exit code {worker.exitcode})")


@contextlib.contextmanager
def _spawned(target: Callable[..., None], arg_lists: Sequence[tuple[Any, ...]]) -> Iterator[
        _Producers]:
    producers = _Producers(target, arg_lists)
    try:
        yield producers
    finally:
        producers.stop()


# -- the writers -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    """One run to do."""

    workload: work.Workload
    frames: int
    producers: int
    filters: str
    path: Path
    write_threshold: int
    dcnum: bool = True
    """Whether the ``dcnum`` writer is dcnum's own (else the pickling fallback)."""
    batch_frames: int = 100
    """Frames per ``put_many`` call (and per block of a producer's share) when batched."""
    memory: bool = False
    """Whether the run measures memory (see :class:`Window`)."""

    def shares(self) -> list[list[int]]:
        """Frames of each producer: dealt in turn, as a pipeline's workers get them."""
        return [list(range(k, self.frames, self.producers)) for k in range(self.producers)]

    def block_shares(self) -> list[list[int]]:
        """Frames of each producer: blocks of ``batch_frames`` dealt in turn."""
        shares: list[list[int]] = [[] for _ in range(self.producers)]
        for k, at in enumerate(range(0, self.frames, self.batch_frames)):
            shares[k % self.producers].extend(range(at, min(at + self.batch_frames,
                                                            self.frames)))
        return shares

    def block_slots(self) -> int:
        """Ring slots for producers working through blocks: two blocks per producer fit.

        ``frames()`` needs a block's events in consecutive slots, at most half the
        ring; ``put_many`` gets the same ring, so the two rows compare like for like.
        """
        nevents = self.workload.frame_nevents(self.frames)
        largest = max(int(nevents[at:at + self.batch_frames].sum())
                      for at in range(0, self.frames, self.batch_frames))
        per_block = -(-largest // DEFAULT_SLOT_EVENTS)
        return max(DEFAULT_SLOTS, 2 * self.producers * per_block)

    def shmwriter_kwargs(self) -> dict[str, Any] | None:
        """shmwriter's ``hdf5_dataset_kwargs`` of the filter setting (None: its defaults)."""
        return {"compression": None} if self.filters == "uncompressed" else None

    def filter_kwargs(self) -> dict[str, Any]:
        """Complete dataset keywords of the filter setting, for dcnum and h5py."""
        if self.filters == "uncompressed":
            return {"compression": None, "fletcher32": True}
        return {**dict(hdf5plugin.Zstd(clevel=5)), "fletcher32": True}


@dataclass(frozen=True, slots=True, kw_only=True)
class Measured:
    """Raw figures of a run before the file is read back."""

    window: Window
    """The run's clocks and samples."""
    writer_cpu_s: float
    """CPU seconds of the writer alone."""
    writer_cpu_scope: str
    """What :attr:`writer_cpu_s` covers."""
    cpu_s: float
    """CPU seconds of every process involved."""
    producers_s: float | None
    """Seconds from the start signal until the last producer handed over its last frame."""
    producer_reports: tuple[ProducerReport, ...] = ()
    """What each producer reported."""
    stage_cpu_s: Mapping[str, float] = field(default_factory=dict)
    """shmwriter's CPU seconds per writer stage (``Writer.stage_cpu_s``); {} otherwise."""


def run_shmwriter(job: Job, mode: Literal["thread", "process"]) -> Measured:
    """``job`` through :class:`shmwriter.Writer` in ``mode``, with spawned producers."""
    writer = Writer(job.path, work.BENCH_SCHEMA, total_frames=job.frames, mode=mode,
                    write_threshold=job.write_threshold,
                    hdf5_dataset_kwargs=job.shmwriter_kwargs())
    return _run_writer(writer, work.put_into_ring,
                       [(job.workload, share) for share in job.shares()],
                       Window(lambda: writer.written_events, memory=job.memory))


def run_shmwriter_blocks(job: Job, way: Literal["put", "put_many", "frames"]) -> Measured:
    """``job`` through a process-mode Writer, producers working through blocks of frames:
    each frame with ``put``, each block with one ``put_many``, or each block filled in place
    with ``frames()``."""
    writer = Writer(job.path, work.BENCH_SCHEMA, total_frames=job.frames, mode="process",
                    write_threshold=job.write_threshold, slots=job.block_slots(),
                    slot_events=DEFAULT_SLOT_EVENTS, hdf5_dataset_kwargs=job.shmwriter_kwargs())
    arg_tails: list[tuple[Any, ...]]
    if way == "put":
        arg_tails = [(job.workload, share) for share in job.block_shares()]
        worker: Callable[..., None] = work.put_into_ring
    else:
        arg_tails = [(job.workload, share, job.batch_frames) for share in job.block_shares()]
        worker = work.fill_batches_in_ring if way == "frames" else work.put_batches_into_ring
    return _run_writer(writer, worker, arg_tails,
                       Window(lambda: writer.written_events, memory=job.memory))


def run_overhead(frames: int, path: Path, mode: Literal["thread", "process"],
                 batch_frames: int = 0) -> Measured:
    """One producer puts ``frames`` empty frames (``batch_frames`` per put_many, or one per
    put with 0): the descriptor path alone."""
    writer = Writer(path, work.BENCH_SCHEMA, total_frames=frames, mode=mode)
    return _run_writer(writer, work.put_empty_frames, [(frames, batch_frames)],
                       Window(lambda: writer.written_frames))


def _run_writer(writer: Writer, target: Callable[..., None],
                arg_tails: Sequence[tuple[Any, ...]], window: Window) -> Measured:
    with writer:
        arg_lists = [(writer.producer(), *tail) for tail in arg_tails]
        with _spawned(target, arg_lists) as producers:
            producers.wait_ready()
            in_process = writer.mode == "process"
            writer_cpu_before = (_cpu_of(writer.statistics().writer_pid) if in_process
                                 else 0.0)
            window.open()
            producers.start.set()
            producers.join()
    window.close()
    rows = producers.rows()
    if in_process:
        # the writer process was reaped by close(): its whole life is in the children's
        # CPU, next to the producers' whole lives (which they reported themselves)
        writer_cpu = window.children_cpu_s - sum(r.cpu_end_s for r in rows) - writer_cpu_before
        scope = "writer process"
    else:
        writer_cpu = window.self_cpu_s - window.main_thread_cpu_s - window.monitor_cpu_s
        scope = "writer threads"
    return Measured(window=window, writer_cpu_s=max(0.0, writer_cpu), writer_cpu_scope=scope,
                    cpu_s=_total_cpu(window, [r.cpu_start_s for r in rows] + [writer_cpu_before]),
                    producers_s=max(r.done for r in rows) - window.t0,
                    producer_reports=tuple(rows), stage_cpu_s=writer.stage_cpu_s)


def run_dcnum(job: Job, *, blocks: bool = False) -> Measured:
    """``job`` through dcnum's ``QueueWriterThread`` (the fallback if ``job.dcnum`` is False),
    its producers putting their frames one by one: dealt in turn, or (``blocks``) blocks of
    consecutive frames."""
    writer_class: Any = work.PicklingQueueWriter
    if job.dcnum:
        from dcnum.write import QueueWriterThread
        writer_class = QueueWriterThread
    event_queue = _CTX.Queue()
    feat_nevents: Any = _CTX.RawArray("l", job.frames)
    feat_nevents[:] = [-1] * job.frames
    write_queue_size = _CTX.Value("Q", 0, lock=_CTX.Lock())
    thread = writer_class(event_queue=event_queue, write_queue_size=write_queue_size,
                          feat_nevents=feat_nevents, path_out=job.path,
                          hdf5_dataset_kwargs=job.filter_kwargs(),
                          write_threshold=job.write_threshold)
    window = Window(lambda: int(thread.written_events.value), memory=job.memory)
    # started before the producers, as in dcnum's pipeline: it creates the file and waits
    thread.start()
    # on a failure the (daemon) thread is left waiting for frames that never come
    shares = job.block_shares() if blocks else job.shares()
    arg_lists = [(event_queue, feat_nevents, job.workload, share) for share in shares]
    with _spawned(work.put_into_queue, arg_lists) as producers:
        producers.wait_ready()
        window.open()
        producers.start.set()
        producers.join()
        thread.join(_JOIN_TIMEOUT_S)
    window.close()
    event_queue.close()
    if thread.is_alive():
        raise RuntimeError(f"{thread.name} did not finish within {_JOIN_TIMEOUT_S} s")
    rows = producers.rows()
    writer_cpu = window.self_cpu_s - window.main_thread_cpu_s - window.monitor_cpu_s
    return Measured(window=window, writer_cpu_s=max(0.0, writer_cpu),
                    writer_cpu_scope="writer threads",
                    cpu_s=_total_cpu(window, [r.cpu_start_s for r in rows]),
                    producers_s=max(r.done for r in rows) - window.t0,
                    producer_reports=tuple(rows))


def run_h5py(job: Job) -> Measured:
    """``job``'s events, all in memory, written by plain h5py with the same chunks and filters."""
    arrays = job.workload.file_arrays(job.frames)
    nevents = job.workload.frame_nevents(job.frames)
    starts = np.concatenate([[0], np.cumsum(nevents)])[::job.write_threshold].tolist()
    bounds = list(zip(starts, [*starts[1:], len(arrays["image"])], strict=True))
    written = [0]
    window = Window(lambda: written[0], memory=job.memory)
    window.open()
    with h5py.File(job.path, "w", libver="latest") as h5:
        group = h5.create_group("events")
        datasets = {}
        for name, array in arrays.items():
            shape = array.shape[1:]
            rows = chunk_rows(array.dtype.itemsize * int(np.prod(shape)))
            datasets[name] = group.create_dataset(
                name, shape=(0, *shape), maxshape=(None, *shape), chunks=(rows, *shape),
                dtype=array.dtype, **job.filter_kwargs())
        for start, stop in bounds:
            for name, dataset in datasets.items():
                dataset.resize(stop, axis=0)
                dataset.write_direct(arrays[name], np.s_[start:stop], np.s_[start:stop])
            written[0] = stop
    window.close()
    del arrays
    cpu = window.self_cpu_s - window.monitor_cpu_s
    return Measured(window=window, writer_cpu_s=cpu, writer_cpu_scope="whole process",
                    cpu_s=cpu, producers_s=None)


def _cpu_of(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _total_cpu(window: Window, children_before: Sequence[float]) -> float:
    """CPU of this process (sampler excluded) plus its children's, each since the start signal.

    Children reaped during the run add their whole life to the children's
    CPU; what they spent before the start signal (startup, building frames)
    is subtracted.
    """
    return (window.self_cpu_s - window.monitor_cpu_s + window.children_cpu_s
            - sum(children_before))


def read_back(path: Path) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    with h5py.File(path, "r") as h5:
        image = h5["events/image"]
        plist = image.id.get_create_plist()
        filters = tuple(int(plist.get_filter(i)[0]) for i in range(plist.get_nfilters()))
        return len(image), tuple(image.chunks or ()), filters


