"""The benchmark's workload and the code its spawned producers run.

The workload is built from a small pool of real events (or synthetic ones)
and repeats with a period of :data:`PERIOD_FRAMES` frames: the events of frame
``f`` are those of template ``f % PERIOD_FRAMES``. Each producer builds the
templates of its frames before the start signal, so the measured time holds
no generation cost, and its memory stays small however many frames a run has.
Events cycle through the pool in order, so consecutive events (and the events
of one HDF5 chunk) are different images, as in a real measurement.

This module also holds the pickling writer the benchmark falls back to when
dcnum is not installed; it works like dcnum's ``QueueWriterThread``.
"""

from __future__ import annotations

import logging
import multiprocessing.sharedctypes
import os
import queue
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from multiprocessing.synchronize import Event, Semaphore
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .._rtdc import chunk_rows
from .._spec import Feature, Schema
from ..producer import Producer

__all__ = ["BENCH_SCHEMA", "PERIOD_FRAMES", "PicklingQueueWriter", "Workload",
           "load_workload"]

logger = logging.getLogger(__name__)

HEIGHT, WIDTH = 80, 250
SCALARS = ("area_cvx", "area_msd", "area_ratio", "area_um", "aspect", "bright_avg",
           "bright_sd", "circ", "deform", "eccentr_prnc", "inert_ratio_cvx",
           "inert_ratio_prnc", "inert_ratio_raw", "per_ratio", "per_um_raw", "pos_x",
           "pos_y", "size_x", "size_y", "volume")
#: Frames after which the workload repeats.
PERIOD_FRAMES = 240
_START_TIMEOUT_S = 600.0
_MIN_SYNTHETIC_EVENTS = 64

#: One event: a uint8 80x250 image, its boolean mask and 20 float64 scalars (40,160 bytes).
BENCH_SCHEMA = Schema({
    "image": Feature("uint8", (HEIGHT, WIDTH)),
    "mask": Feature("bool", (HEIGHT, WIDTH)),
    **{name: Feature("float64") for name in SCALARS},
})

Events = dict[str, np.ndarray[Any, Any]]


class Workload:
    """The events of every frame, derived from a pool of images and masks and a seed.

    Parameters
    ----------
    images, masks
        The pool: ``(n, 80, 250)`` uint8 images and boolean masks, ``n >= 1``.
    source
        Where the pool came from, for the report.
    seed
        Seed of the event counts and the scalar features.
    """

    def __init__(self, images: np.ndarray[Any, Any], masks: np.ndarray[Any, Any], source: str,
                 seed: int = 42) -> None:
        shape = (HEIGHT, WIDTH)
        if images.ndim != 3 or images.shape[1:] != shape or images.dtype != np.uint8 \
                or len(images) == 0:
            raise ValueError(f"images must be a non-empty (n, {HEIGHT}, {WIDTH}) uint8 array; "
                             f"got {images.dtype} {images.shape}")
        if masks.shape != images.shape or masks.dtype != bool:
            raise ValueError(f"masks must be a bool array of shape {images.shape}; "
                             f"got {masks.dtype} {masks.shape}")
        self.images, self.masks, self.source, self.seed = images, masks, source, seed
        counts = np.random.default_rng(seed).integers(0, 4, PERIOD_FRAMES)
        self.template_nevents = counts.astype(np.int64)
        self._first_event = np.concatenate([[0], np.cumsum(counts)[:-1]])

    def frame_nevents(self, frames: int) -> np.ndarray[Any, Any]:
        """Events of each of the frames ``0 .. frames - 1``."""
        return self.template_nevents[np.arange(frames) % PERIOD_FRAMES]

    def template(self, index: int) -> Events | None:
        """The events of template ``index`` (None when it has none)."""
        nevents = int(self.template_nevents[index])
        if nevents == 0:
            return None
        pool = (self._first_event[index] + np.arange(nevents)) % len(self.images)
        rng = np.random.default_rng([self.seed, index])
        events: Events = {"image": self.images[pool], "mask": self.masks[pool]}
        for name in SCALARS:
            events[name] = rng.uniform(0.0, 100.0, nevents)
        return events

    def templates_for(self, frames: Iterable[int]) -> dict[int, Events | None]:
        """The templates ``frames`` need, by template index."""
        return {t: self.template(t) for t in sorted({f % PERIOD_FRAMES for f in frames})}

    def file_arrays(self, frames: int) -> dict[str, np.ndarray[Any, Any]]:
        """Every event of ``frames`` frames as the file stores them, with ``frame`` and ``nevents``.

        Masks are uint8 0/255, as in an .rtdc file.
        """
        templates = self.templates_for(range(min(frames, PERIOD_FRAMES)))
        present = [t for t in (f % PERIOD_FRAMES for f in range(frames))
                   if templates[t] is not None]
        arrays = {name: np.concatenate([templates[t][name] for t in present])  # type: ignore[index]
                  for name in BENCH_SCHEMA}
        arrays["mask"] = arrays["mask"].view(np.uint8) * np.uint8(255)
        nevents = self.frame_nevents(frames)
        arrays["frame"] = np.repeat(np.arange(frames), nevents).astype(np.uint32)
        arrays["nevents"] = np.repeat(nevents, nevents).astype(np.uint32)
        return arrays


def load_workload(data_dir: str | Path | None, seed: int = 42) -> Workload:
    """The workload from the real events in ``data_dir``'s zip files, or synthetic events.

    Real events are the ``image``/``mask`` pairs of every .rtdc file inside
    the zip files, cropped (around the cell) or padded to 80x250.
    """
    if data_dir is not None and Path(data_dir).is_dir():
        found = _real_events(sorted(Path(data_dir).glob("*.zip")))
        if found is not None:
            images, masks, files = found
            return Workload(images, masks, seed=seed,
                            source=f"real: {len(images)} events of {files} .rtdc files in "
                                   f"{data_dir}")
        logger.warning("no .rtdc file with image and mask in %s; using synthetic events",
                       data_dir)
    images, masks = _synthetic_events(seed)
    return Workload(images, masks, seed=seed,
                    source=f"synthetic: {len(images)} events of shmwriter.ops.demo.demo_events")


def _real_events(zips: Sequence[Path]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any],
                                                  int] | None:
    images: list[np.ndarray[Any, Any]] = []
    masks: list[np.ndarray[Any, Any]] = []
    files = 0
    with tempfile.TemporaryDirectory(prefix="shmwriter-bench-") as tmp:
        for archive in zips:
            with zipfile.ZipFile(archive) as zf:
                for member in zf.namelist():
                    if member.endswith(".rtdc"):
                        zf.extract(member, tmp)
        for path in sorted(Path(tmp).rglob("*.rtdc")):
            with h5py.File(path, "r") as h5:
                events = h5.get("events")
                if events is None or "image" not in events or "mask" not in events:
                    continue
                files += 1
                for image, mask in zip(events["image"][:], events["mask"][:], strict=True):
                    fitted = _fit(image, mask > 0)
                    images.append(fitted[0])
                    masks.append(fitted[1])
    if not images:
        return None
    return np.stack(images), np.stack(masks), files


def _fit(image: np.ndarray[Any, Any], mask: np.ndarray[Any, Any]) -> tuple[
        np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Crop (keeping the cell) or pad (edge values, empty mask) one event to 80x250."""
    columns = np.flatnonzero(mask.any(axis=0))
    for axis, size in ((0, HEIGHT), (1, WIDTH)):
        extent = image.shape[axis]
        if extent > size:
            centre = extent // 2
            if axis == 1 and columns.size:
                centre = int(columns.mean())
            start = min(max(0, centre - size // 2), extent - size)
            image = np.take(image, range(start, start + size), axis=axis)
            mask = np.take(mask, range(start, start + size), axis=axis)
        elif extent < size:
            pad = [(0, 0), (0, 0)]
            pad[axis] = ((size - extent) // 2, size - extent - (size - extent) // 2)
            image = np.pad(image, pad, mode="edge")
            mask = np.pad(mask, pad, mode="constant", constant_values=False)
    return np.ascontiguousarray(image, np.uint8), np.ascontiguousarray(mask, bool)


def _synthetic_events(seed: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    from ..ops.demo import demo_events
    images: list[np.ndarray[Any, Any]] = []
    masks: list[np.ndarray[Any, Any]] = []
    frame = 0
    while len(images) < _MIN_SYNTHETIC_EVENTS:
        events = demo_events(frame, seed)
        frame += 1
        if events is not None:
            images.extend(events["image"])
            masks.extend(events["mask"])
    return np.stack(images), np.stack(masks)


# -- spawned producers -----------------------------------------------------------------------
# Every producer reports four numbers into its row of a shared array: its CPU
# seconds (all threads of the process) at the start signal, the monotonic
# times its first frame began and its last frame was handed over, and its CPU
# seconds at the end.
REPORT_FIELDS = 4


def _wait_for_start(ready: Semaphore, start: Event) -> tuple[float, float]:
    ready.release()
    if not start.wait(_START_TIMEOUT_S):
        raise TimeoutError(f"no start signal within {_START_TIMEOUT_S} s")
    return time.process_time(), time.monotonic()


def _report_and_exit(report: Any, row: int, started: tuple[float, float], done: float) -> None:
    """Report, then end the process at once.

    Skipping the interpreter's exit makes the CPU the parent adds up for this
    child exactly what it reported, so what remains of the children's CPU is
    the writer process's. Everything this worker owned is closed already.
    """
    report[REPORT_FIELDS * row: REPORT_FIELDS * (row + 1)] = [*started, done,
                                                              time.process_time()]
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def put_into_ring(producer: Producer, workload: Workload, frames: list[int], ready: Semaphore,
                  start: Event, report: Any, row: int) -> None:
    """Worker: put ``frames`` through a shmwriter producer as fast as it goes."""
    templates = workload.templates_for(frames)
    started = _wait_for_start(ready, start)
    with producer:
        for frame in frames:
            producer.put(frame, templates[frame % PERIOD_FRAMES])
    _report_and_exit(report, row, started, time.monotonic())


def put_batches_into_ring(producer: Producer, workload: Workload, frames: list[int],
                          batch: int, ready: Semaphore, start: Event, report: Any,
                          row: int) -> None:
    """Worker: put ``frames`` through ``Producer.put_many``, ``batch`` frames a call.

    Its share is blocks of consecutive frames, the way pipelines hand out work;
    the batches are built before the start signal, like the other workers' frames.
    """
    blocks = _built_blocks(workload, frames, batch)
    started = _wait_for_start(ready, start)
    with producer:
        for block, counts, events in blocks:
            producer.put_many(block, counts, events)
    _report_and_exit(report, row, started, time.monotonic())


def fill_batches_in_ring(producer: Producer, workload: Workload, frames: list[int],
                         batch: int, ready: Semaphore, start: Event, report: Any,
                         row: int) -> None:
    """Worker: fill blocks of ``batch`` frames in place with ``Producer.frames``.

    The events are written straight into the ring's arrays (here copied from
    batches built before the start signal; a segmenter would compute them there).
    """
    blocks = _built_blocks(workload, frames, batch)
    started = _wait_for_start(ready, start)
    with producer:
        for block, counts, events in blocks:
            with producer.frames(block, counts) as arrays:
                for name, values in (events or {}).items():
                    np.copyto(arrays[name], values)
    _report_and_exit(report, row, started, time.monotonic())


def _built_blocks(workload: Workload, frames: list[int], batch: int,
                  ) -> list[tuple[list[int], list[int], Events | None]]:
    """``frames`` cut into blocks of ``batch``, each with its event counts and its events
    concatenated; blocks that repeat the workload's period share their arrays."""
    blocks = [frames[at:at + batch] for at in range(0, len(frames), batch)]
    built: dict[tuple[int, int], tuple[list[int], Events | None]] = {}
    for block in blocks:
        key = (block[0] % PERIOD_FRAMES, len(block))
        if key not in built:
            built[key] = _batch_events(workload, block)
    return [(block, *built[(block[0] % PERIOD_FRAMES, len(block))]) for block in blocks]


def _batch_events(workload: Workload, frames: list[int]) -> tuple[list[int], Events | None]:
    """Event counts and concatenated events of ``frames``, for put_many."""
    templates = workload.templates_for(frames)
    parts = [templates[frame % PERIOD_FRAMES] for frame in frames]
    counts = [0 if part is None else len(part["image"]) for part in parts]
    present = [part for part in parts if part is not None]
    if not present:
        return counts, None
    return counts, {name: np.concatenate([part[name] for part in present])
                    for name in present[0]}


def put_into_queue(event_queue: Any, feat_nevents: Any, workload: Workload, frames: list[int],
                   ready: Semaphore, start: Event, report: Any, row: int) -> None:
    """Worker: put ``frames`` into an mp.Queue the way dcnum's extractors do.

    Each frame is a fresh dict of fresh arrays, as an extractor makes them, so
    a backlog in the queue costs the memory it costs in dcnum.
    """
    templates = workload.templates_for(frames)
    started = _wait_for_start(ready, start)
    for frame in frames:
        events = templates[frame % PERIOD_FRAMES]
        if events is None:
            feat_nevents[frame] = 0
            event_queue.put((frame, {}))
        else:
            feat_nevents[frame] = len(events["image"])
            event_queue.put((frame, {name: array.copy() for name, array in events.items()}))
    done = time.monotonic()
    event_queue.close()
    event_queue.join_thread()  # the feeder thread's pickling belongs to the run
    _report_and_exit(report, row, started, done)


def put_empty_frames(producer: Producer, frames: int, batch_frames: int, ready: Semaphore,
                     start: Event, report: Any, row: int) -> None:
    """Worker: put ``frames`` frames without events (the descriptor path alone), one by one
    or ``batch_frames`` per ``put_many``."""
    started = _wait_for_start(ready, start)
    with producer:
        if batch_frames:
            for first in range(0, frames, batch_frames):
                block = range(first, min(first + batch_frames, frames))
                producer.put_many(block, [0] * len(block), None)
        else:
            for frame in range(frames):
                producer.put(frame, None)
        done = time.monotonic()
    _report_and_exit(report, row, started, done)


# -- the fallback writer ---------------------------------------------------------------------
class PicklingQueueWriter(threading.Thread):
    """Writes ``(frame, events)`` items of an mp.Queue in frame order, like dcnum's writer.

    Used when dcnum is not installed. It takes the same arguments as dcnum's
    ``QueueWriterThread`` and does the same work: wait until the next
    ``write_threshold`` frames are known in ``feat_nevents``, take their items
    from the queue (unpickling them), put them in frame order, concatenate
    each feature, and append the block to the file in a second thread.

    Parameters
    ----------
    event_queue
        Items ``(frame_index, {feature: array})`` (``{}`` for no events).
    write_queue_size
        An mp.Value set to the blocks waiting for the disk.
    feat_nevents
        Shared array of events per frame, -1 until the frame is processed.
    path_out
        The file to create.
    hdf5_dataset_kwargs
        Dataset creation keywords (filters).
    write_threshold
        Frames per block.
    """

    def __init__(self, event_queue: Any, write_queue_size: Any, feat_nevents: Any,
                 path_out: Path, hdf5_dataset_kwargs: Mapping[str, Any] | None = None,
                 write_threshold: int = 500) -> None:
        super().__init__(name="PicklingQueueWriter", daemon=True)
        self.event_queue, self.write_queue_size = event_queue, write_queue_size
        self.feat_nevents, self.path_out = feat_nevents, Path(path_out)
        self.kwargs = dict(hdf5_dataset_kwargs or {})
        self.write_threshold = write_threshold
        self.written_events = multiprocessing.sharedctypes.RawValue("Q", 0)
        self.error: BaseException | None = None

    def run(self) -> None:
        """Collect blocks until every frame is written; a second thread writes them."""
        blocks: queue.Queue[dict[str, np.ndarray[Any, Any]] | None] = queue.Queue()
        disk = threading.Thread(target=self._write_blocks, args=(blocks,), daemon=True)
        disk.start()
        try:
            waiting: dict[int, Events] = {}
            total, begin = len(self.feat_nevents), 0
            while begin < total:
                end = min(begin + self.write_threshold, total)
                counts = np.asarray(self.feat_nevents[begin:end])
                if (counts < 0).any():
                    time.sleep(0.03)
                    continue
                missing = set(range(begin, end)).difference(waiting)
                while missing:
                    try:
                        index, events = self.event_queue.get(timeout=0.3)
                    except queue.Empty:
                        continue
                    waiting[index] = events
                    missing.discard(index)
                blocks.put(_block([waiting.pop(i) for i in range(begin, end)], begin, counts))
                self.write_queue_size.value = blocks.qsize()
                self.written_events.value += int(counts.sum())
                begin = end
        finally:
            blocks.put(None)
            disk.join()

    def _write_blocks(self, blocks: queue.Queue[dict[str, np.ndarray[Any, Any]] | None]) -> None:
        try:
            with h5py.File(self.path_out, "w", libver="latest") as h5:
                group = h5.require_group("events")
                while (block := blocks.get()) is not None:
                    self.write_queue_size.value = blocks.qsize()
                    _append(group, block, self.kwargs)
        except BaseException as exc:  # reported through .error, as dcnum logs it
            self.error = exc
            logger.exception("the pickling writer failed")
            while blocks.get() is not None:  # let the collector finish
                pass


def _block(items: list[Events], begin: int, counts: np.ndarray[Any, Any]) -> dict[
        str, np.ndarray[Any, Any]]:
    present = [events for events in items if events]
    block: dict[str, np.ndarray[Any, Any]] = {}
    if present:
        block = {name: np.concatenate([events[name] for events in present])
                 for name in present[0]}
    frames = np.arange(begin, begin + len(counts))
    block["index_unmapped"] = np.repeat(frames, counts).astype(np.uint32)
    block["nevents"] = np.repeat(counts, counts).astype(np.uint32)
    return block


def _append(group: h5py.Group, block: Mapping[str, np.ndarray[Any, Any]],
            kwargs: Mapping[str, Any]) -> None:
    for name, data in block.items():
        if data.dtype == bool:
            data = data.view(np.uint8) * np.uint8(255)
        if name not in group:
            shape = data.shape[1:]
            rows = chunk_rows(data.dtype.itemsize * int(np.prod(shape)))
            group.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape),
                                 chunks=(rows, *shape), dtype=data.dtype, **kwargs)
        dataset = group[name]
        offset = dataset.shape[0]
        dataset.resize(offset + len(data), axis=0)
        dataset[offset:] = data
