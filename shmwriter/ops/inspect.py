"""What an .rtdc file holds, at a glance: the ``inspect`` command's library side.

:func:`inspect_file` opens a file read-only (in SWMR mode, so it also works on
a file a writer still has open or on the file of a killed writer) and returns
an :class:`FileReport`: events, frames, every ``/events`` dataset with its
dtype, chunks and filters, the compression ratio, the root attributes, the
frames the writer recorded as missing and whether the run closed cleanly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import h5py
import hdf5plugin
import numpy as np

from .._ranges import FrameRanges
from .._rtdc import EVENT_COUNT_ATTR, MISSING_FRAMES_LOG, RUN_LOG
from .text import megabytes, shape_text, table

__all__ = ["DatasetReport", "FileReport", "GroupReport", "format_report", "inspect_file"]

#: ``FileReport.origin`` of a file in dcnum's queue-writer layout (dcnum's own writer or
#: shmwriter.compat.dcnum): it has ``index_unmapped`` and no shmwriter run log.
DCNUM_ORIGIN = "dcnum queue writer"
#: Most missing frames ``FileReport.to_dict`` lists one by one (``missing_ranges`` has all).
JSON_MISSING_FRAMES_LIMIT = 10_000
#: Per-event frame index features, in the order they are looked for.
_INDEX_FEATURES = ("frame", "index_unmapped")
_BUILTIN_FILTERS = {1: "gzip", 2: "shuffle", 3: "fletcher32", 4: "szip", 5: "nbit",
                    6: "scaleoffset", 32000: "lzf"}
_FILTER_NAMES = {**{fid: name for name, fid in hdf5plugin.FILTERS.items()}, **_BUILTIN_FILTERS}
#: Filters that only rearrange or check bytes: not the compression itself.
_NOT_COMPRESSION = frozenset({"shuffle", "fletcher32", "nbit", "scaleoffset"})
#: Where a filter keeps its level among its client values.
_LEVEL_INDEX = {"gzip": 0, "zstd": 0, "bzip2": 0, "blosc": 4, "blosc2": 4}


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetReport:
    """One dataset under ``/events``: its type, layout and filters."""

    name: str
    """Dataset name (the feature)."""
    dtype: str
    """Numpy dtype name, e.g. ``uint8``."""
    shape: tuple[int, ...]
    """Shape of the whole dataset, events first."""
    chunks: tuple[int, ...] | None
    """HDF5 chunk shape, None for a contiguous dataset."""
    filters: tuple[str, ...]
    """Names of the HDF5 filters in pipeline order."""
    compression: str | None
    """Name of the compression filter, None if uncompressed."""
    compression_level: int | None
    """Its level, when the filter has one."""
    fletcher32: bool
    """Whether each chunk carries a Fletcher-32 checksum."""
    nbytes: int
    """Bytes of the data uncompressed."""
    stored_nbytes: int
    """Bytes the data takes in the file."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-type form, for JSON."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "chunks": None if self.chunks is None else list(self.chunks),
                "filters": list(self.filters), "compression": self.compression,
                "compression_level": self.compression_level, "fletcher32": self.fletcher32,
                "nbytes": self.nbytes, "stored_nbytes": self.stored_nbytes}


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupReport:
    """A group under ``/events`` (e.g. ``trace`` or ``contour`` in dclab files), summed up."""

    name: str
    """Group name."""
    datasets: int
    """Datasets inside it, at any depth."""
    nbytes: int
    """Bytes of their data uncompressed."""
    stored_nbytes: int
    """Bytes their data takes in the file."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-type form, for JSON."""
        return {"name": self.name, "datasets": self.datasets, "nbytes": self.nbytes,
                "stored_nbytes": self.stored_nbytes}


@dataclass(frozen=True, slots=True, kw_only=True)
class FileReport:
    """Everything ``shmwriter inspect`` shows about one file."""

    path: str
    """Absolute path of the file."""
    file_nbytes: int
    """Size of the file."""
    events: int
    """Events in the file (the shortest ``/events`` dataset, if lengths differ)."""
    frames: int | None
    """Frames with at least one event; None if the file has no frame index."""
    frames_from: str | None
    """The feature ``frames`` was counted from (``frame``, ``index_unmapped``, ``nevents``)."""
    frame_range: tuple[int, int] | None
    """First and last frame index with events, when the file has a frame index."""
    datasets: tuple[DatasetReport, ...]
    """The datasets directly under ``/events``, by name."""
    groups: tuple[GroupReport, ...]
    """The groups under ``/events``, by name."""
    data_nbytes: int
    """Uncompressed bytes of all datasets under ``/events``, groups included."""
    compression_ratio: float | None
    """``data_nbytes`` divided by the file size; None for an empty file."""
    metadata: dict[str, Any]
    """Root attributes as plain JSON types."""
    missing_frames: FrameRanges
    """Frames the writer recorded as never delivered (``/logs/shmwriter-missing-frames``)."""
    logs: tuple[str, ...]
    """Names of the logs under ``/logs``."""
    event_count: int | None
    """The ``experiment:event count`` attribute, None if absent."""
    problems: tuple[str, ...]
    """Why the file is not complete; empty when it is."""
    origin: str
    """Who wrote it, as far as the file tells: ``shmwriter`` (it has the run log),
    ``dcnum queue writer`` (dcnum's layout with ``index_unmapped`` and no run log: such a
    writer records no end of run, so only the datasets' lengths can be checked) or
    ``unknown``."""

    @property
    def complete(self) -> bool:
        """Whether the writer closed the run cleanly and the event count matches the data."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """Plain-type form, for JSON."""
        return {"path": self.path, "file_nbytes": self.file_nbytes, "events": self.events,
                "frames": self.frames, "frames_from": self.frames_from,
                "frame_range": None if self.frame_range is None else list(self.frame_range),
                "datasets": [d.to_dict() for d in self.datasets],
                "groups": [g.to_dict() for g in self.groups],
                "data_nbytes": self.data_nbytes, "compression_ratio": self.compression_ratio,
                "metadata": self.metadata,
                # frame by frame only up to a limit: one far frame index can leave billions
                "missing_frames": list(self.missing_frames[:JSON_MISSING_FRAMES_LIMIT]),
                "missing_frames_count": len(self.missing_frames),
                "missing_ranges": [[a, b - 1] for a, b in self.missing_frames.spans],
                "origin": self.origin,
                "logs": list(self.logs), "event_count": self.event_count,
                "complete": self.complete, "problems": list(self.problems)}


def inspect_file(path: str | os.PathLike[str]) -> FileReport:
    """Report what the .rtdc (HDF5) file ``path`` holds; never changes it.

    Parameters
    ----------
    path
        The file. It may still be open in a writer (it is read in SWMR mode).

    Returns
    -------
    FileReport
        The file's figures; ``complete`` tells whether the run closed cleanly.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    IsADirectoryError
        If ``path`` is a directory.
    ValueError
        If the file is not HDF5, cannot be opened as HDF5 or has no ``/events`` group.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a directory; expected an .rtdc file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path!r} is not an HDF5 file (no HDF5 signature found)")
    try:
        # SWMR read: a file open in a writer, or left by a killed one, opens
        # only this way (a plain open refuses it for its consistency flags)
        h5 = h5py.File(path, "r", swmr=True)
    except OSError as exc:
        raise ValueError(f"cannot open {path!r} as HDF5: {exc}") from None
    with h5:
        return _report(h5, path, os.path.getsize(path))


def _report(h5: h5py.File, path: str, file_nbytes: int) -> FileReport:
    events = h5.get("events")
    if not isinstance(events, h5py.Group):
        raise ValueError(f"{path!r} has no /events group; expected an .rtdc file")
    datasets = {name: obj for name, obj in events.items() if isinstance(obj, h5py.Dataset)}
    lengths = {name: (ds.shape[0] if ds.shape else 0) for name, ds in datasets.items()}
    nevents = min(lengths.values(), default=0)
    frames, frames_from, frame_range = _count_frames(datasets, nevents)
    reports = tuple(_dataset_report(name, datasets[name]) for name in sorted(datasets))
    groups = tuple(_group_report(name, obj) for name, obj in sorted(events.items())
                   if isinstance(obj, h5py.Group))
    data_nbytes = sum(r.nbytes for r in reports) + sum(g.nbytes for g in groups)
    metadata = {key: _plain(value) for key, value in sorted(h5.attrs.items())}
    count = metadata.get(EVENT_COUNT_ATTR)
    event_count = int(count) if isinstance(count, int | float) else None
    logs = h5.get("logs")
    log_names = tuple(sorted(logs)) if isinstance(logs, h5py.Group) else ()
    run = _run_log(h5)
    origin = ("shmwriter" if run else
              DCNUM_ORIGIN if "index_unmapped" in datasets else "unknown")
    return FileReport(
        path=path, file_nbytes=file_nbytes, events=nevents, frames=frames,
        frames_from=frames_from, frame_range=frame_range, datasets=reports, groups=groups,
        data_nbytes=data_nbytes,
        compression_ratio=data_nbytes / file_nbytes if file_nbytes else None,
        metadata=metadata, missing_frames=_missing_frames(h5), logs=log_names,
        event_count=event_count, problems=_problems(lengths, event_count, run, origin),
        origin=origin)


def _count_frames(datasets: Mapping[str, h5py.Dataset], nevents: int,
                  ) -> tuple[int | None, str | None, tuple[int, int] | None]:
    """Frames with events: distinct frame indices, or from the per-event ``nevents``."""
    for name in _INDEX_FEATURES:
        if name in datasets:
            index = datasets[name][:nevents]
            if not len(index):
                return 0, name, None
            return int(np.unique(index).size), name, (int(index.min()), int(index.max()))
    if "nevents" in datasets:
        per_event = datasets["nevents"][:nevents].astype(np.float64)
        if np.any(per_event <= 0):
            return None, None, None
        # each frame of k events contributes k events of 1/k
        return round(float(np.sum(1.0 / per_event))), "nevents", None
    return None, None, None


def _dataset_report(name: str, ds: h5py.Dataset) -> DatasetReport:
    plist = ds.id.get_create_plist()
    filters, compression, level = [], None, None
    for i in range(plist.get_nfilters()):
        code, _flags, values, _label = plist.get_filter(i)
        fname = _FILTER_NAMES.get(code, f"filter {code}")
        filters.append(fname)
        if compression is None and fname not in _NOT_COMPRESSION:
            compression = fname
            where = _LEVEL_INDEX.get(fname)
            level = int(values[where]) if where is not None and len(values) > where else None
    return DatasetReport(
        name=name, dtype=ds.dtype.name, shape=tuple(ds.shape),
        chunks=None if ds.chunks is None else tuple(ds.chunks), filters=tuple(filters),
        compression=compression, compression_level=level, fletcher32="fletcher32" in filters,
        nbytes=int(ds.size) * ds.dtype.itemsize, stored_nbytes=int(ds.id.get_storage_size()))


def _group_report(name: str, group: h5py.Group) -> GroupReport:
    sizes: list[tuple[int, int]] = []

    def visit(_name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset):
            sizes.append((int(obj.size) * obj.dtype.itemsize, int(obj.id.get_storage_size())))

    group.visititems(visit)
    return GroupReport(name=name, datasets=len(sizes), nbytes=sum(n for n, _ in sizes),
                       stored_nbytes=sum(s for _, s in sizes))


def _missing_frames(h5: h5py.File) -> FrameRanges:
    log = h5.get(f"logs/{MISSING_FRAMES_LOG}")
    if not isinstance(log, h5py.Dataset):
        return FrameRanges()
    return FrameRanges.from_lines(str(_plain(line)) for line in log[()].ravel())


def _run_log(h5: h5py.File) -> dict[str, str]:
    """The writer's ``key=value`` lines on how the run ended (absent in older files)."""
    log = h5.get(f"logs/{RUN_LOG}")
    if not isinstance(log, h5py.Dataset):
        return {}
    lines = (str(_plain(line)) for line in log[()].ravel())
    return dict(line.split("=", 1) for line in lines if "=" in line)


def _problems(lengths: Mapping[str, int], event_count: int | None,
              run: Mapping[str, str], origin: str) -> tuple[str, ...]:
    problems = []
    state = run.get("state", "DONE")
    done = f"after {run.get('frames_done')} of {run.get('total_frames')} frames"
    if state == "ABORTED":
        reason = run.get("reason", "")
        if reason.startswith("interrupted"):
            problems.append(f"the run was interrupted (Ctrl-C) {done}")
        else:
            problems.append(f"the run was aborted ({reason or 'no reason given'}) {done}")
    elif state == "FAILED":
        problems.append(f"the run failed: {run.get('error', 'no reason given')}")
    elif state == "RUNNING":
        problems.append("the writer did not close the run: it is still writing, or it was "
                        "killed")
    elif state != "DONE":
        problems.append(f"the run ended {state.lower()} {done}")
    if len(set(lengths.values())) > 1:
        problems.append(f"the /events datasets differ in length "
                        f"({min(lengths.values())} to {max(lengths.values())} events)")
    if event_count is None:
        if state in ("DONE", "ABORTED") and origin != DCNUM_ORIGIN:
            problems.append(f"no {EVENT_COUNT_ATTR!r} attribute: the writer did not close "
                            f"the run (it is still writing, or it was killed)")
    elif lengths and any(n != event_count for n in lengths.values()):
        problems.append(f"{EVENT_COUNT_ATTR!r} is {event_count} but the /events datasets "
                        f"hold {max(lengths.values())} events")
    return tuple(problems)


def _plain(value: Any) -> Any:
    """An attribute value as a plain JSON type."""
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def format_report(report: FileReport) -> str:
    """The report as the ``inspect`` command prints it."""
    frames = (" (no frame index)" if report.frames is None
              else f" in {report.frames} frames with events")
    if report.frame_range is not None:
        frames += f" (indices {report.frame_range[0]} to {report.frame_range[1]})"
    ratio = "-" if report.compression_ratio is None else f"{report.compression_ratio:.2f}"
    missing = (f"{len(report.missing_frames)}: {report.missing_frames.summary(limit=12)}"
               if report.missing_frames else "none")
    complete = ("yes" if report.complete else "NO: " + "; ".join(report.problems))
    lines = [
        report.path,
        f"  events       {report.events}{frames}",
        (f"  size         {megabytes(report.file_nbytes)} on disk, "
         f"{megabytes(report.data_nbytes)} of event data: compression ratio {ratio}"),
        f"  complete     {complete}",
        f"  missing      {missing}",
        f"  logs         {', '.join(report.logs) or 'none'}",
        f"  written by   {report.origin}",
        "",
        f"datasets ({len(report.datasets)}):",
    ]
    rows = [("NAME", "DTYPE", "SHAPE", "CHUNKS", "COMPRESSION", "FLETCHER32", "DATA", "RATIO")]
    for ds in report.datasets:
        compression = ds.compression or "none"
        if ds.compression_level is not None:
            compression += f" {ds.compression_level}"
        ratio = f"{ds.nbytes / ds.stored_nbytes:.1f}" if ds.stored_nbytes else "-"
        rows.append((ds.name, ds.dtype, shape_text(ds.shape), shape_text(ds.chunks), compression,
                     "yes" if ds.fletcher32 else "no", megabytes(ds.nbytes), ratio))
    lines += ["  " + line for line in table(rows, right=(6, 7))]
    if report.groups:
        lines += ["", f"groups ({len(report.groups)}):"]
        lines += [f"  {g.name}: {g.datasets} datasets, {megabytes(g.nbytes)} of data, "
                  f"{megabytes(g.stored_nbytes)} stored" for g in report.groups]
    lines += ["", f"metadata ({len(report.metadata)}):"]
    lines += [f"  {key} = {value}" for key, value in report.metadata.items()]
    return "\n".join(lines)
