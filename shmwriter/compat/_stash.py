"""dcnum's layout: one window of frames -> one chunk of arrays -> the /events datasets.

What is reproduced (dcnum 0.31, ``EventStash`` and ``HDF5Writer``):

- Each frame's events sit at the offset the window's ``feat_nevents`` gives
  it; ``index_unmapped`` (uint32) is the frame index of each event and
  ``nevents`` the frame's ``feat_nevents`` value, with the dtype numpy gives
  ``np.array(feat_nevents[a:b])`` (int64 for an ``mp.Array``).
- The features are the keys of the event dicts whose arrays hold data. The
  first window with events fixes them: dtype of the first frame (in frame
  order) that has the feature, shape of one event. A feature a frame lacks is
  zero for its events. A bool ``mask`` is stored as uint8 0/255; other
  features keep their dtype.
- Datasets: resizable, chunks of about 1 MiB (10 to 1000 rows), Zstd level 5
  plus fletcher32 unless ``hdf5_dataset_kwargs`` says otherwise, the HDF5
  image attributes on 2-D features, ``libver="latest"``.

Where dcnum writes a file that is silently wrong, this raises instead: a
frame whose event count differs from its ``feat_nevents`` entry, a feature
that first appears after the file's features were fixed, a feature whose
shape per event changes, or a frame that carries ``index_unmapped`` or
``nevents`` itself.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import h5py
import numpy as np

from .._write.h5sink import create_event_dataset, dataset_kwargs
from ..eventqueue import EventLease

__all__ = ["Arrived", "ChunkBuilder", "DcnumFile", "arrived_from_events", "arrived_from_lease"]

#: Features the writer adds to every event itself.
_DERIVED = ("index_unmapped", "nevents")

Parts = Sequence[tuple[Mapping[str, np.ndarray[Any, Any]], int]]


class Arrived:
    """One frame taken from the event queue: its event count and where its arrays are.

    ``parts`` are ``(arrays by feature, events)`` pieces in event order: one
    piece for a frame from an ``mp.Queue``, one per slot for a frame still in
    an :class:`~shmwriter.EventQueue`'s shared memory (a lease).
    """

    __slots__ = ("_lease", "_on_release", "nevents", "parts")

    def __init__(self, nevents: int, parts: Parts, lease: EventLease | None = None,
                 on_release: Callable[[int], None] | None = None) -> None:
        self.nevents, self.parts = nevents, parts
        self._lease, self._on_release = lease, on_release

    @property
    def nslots(self) -> int:
        """Shared-memory slots this frame still holds."""
        return 0 if self._lease is None else self._lease.nslots

    def release(self) -> None:
        """Give back the slots (if any). Idempotent."""
        lease, self._lease = self._lease, None
        if lease is not None:
            nslots = lease.nslots
            self.parts = []
            lease.release()
            if self._on_release is not None:
                self._on_release(nslots)

    def detach(self) -> None:
        """Copy the events out of shared memory and give the slots back."""
        if self._lease is not None:
            arrays = self._lease.arrays()
            self.release()
            self.parts = [(arrays, self.nevents)] if arrays and self.nevents else []


def arrived_from_events(frame: int, events: Mapping[str, Any] | None) -> Arrived:
    """A frame as an ``mp.Queue`` delivers it: features without data are skipped (as dcnum does)."""
    if not events:
        return Arrived(0, [])
    arrays = {name: np.asarray(value) for name, value in events.items()}
    arrays = {name: array for name, array in arrays.items() if array.size}
    counts = {name: len(array) for name, array in arrays.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"frame {frame}: the features have different event counts: {counts}")
    nevents = next(iter(counts.values()), 0)
    return Arrived(nevents, [(arrays, nevents)] if nevents else [])


def arrived_from_lease(lease: EventLease, on_release: Callable[[int], None]) -> Arrived:
    """A frame whose events are still in an EventQueue's slots."""
    return Arrived(lease.nevents, lease.parts(), lease, on_release)


class ChunkBuilder:
    """Turns the frames of one window into one chunk, placing events as dcnum's EventStash does."""

    def __init__(self) -> None:
        #: name -> (shape of one event, file dtype); fixed by the first window with events.
        self.features: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] | None = None
        self._bool_masks: set[str] = set()

    def build(self, first: int, window: Sequence[int] | np.ndarray[Any, Any],
              frames: Mapping[int, Arrived]) -> dict[str, np.ndarray[Any, Any]]:
        """The chunk of frames ``first .. first + len(window) - 1``.

        ``window`` is the slice of ``feat_nevents`` for these frames.

        Raises
        ------
        ValueError
            If a frame does not fit (see the module docstring); the message names it.
        """
        counts = np.array(window)
        size = int(counts.sum())
        if size and self.features is None:
            self.features = self._infer(first, counts, frames)
        arrays = {name: np.zeros((size, *shape), dtype)
                  for name, (shape, dtype) in (self.features or {}).items()} if size else {}
        index = np.zeros(size, np.uint32)
        stop = 0
        for k, expected in enumerate(counts.tolist()):
            frame, start = first + k, stop
            stop += expected
            arrived = frames[frame]
            if arrived.nevents != expected:
                raise ValueError(f"frame {frame}: feat_nevents[{frame}] is {expected} but the "
                                 f"event queue delivered {arrived.nevents} event(s)")
            row = start
            for part, count in arrived.parts:
                for name, source in part.items():
                    self._store(frame, name, arrays, source[:count], row)
                row += count
            index[start:stop] = frame
        chunk = dict(arrays)
        chunk["index_unmapped"] = index
        chunk["nevents"] = counts[index.astype(np.int64) - first]
        return chunk

    def _infer(self, first: int, counts: np.ndarray[Any, Any],
               frames: Mapping[int, Arrived]) -> dict[str, tuple[tuple[int, ...], np.dtype[Any]]]:
        features: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] = {}
        for k in np.flatnonzero(counts).tolist():
            for part, _ in frames[first + k].parts:
                for name, source in part.items():
                    if name in features:
                        continue
                    _check_name(first + k, name)
                    dtype = source.dtype
                    if name == "mask" and dtype == np.bool_:
                        self._bool_masks.add(name)
                        dtype = np.dtype(np.uint8)
                    features[name] = (tuple(source.shape[1:]), dtype)
        return features

    def _store(self, frame: int, name: str, arrays: Mapping[str, np.ndarray[Any, Any]],
               source: np.ndarray[Any, Any], row: int) -> None:
        dest = arrays.get(name)
        if dest is None:
            _check_name(frame, name)
            raise ValueError(
                f"frame {frame}: feature {name!r} first appears here, after the first frames "
                f"with events fixed the file's features to {sorted(arrays)}; dcnum would write "
                f"a misaligned dataset")
        if source.shape[1:] != dest.shape[1:]:
            raise ValueError(f"frame {frame}: feature {name!r} has shape {source.shape[1:]} per "
                             f"event; the file's dataset has {dest.shape[1:]}")
        target = dest[row:row + len(source)]
        if name in self._bool_masks:
            np.multiply(np.asarray(source, dtype=bool).view(np.uint8), np.uint8(255), out=target)
        else:
            target[...] = source


def _check_name(frame: int, name: object) -> None:
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"frame {frame}: feature names must be non-empty strings without '/'; "
                         f"got {name!r}")
    if name in _DERIVED:
        raise ValueError(f"frame {frame}: feature {name!r} is added by the writer; the events "
                         f"must not carry it")


class DcnumFile:
    """The output file, with datasets created as dcnum creates them. Owns the open h5py file.

    The file is replaced if it exists. Datasets are created when a chunk
    first carries them; once the event features exist, the file switches to
    SWMR mode and every chunk is flushed, so it can be read while written and
    survives a killed writer. :meth:`close` is idempotent.
    """

    _h5: h5py.File | None = None

    def __init__(self, path: str | os.PathLike[str],
                 hdf5_dataset_kwargs: Mapping[str, Any] | None) -> None:
        self.path = pathlib.Path(path)
        self._kwargs = dataset_kwargs(hdf5_dataset_kwargs)
        self.path.unlink(missing_ok=True)
        self._h5 = h5py.File(self.path, "w", libver="latest")
        self._events = self._h5.require_group("events")
        #: Events written so far.
        self.nevents = 0

    def append(self, chunk: Mapping[str, np.ndarray[Any, Any]]) -> None:
        """Append every array of ``chunk`` to its dataset (created on first sight) and flush."""
        if self._h5 is None:
            raise ValueError(f"cannot write to the closed file {str(self.path)!r}")
        for name, data in chunk.items():
            dataset = self._events.get(name)
            if dataset is None:
                dataset = self._create(name, data)
            offset = dataset.shape[0]
            dataset.resize(offset + len(data), axis=0)
            if len(data):
                dataset[offset:] = data
        self.nevents += len(chunk["index_unmapped"])
        if not self._h5.swmr_mode and len(chunk) > len(_DERIVED):
            self._h5.swmr_mode = True  # every dataset there will be exists now
        self._h5.flush()

    def _create(self, name: str, data: np.ndarray[Any, Any]) -> h5py.Dataset:
        return create_event_dataset(self._events, name, tuple(data.shape[1:]), data.dtype,
                                    self._kwargs)

    def close(self) -> None:
        """Flush and close the file. Idempotent."""
        if self._h5 is not None:
            h5, self._h5 = self._h5, None
            h5.close()

    def __repr__(self) -> str:
        state = "closed" if self._h5 is None else "open"
        return f"<DcnumFile {str(self.path)!r} ({state}, {self.nevents} events)>"
