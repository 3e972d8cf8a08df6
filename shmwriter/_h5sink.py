"""HDF5 sink: the .rtdc file, its resizable ``/events`` datasets and metadata.

The file is opened with ``libver="latest"`` and switched to SWMR mode once its
datasets exist, so readers can follow it live and a killed writer leaves a
file that opens without repair, holding every chunk flushed so far. Root
attributes cannot change in SWMR mode, so :meth:`H5Sink.close` reopens the
file briefly to set ``experiment:event count`` and to add the logs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import h5py
import hdf5plugin
import numpy as np

from ._gather import DERIVED_DTYPES, Chunk
from ._spec import Schema

__all__ = ["MISSING_FRAMES_LOG", "H5Sink", "chunk_rows", "dataset_kwargs"]

logger = logging.getLogger(__name__)

#: Name of the log (under ``/logs``) listing frames that never arrived.
MISSING_FRAMES_LOG = "shmwriter-missing-frames"
_IMAGE_ATTRS = {"CLASS": "IMAGE", "IMAGE_VERSION": "1.2", "IMAGE_SUBCLASS": "IMAGE_GRAYSCALE"}
_CHUNK_NBYTES = 2**20


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


def chunk_rows(event_nbytes: int) -> int:
    """Events per HDF5 chunk: about 1 MiB, between 10 and 1000 rows."""
    return min(1000, max(10, _CHUNK_NBYTES // max(event_nbytes, 1)))


class H5Sink:
    """Appends chunks of events to an .rtdc file. Owns the open h5py file.

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
    """

    _file: h5py.File | None = None

    def __init__(self, path: str | os.PathLike[str], schema: Schema, derived: tuple[str, ...],
                 hdf5_dataset_kwargs: Mapping[str, Any] | None,
                 metadata: Mapping[str, Any] | None) -> None:
        self.path = os.fspath(path)
        self.nevents = 0
        self._kwargs = dataset_kwargs(hdf5_dataset_kwargs)
        self._file = h5py.File(self.path, "w", libver="latest")
        try:
            _write_metadata(self._file, metadata or {})
            events = self._file.create_group("events")
            shapes = {name: (f.shape, f.file_dtype) for name, f in schema.items()}
            shapes.update({name: ((), DERIVED_DTYPES[name]) for name in derived})
            self._datasets = {name: self._create_dataset(events, name, shape, dtype)
                              for name, (shape, dtype) in shapes.items()}
            self._file.swmr_mode = True
        except BaseException:
            self._file.close()
            raise

    def _create_dataset(self, group: h5py.Group, name: str, shape: tuple[int, ...],
                        dtype: np.dtype[Any]) -> h5py.Dataset:
        rows = chunk_rows(dtype.itemsize * int(np.prod(shape)))
        dataset = group.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape),
                                       chunks=(rows, *shape), dtype=dtype, **self._kwargs)
        if len(shape) == 2:
            for key, value in _IMAGE_ATTRS.items():
                dataset.attrs.create(key, np.bytes_(value))
        return dataset

    def write(self, chunk: Chunk) -> None:
        """Append ``chunk`` to every dataset and flush, so live readers see it."""
        if self._file is None:
            raise ValueError(f"cannot write to the closed file {self.path!r}")
        if chunk.nevents:
            start, stop = self.nevents, self.nevents + chunk.nevents
            for name, dataset in self._datasets.items():
                dataset.resize(stop, axis=0)
                dataset.write_direct(np.ascontiguousarray(chunk.arrays[name]),
                                     dest_sel=np.s_[start:stop])
            self.nevents = stop
        self._file.flush()

    def close(self, *, missing_frames: Sequence[int] = (),
              logs: Mapping[str, Sequence[str]] | None = None) -> None:
        """Close the file, then set the event count and add logs. Idempotent."""
        if self._file is None:
            return
        file, self._file = self._file, None
        file.close()
        with h5py.File(self.path, "a") as h5:
            h5.attrs["experiment:event count"] = np.int64(self.nevents)
            all_logs = dict(logs or {})
            if missing_frames:
                all_logs[MISSING_FRAMES_LOG] = [str(i) for i in missing_frames]
            for name, lines in all_logs.items():
                _write_log(h5, name, lines)

    def abandon(self) -> None:
        """Close the file after a failure, keeping what was flushed."""
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except Exception:  # the failure is reported already; the flushed data stays
                logger.exception("closing %s after a failure", self.path)

    def __repr__(self) -> str:
        state = "closed" if self._file is None else "open"
        return f"<H5Sink {self.path!r} ({state}, {self.nevents} events)>"


def _write_metadata(h5: h5py.File, metadata: Mapping[str, Any]) -> None:
    for key, value in metadata.items():
        if not isinstance(key, str) or key.count(":") != 1:
            raise ValueError(f"metadata keys must look like 'section:key'; got {key!r}")
        h5.attrs[key] = value


def _write_log(h5: h5py.File, name: str, lines: Sequence[str]) -> None:
    logs = h5.require_group("logs")
    if name in logs:
        del logs[name]
    encoded = [line.encode("utf-8") for line in lines] or [b""]
    logs.create_dataset(name, data=np.array(encoded, dtype=f"S{max(map(len, encoded)) or 1}"))
