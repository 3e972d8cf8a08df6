"""HDF5 sink: the .rtdc file, its resizable ``/events`` datasets and metadata.

The file is opened with ``libver="latest"`` and switched to SWMR mode once its
datasets exist, so readers can follow it live and a killed writer leaves a
file that opens without repair, holding every chunk flushed so far. Root
attributes cannot change in SWMR mode, so :meth:`H5Sink.close` reopens the
file briefly to set ``experiment:event count`` and to add the logs.

HDF5 filters chunks in one thread under its global lock, which makes Zstd the
bottleneck of a write. Datasets whose filters :mod:`._codec` can reproduce
(Zstd and/or fletcher32, or none) are therefore encoded here, whole HDF5
chunks at a time in a thread pool (small ones in the writing thread), and
stored with ``write_direct_chunk``; the file is the same as if HDF5 had
filtered it. The gatherer lays those features
out as stored chunks already (see :mod:`.columns` and :attr:`H5Sink.layouts`),
so no copy comes between the ring and HDF5 but the gather's. A chunk's last,
incomplete HDF5 chunk is stored too, padded with the fill value as HDF5 pads
edge chunks, so every row is in the file after each flush; the next chunk
starts with its rows and stores it again with more. Other filters go through
HDF5.

The run log (``/logs/shmwriter-run``) exists from the start, as a fixed block
of lines saying ``state=RUNNING``: a file whose writer was killed says so.
If writing fails (a full disk), the writer overwrites that block in place,
with plain file writes that need no new space, to say why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import h5py
import hdf5plugin
import numpy as np

from .._ranges import as_ranges
from .._ring.ring import State
from .._rtdc import (
    EVENT_COUNT_ATTR,
    IMAGE_ATTRS,
    LOG_LINE_LIMIT,
    MISSING_FRAMES_LOG,
    RUN_LOG,
    chunk_rows,
)
from .._spec import Schema
from .codec import ChunkCodec, codec_for, dataset_filters
from .columns import ChunkColumn, ColumnLayout
from .gather import DERIVED_DTYPES, FRAME_INDEX_FEATURES, Chunk, frame_bounds
from .recover import discard_further_writes, make_readable
from .run import run_log_lines

__all__ = ["EncodedChunk", "H5Sink", "create_event_dataset", "dataset_kwargs",
           "seal_killed_file"]

logger = logging.getLogger(__name__)

#: The run log's block while the run goes on: lines of at most dclab's 100 characters.
_RUN_LOG_LINES, _RUN_LOG_LINE_NBYTES = 16, LOG_LINE_LIMIT
#: Encoded chunks in flight per encoder thread.
_WINDOW_PER_WORKER = 4
#: Stored chunks up to this size are encoded in the writing thread: handing one to the pool
#: and back costs more than encoding it (a scalar feature's chunk of 1,000 rows is 4-8 KB).
_INLINE_NBYTES = 16 * 1024


def dataset_kwargs(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Dataset creation keywords: Zstd level 5 and fletcher32 unless overridden."""
    kwargs = dict(overrides or {})
    if "compression" not in kwargs:
        for key, value in dict(hdf5plugin.Zstd(clevel=5)).items():
            kwargs.setdefault(key, value)
    kwargs.setdefault("fletcher32", True)
    for reserved in ("shape", "dtype", "maxshape", "data"):
        if reserved in kwargs:
            raise ValueError(f"hdf5_dataset_kwargs must not set {reserved!r}; the writer does")
    return kwargs


def create_event_dataset(group: h5py.Group, name: str, shape: tuple[int, ...],
                         dtype: np.dtype[Any], kwargs: Mapping[str, Any]) -> h5py.Dataset:
    """Create the empty, resizable per-event dataset ``group/name`` as .rtdc files have it.

    One event is ``shape`` of ``dtype``; chunks hold :func:`chunk_rows` events;
    2-D features (images, masks) get the HDF5 image attributes. ``kwargs`` are
    the filters (see :func:`dataset_kwargs`). The Writer's sink and the dcnum
    drop-in both create their datasets here.
    """
    rows = chunk_rows(dtype.itemsize * int(np.prod(shape)))
    dataset = group.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape),
                                   chunks=(rows, *shape), dtype=dtype, **kwargs)
    if len(shape) == 2:
        for key, value in IMAGE_ATTRS.items():
            dataset.attrs.create(key, np.bytes_(value))
    return dataset


@dataclass(frozen=True, slots=True)
class EncodedChunk:
    """One HDF5 chunk as a dataset stores it (what ``read_direct_chunk`` gives)."""

    filter_mask: int
    """The filters HDF5 skipped for it (a bit per filter; 0 for none)."""
    data: bytes | memoryview
    """Its bytes, filtered."""


class H5Sink:
    """Appends chunks of events to an .rtdc file. Owns the open h5py file.

    The sink also owns a pool of encoder threads (one per CPU) when any
    dataset's filters can be applied outside HDF5; :meth:`close` and
    :meth:`abandon` shut it down.

    Parameters
    ----------
    path
        File to create (an existing one is replaced).
    schema
        Features of the events.
    derived
        Per-event features the writer adds (see ``DERIVED_DTYPES``).
    hdf5_dataset_kwargs
        Overrides of the dataset creation keywords (see :func:`dataset_kwargs`).
    metadata
        ``{"section:key": value}`` written as root attributes.
    feature_kwargs
        Creation keywords of single features, each taken instead of
        ``hdf5_dataset_kwargs`` (a merge creates every feature as its parts have it).
    """

    _file: h5py.File | None = None
    _pool: ThreadPoolExecutor | None = None
    _window = 0
    _run_log_offset: int | None = None

    def __init__(self, path: str | os.PathLike[str], schema: Schema, derived: tuple[str, ...],
                 hdf5_dataset_kwargs: Mapping[str, Any] | None,
                 metadata: Mapping[str, Any] | None, *,
                 feature_kwargs: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.path = os.fspath(path)
        self.nevents = 0
        #: CPU nanoseconds of this sink's writes (HDF5, in the writing thread) and of its
        #: encoder threads (checksums and compression).
        self.write_cpu_ns = self.encode_cpu_ns = 0
        self._kwargs = dataset_kwargs(hdf5_dataset_kwargs)
        self._file = h5py.File(self.path, "w", libver="latest")
        try:
            _write_metadata(self._file, metadata or {})
            events = self._file.create_group("events")
            shapes = {name: (f.shape, f.file_dtype) for name, f in schema.items()}
            shapes.update({name: ((), DERIVED_DTYPES[name]) for name in derived})
            own = {name: dataset_kwargs(kwargs) for name, kwargs in (feature_kwargs or {}).items()}
            self._datasets = {name: create_event_dataset(events, name, shape, dtype,
                                                         own.get(name, self._kwargs))
                              for name, (shape, dtype) in shapes.items()}
            self._codecs = _codecs(self._datasets)
            #: Each feature's column layout: stored chunks where the sink encodes them.
            self.layouts = {name: _layout(dataset, name in self._codecs)
                            for name, dataset in self._datasets.items()}
            if self._codecs:
                workers = _cpu_count()
                self._window = _WINDOW_PER_WORKER * workers
                self._pool = ThreadPoolExecutor(max_workers=workers,
                                                thread_name_prefix="shmwriter-encode")
            self._run_log_offset = _reserve_run_log(self._file)
            self._file.swmr_mode = True
        except BaseException:
            self._shutdown_pool()
            self._file.close()
            raise

    def write(self, chunk: Chunk) -> None:
        """Append ``chunk`` to every dataset and flush, so live readers see it."""
        if self._file is None:
            raise ValueError(f"cannot write to the closed file {self.path!r}")
        started = time.thread_time_ns()
        try:
            self._write(chunk)
        finally:
            self.write_cpu_ns += time.thread_time_ns() - started

    def _write(self, chunk: Chunk) -> None:
        assert self._file is not None
        if chunk.nevents:
            self._check(chunk)
            start, stop = self.nevents, self.nevents + chunk.nevents
            with self._encoding(self._jobs(chunk.columns)) as encoded:
                # the pool encodes while HDF5 extends the datasets, which direct chunk
                # writes need first
                for dataset in self._datasets.values():
                    dataset.resize(stop, axis=0)
                for name, dataset in self._datasets.items():
                    if name not in self._codecs:  # HDF5 filters these while the pool works
                        column = chunk.columns[name]
                        dataset.write_direct(column.values(column.carried),
                                             dest_sel=np.s_[start:stop])
                encoded.store()
            self.nevents = stop
        self._file.flush()

    def _check(self, chunk: Chunk) -> None:
        """Raise ValueError unless ``chunk`` continues the file in this sink's layouts."""
        if chunk.first_row != self.nevents:
            raise ValueError(f"the chunk starts at row {chunk.first_row}, but the file has "
                             f"{self.nevents} events")
        for name, layout in self.layouts.items():
            column = chunk.columns.get(name)
            if column is None or column.layout != layout:
                raise ValueError(f"the chunk's column {name!r} is not laid out as {layout}; "
                                 f"gather with H5Sink.layouts")

    def _jobs(self, columns: Mapping[str, ChunkColumn]) -> list[_Job]:
        """The stored chunks of the encoded datasets, ready to encode: the pool's first, so
        that it has work from the start whatever the schema's order of features (the small
        ones, encoded in the writing thread, would take its places in the window)."""
        jobs: list[_Job] = []
        for name, codec in self._codecs.items():
            dataset = self._datasets[name]
            zeros = (0,) * (dataset.ndim - 1)
            jobs += [(dataset, (row, *zeros), codec, data)
                     for row, data in columns[name].stored_chunks()]
        jobs.sort(key=lambda job: _encoded_inline(job[3]))  # stable: file order otherwise
        return jobs

    def filters(self, name: str) -> list[tuple[int, tuple[int, ...]]]:
        """``(filter id, cd_values)`` of the dataset ``name``'s pipeline, as HDF5 set it."""
        return dataset_filters(self._datasets[name])

    def stored_layout(self, name: str) -> ColumnLayout:
        """The layout of the chunks :meth:`store` takes for the dataset ``name``: stored
        chunks, whoever applies its filters."""
        return replace(self.layouts[name], chunk_rows=self._datasets[name].chunks[0])

    def resize(self, nevents: int) -> None:
        """Make every dataset ``nevents`` rows long, for :meth:`store` to fill."""
        if self._file is None:
            raise ValueError(f"cannot resize the closed file {self.path!r}")
        for dataset in self._datasets.values():
            dataset.resize(nevents, axis=0)
        self.nevents = nevents

    def store(self, name: str,
              chunks: Iterable[tuple[int, np.ndarray[Any, Any] | EncodedChunk]]) -> None:
        """Store whole HDF5 chunks of the dataset ``name``, within the rows of :meth:`resize`.

        Parameters
        ----------
        name
            The feature.
        chunks
            ``(first row, chunk)``, each row a multiple of the dataset's chunk
            rows. A chunk is either an :class:`EncodedChunk` from a dataset with
            the same filters and chunks, stored as it is, or the bytes of a stored
            chunk in :meth:`stored_layout` (as ``ChunkColumn.stored_chunks``
            gives them: rows past the last event padded), which the sink
            filters: in its encoder pool where it can, else through HDF5. The
            iterable is consumed lazily, a few chunks ahead of the writes.
        """
        if self._file is None:
            raise ValueError(f"cannot write to the closed file {self.path!r}")
        dataset, codec = self._datasets[name], self._codecs.get(name)
        started = time.thread_time_ns()
        try:
            if codec is None:
                self._store_through_hdf5(dataset, self.stored_layout(name), chunks)
                return
            zeros = (0,) * (dataset.ndim - 1)
            with self._encoding((dataset, (row, *zeros), codec, chunk)
                                for row, chunk in chunks) as encoded:
                encoded.store()
        finally:
            self.write_cpu_ns += time.thread_time_ns() - started

    @contextlib.contextmanager
    def _encoding(self, jobs: Iterable[_Job]) -> Iterator[_EncodeWindow]:
        """``jobs`` encoded in the pool, a few ahead of their writes; those not started
        are cancelled if the body fails, and the pool's CPU time is counted either way."""
        encoded = _EncodeWindow(self._pool, jobs, self._window)
        try:
            encoded.start()
            yield encoded
        except BaseException:
            encoded.cancel()
            raise
        finally:
            self.encode_cpu_ns += encoded.cpu_ns
            self.write_cpu_ns -= encoded.inline_cpu_ns  # the writing thread's, counted there

    def _store_through_hdf5(self, dataset: h5py.Dataset, layout: ColumnLayout,
                            chunks: Iterable[tuple[int, np.ndarray[Any, Any] | EncodedChunk]],
                            ) -> None:
        """:meth:`store` for a dataset whose filters only HDF5 applies."""
        assert layout.chunk_rows is not None
        zeros = (0,) * (dataset.ndim - 1)
        for row, chunk in chunks:
            if isinstance(chunk, EncodedChunk):
                dataset.id.write_direct_chunk((row, *zeros), chunk.data, chunk.filter_mask)
                continue
            rows = min(layout.chunk_rows, self.nevents - row)  # an edge chunk's rows
            values = chunk[:rows * layout.event_nbytes].view(layout.dtype)
            dataset.write_direct(values.reshape(rows, *layout.shape),
                                 dest_sel=np.s_[row:row + rows])

    def close(self, *, missing_frames: Sequence[int] = (),
              logs: Mapping[str, Sequence[str]] | None = None) -> None:
        """Close the file, then set the event count and add logs. Idempotent."""
        if self._file is None:
            return
        self._shutdown_pool()
        file, self._file = self._file, None
        file.close()
        all_logs = dict(logs or {})
        if missing_frames:  # one line per range: a gap of a million frames is one line
            all_logs[MISSING_FRAMES_LOG] = as_ranges(missing_frames).lines()
        run_log = all_logs.pop(RUN_LOG, None)
        with h5py.File(self.path, "a") as h5:
            h5.attrs[EVENT_COUNT_ATTR] = np.int64(self.nevents)
            for name, lines in all_logs.items():
                _write_log(h5, name, lines)
            if run_log is not None:  # last: until it is replaced, the reserved block can
                _write_log(h5, RUN_LOG, run_log)  # still take a failure (record_failure)

    def abandon(self, run_log: Sequence[str] = ()) -> None:
        """Close the file after a failure, keeping what was flushed.

        ``run_log`` (at most 16 lines of 100 bytes) replaces the run log's
        ``state=RUNNING`` block in place, so the file tells why it ends early.
        """
        self._shutdown_pool()
        if self._file is not None:
            file, self._file = self._file, None
            # HDF5 cannot close a file whose writes fail and may crash the
            # process later; let its last writes go to /dev/null instead
            discard_further_writes(file.id.get_vfd_handle())
            try:
                file.close()
            except Exception:  # the failure is reported already; the flushed data stays
                logger.debug("closing %s after a failure", self.path, exc_info=True)
        if run_log:
            self.record_failure(run_log)

    def record_failure(self, run_log: Sequence[str]) -> None:
        """Write ``run_log`` over the run log's reserved block, in place (no new space needed).

        Only once the file is closed (after :meth:`abandon`, or a :meth:`close` that failed).
        """
        if self._run_log_offset is None or self._file is not None:
            return
        try:
            _overwrite_run_log(self.path, self._run_log_offset, run_log)
        except OSError as exc:
            logger.warning("could not record the failure in %s: %s", self.path, exc)

    def _shutdown_pool(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=True, cancel_futures=True)

    def __repr__(self) -> str:
        state = "closed" if self._file is None else "open"
        return f"<H5Sink {self.path!r} ({state}, {self.nevents} events)>"


#: One chunk to store: its dataset, chunk offset, codec, and its stored chunk's bytes to
#: encode or the chunk encoded already.
_Job = tuple[h5py.Dataset, tuple[int, ...], ChunkCodec, np.ndarray[Any, Any] | EncodedChunk]


class _EncodeWindow:
    """Encodes jobs in the pool, a few ahead of the caller, yielding them in order.

    At most ``window`` jobs are in flight, which keeps the workers busy while
    bounding the encoded bytes held in memory. Chunks encoded already pass
    through in their place; chunks of at most ``_INLINE_NBYTES`` are encoded
    in the caller's thread as they are handed out.
    """

    def __init__(self, pool: ThreadPoolExecutor | None, jobs: Iterable[_Job],
                 window: int) -> None:
        self._pool, self._jobs = pool, iter(jobs)
        self._pending: deque[tuple[h5py.Dataset, tuple[int, ...],
                                   Future[tuple[EncodedChunk, int]]]]
        self._pending = deque()
        #: CPU nanoseconds spent encoding the jobs handed out so far.
        self.cpu_ns = 0
        #: The part of :attr:`cpu_ns` spent in the caller's thread, on small chunks.
        self.inline_cpu_ns = 0
        self._window = window

    def start(self) -> None:
        """Hand out the first ``window`` jobs."""
        for _ in range(self._window):
            if not self._submit_next():
                break

    def _submit_next(self) -> bool:
        job = next(self._jobs, None)
        if job is None or self._pool is None:
            return False
        dataset, offset, codec, chunk = job
        if isinstance(chunk, EncodedChunk):
            future = _completed(chunk)
        elif _encoded_inline(chunk):
            encoded, cpu_ns = _encode_timed(codec, chunk)
            self.cpu_ns += cpu_ns
            self.inline_cpu_ns += cpu_ns
            future = _completed(encoded)
        else:
            future = self._pool.submit(_encode_timed, codec, chunk)
        self._pending.append((dataset, offset, future))
        return True

    def __iter__(self) -> Iterator[tuple[h5py.Dataset, tuple[int, ...], EncodedChunk]]:
        while self._pending:
            dataset, offset, future = self._pending.popleft()
            data, cpu_ns = future.result()
            self.cpu_ns += cpu_ns
            self._submit_next()
            yield dataset, offset, data

    def store(self) -> None:
        """Store each chunk, in order, as soon as it is encoded."""
        for dataset, offset, stored in self:
            dataset.id.write_direct_chunk(offset, stored.data, stored.filter_mask)

    def cancel(self) -> None:
        """Cancel the jobs not started yet (after a failure)."""
        for _, _, future in self._pending:
            future.cancel()
        self._pending.clear()


def _completed(encoded: EncodedChunk) -> Future[tuple[EncodedChunk, int]]:
    """A future holding ``encoded``, its CPU counted already (it takes a place in line)."""
    future: Future[tuple[EncodedChunk, int]] = Future()
    future.set_result((encoded, 0))
    return future


def _encoded_inline(chunk: np.ndarray[Any, Any] | EncodedChunk) -> bool:
    """Whether the writing thread encodes ``chunk`` itself (see ``_INLINE_NBYTES``)."""
    return isinstance(chunk, np.ndarray) and chunk.nbytes <= _INLINE_NBYTES


def _encode_timed(codec: ChunkCodec, stored: np.ndarray[Any, Any]) -> tuple[EncodedChunk, int]:
    """``codec.encode_stored(stored)`` and the CPU nanoseconds it took (in the encoder
    thread)."""
    started = time.thread_time_ns()
    data = codec.encode_stored(stored)
    return EncodedChunk(0, data), time.thread_time_ns() - started


def _codecs(datasets: Mapping[str, h5py.Dataset]) -> dict[str, ChunkCodec]:
    """Codecs of the datasets whose filters the codec reproduces."""
    shared: dict[ChunkCodec, ChunkCodec] = {}
    codecs = {}
    for name, dataset in datasets.items():
        codec = codec_for(dataset)
        if codec is not None:
            # equal codecs share one, so each thread holds one Zstd context (~4 MB) per level
            codecs[name] = shared.setdefault(codec, codec)
    return codecs


def _layout(dataset: h5py.Dataset, stored: bool) -> ColumnLayout:
    """How the gatherer lays out ``dataset``'s rows: as stored chunks, or plain."""
    chunk_rows = dataset.chunks[0] if stored else None
    return ColumnLayout(tuple(dataset.shape[1:]), dataset.dtype, chunk_rows, dataset.fillvalue)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def _write_metadata(h5: h5py.File, metadata: Mapping[str, Any]) -> None:
    for key, value in metadata.items():
        if not isinstance(key, str) or key.count(":") != 1:
            raise ValueError(f"metadata keys must look like 'section:key'; got {key!r}")
        h5.attrs[key] = value


def _run_log_block(lines: Sequence[str]) -> np.ndarray[Any, Any]:
    """The run log's fixed block: ``lines`` cut to 100 bytes each, padded to 16 lines."""
    block = np.zeros(_RUN_LOG_LINES, dtype=f"S{_RUN_LOG_LINE_NBYTES}")
    for i, line in enumerate(list(lines)[:_RUN_LOG_LINES]):
        block[i] = line.encode("utf-8")[:_RUN_LOG_LINE_NBYTES]
    return block


def _reserve_run_log(h5: h5py.File) -> int | None:
    """Create the run log as a contiguous block saying the run goes on; return its offset."""
    dataset = h5.require_group("logs").create_dataset(RUN_LOG,
                                                      data=_run_log_block(["state=RUNNING"]))
    h5.flush()
    offset = dataset.id.get_offset()
    return None if offset is None else int(offset)


def _overwrite_run_log(path: str, offset: int, lines: Sequence[str]) -> None:
    """Write ``lines`` over the run log's block: no new blocks, so it works on a full disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, _run_log_block(lines).tobytes(), offset)
    finally:
        os.close(fd)


def _write_log(h5: h5py.File, name: str, lines: Sequence[str]) -> None:
    logs = h5.require_group("logs")
    if name in logs:
        del logs[name]
    encoded = [line.encode("utf-8") for line in lines] or [b""]
    logs.create_dataset(name, data=np.array(encoded, dtype=f"S{max(map(len, encoded)) or 1}"))


def seal_killed_file(path: str, *, total_frames: int, logs: Mapping[str, Sequence[str]],
                     reason: str) -> int:
    """Close the file of a writer killed mid-run as an aborted run's file; return its frames
    done (-1 if its writer had closed it).

    A file its writer closed (its run log says DONE or ABORTED) is left as it is.
    Otherwise the file keeps its frames up to the last whole one of its last flush: a frame
    whose rows did not all reach every feature is cut. Then it gets what the
    writer would have added on close: the event count, ``logs`` and a run log
    saying ABORTED for ``reason``, with the frames after those kept not done.
    Frames missing before the last flush cannot be told from frames without
    events (the missing-frames log is written on close): they count as done.

    BEWARE: only call this when the writer is known to be dead.
    """
    make_readable(path)
    with h5py.File(path, "r+") as h5:
        state = _run_state(h5)
        if state in (State.DONE.name, State.ABORTED.name):
            return -1
        events = h5["events"]
        rows = min((len(d) for d in events.values()), default=0)
        frame_index = next((events[n] for n in FRAME_INDEX_FEATURES
                            if n in events and events[n].dtype == DERIVED_DTYPES[n]), None)
        kept, frames_done, written = 0, 0, 0
        if "nevents" in events and frame_index is not None and rows:
            nevents, frames = events["nevents"][:rows], frame_index[:rows]
            starts = frame_bounds(nevents)[:-1]
            last = starts[-1]  # the last frame is whole if all its rows are there
            whole = starts if last + max(int(nevents[last]), 1) <= rows else starts[:-1]
            if whole:
                kept = whole[-1] + max(int(nevents[whole[-1]]), 1)
                frames_done, written = int(frames[whole[-1]]) + 1, len(whole)
        for dataset in events.values():
            dataset.resize(kept, axis=0)
        h5.attrs[EVENT_COUNT_ATTR] = np.int64(kept)
        for name, lines in logs.items():
            _write_log(h5, name, lines)
        _write_log(h5, RUN_LOG, run_log_lines(
            state=State.ABORTED, total_frames=total_frames, frames_done=frames_done,
            written_frames=written, missing_frames=total_frames - frames_done,
            rejected_frames=0, reason=reason))
    return frames_done


def _run_state(h5: h5py.File) -> str | None:
    """The ``state=`` of a file's run log (None if it has none)."""
    if RUN_LOG not in h5.get("logs", {}):
        return None
    lines = [bytes(line).decode("utf-8", "replace") for line in h5["logs"][RUN_LOG][:]]
    return next((line[len("state="):] for line in lines if line.startswith("state=")), None)
