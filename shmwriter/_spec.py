"""Schema of the events (features) and the byte layout of the ring's slots."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from ._validate import check_count, check_positive_int

__all__ = ["Feature", "Schema", "SlotLayout"]

#: Byte alignment of the start of every feature block of the slots region (a cache line).
_FEATURE_ALIGN = 64
#: Numpy dtype kinds a feature may have: bool, signed, unsigned, float.
_ALLOWED_KINDS = "biuf"
#: Feature names the writer adds itself for every event.
RESERVED_NAMES = frozenset({"nevents"})


def _align(nbytes: int, alignment: int) -> int:
    return -(-nbytes // alignment) * alignment


def _parse_dtype(dtype: npt.DTypeLike) -> np.dtype[Any]:
    try:
        parsed = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype must be a numpy dtype or its name; got {dtype!r}") from exc
    if parsed.kind not in _ALLOWED_KINDS or parsed.itemsize > 8:
        raise ValueError(
            f"dtype must be bool, an integer or a float of at most 8 bytes; got {parsed.str!r}")
    return parsed.newbyteorder("=")


def _parse_shape(shape: object) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    if not isinstance(shape, tuple | list):
        raise TypeError(f"shape must be a tuple of ints; got {shape!r}")
    parsed = tuple(int(n) for n in shape)
    if any(n <= 0 for n in parsed) or len(parsed) > 3:
        raise ValueError(f"shape must have at most 3 positive dimensions; got {shape!r}")
    return parsed


@dataclass(frozen=True, slots=True)
class Feature:
    """One per-event array: its dtype and the shape of one event's value.

    Parameters
    ----------
    dtype
        bool, an integer or a float type. Booleans (masks) are stored in the
        file as uint8 0/255, as .rtdc files do.
    shape
        Shape of one event's value; ``()`` (the default) is one scalar per
        event, ``(80, 250)`` an image.
    """

    dtype: np.dtype[Any]
    """Numpy dtype of the values producers hand in."""
    shape: tuple[int, ...] = ()
    """Shape of one event's value."""

    def __init__(self, dtype: npt.DTypeLike, shape: tuple[int, ...] = ()) -> None:
        object.__setattr__(self, "dtype", _parse_dtype(dtype))
        object.__setattr__(self, "shape", _parse_shape(shape))

    @property
    def event_nbytes(self) -> int:
        """Bytes one event of this feature takes."""
        return self.dtype.itemsize * math.prod(self.shape)

    @property
    def file_dtype(self) -> np.dtype[Any]:
        """The dtype stored in the HDF5 file (uint8 for booleans)."""
        return np.dtype(np.uint8) if self.dtype.kind == "b" else self.dtype

    @property
    def is_image(self) -> bool:
        """Whether the feature is 2-D and gets the HDF5 image attributes."""
        return len(self.shape) == 2

    def to_dict(self) -> dict[str, Any]:
        """Plain-type form, for HDF5 attributes and JSON."""
        return {"dtype": self.dtype.str, "shape": list(self.shape)}


class Schema(Mapping[str, Feature]):
    """The features every event has, by name, in a fixed order.

    Parameters
    ----------
    features
        Mapping of feature name to :class:`Feature`. Names are used as HDF5
        dataset names under ``/events``.

    Raises
    ------
    TypeError
        If a value is not a :class:`Feature` or a name not a string.
    ValueError
        If there is no feature, or a name is empty, has a ``/`` or is
        reserved for the writer (``nevents``).
    """

    __slots__ = ("_features",)

    def __init__(self, features: Mapping[str, Feature]) -> None:
        if not isinstance(features, Mapping):
            raise TypeError(f"features must be a mapping of name to Feature; got {features!r}")
        if not features:
            raise ValueError("a Schema needs at least one feature; got none")
        for name, feature in features.items():
            _check_feature_name(name)
            if not isinstance(feature, Feature):
                raise TypeError(f"feature {name!r} must be a shmwriter.Feature; got {feature!r}")
        self._features: dict[str, Feature] = dict(features)

    def __getitem__(self, name: str) -> Feature:
        return self._features[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._features)

    def __len__(self) -> int:
        return len(self._features)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schema):
            return NotImplemented
        return list(self._features.items()) == list(other._features.items())

    def __hash__(self) -> int:
        return hash(tuple(self._features.items()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{n!r}: {f!r}" for n, f in self._features.items())
        return f"Schema({{{inner}}})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Schema, (self._features,))

    @property
    def features(self) -> Mapping[str, Feature]:
        """The features by name, as a plain (read-only) mapping: faster than the Schema."""
        return MappingProxyType(self._features)

    @property
    def event_nbytes(self) -> int:
        """Bytes one event takes over all features."""
        return sum(f.event_nbytes for f in self._features.values())

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain-type form, for HDF5 attributes and JSON."""
        return {name: f.to_dict() for name, f in self._features.items()}


def _check_feature_name(name: object) -> None:
    if not isinstance(name, str):
        raise TypeError(f"feature names must be strings; got {name!r}")
    if not name or "/" in name:
        raise ValueError(f"feature name must be non-empty and have no '/'; got {name!r}")
    if name in RESERVED_NAMES:
        raise ValueError(f"feature name {name!r} is reserved: the writer adds it to every event")


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotLayout:
    """Where each feature of each event lives in the slots region of a ring.

    The region is feature-major: one block per feature, in schema order, each
    holding ``slots * slot_events`` events of that feature back to back and
    starting on a 64-byte boundary. Slot ``s`` owns events
    ``[s * slot_events, (s + 1) * slot_events)`` of every block, with no gap
    between one slot's events and the next slot's, so a run of consecutive
    slots is one contiguous array per feature.

    Parameters
    ----------
    schema
        The features laid out.
    slot_events
        Events one slot holds.

    Raises
    ------
    TypeError
        If ``schema`` is not a :class:`Schema` or ``slot_events`` not an int.
    ValueError
        If ``slot_events`` is not positive.
    """

    schema: Schema
    """The features laid out."""
    slot_events: int
    """Events one slot holds."""
    slot_nbytes: int = field(init=False)
    """Bytes one slot takes over all features, without alignment padding (for budgets)."""
    _slot_block_nbytes: tuple[int, ...] = field(init=False, repr=False, compare=False)
    """Bytes one slot takes in each feature's block, in schema order."""

    def __post_init__(self) -> None:
        if not isinstance(self.schema, Schema):
            raise TypeError(f"schema must be a shmwriter.Schema; got {self.schema!r}")
        check_positive_int("slot_events", self.slot_events)
        per_block = tuple(f.event_nbytes * self.slot_events for f in self.schema.values())
        object.__setattr__(self, "_slot_block_nbytes", per_block)
        object.__setattr__(self, "slot_nbytes", sum(per_block))

    def slots_for(self, nevents: int) -> int:
        """Number of slots a frame of ``nevents`` events takes."""
        return -(-nevents // self.slot_events)

    def block_offsets(self, slots: int) -> tuple[int, ...]:
        """Byte offset of each feature's block in a region of ``slots`` slots, in schema order.

        Parameters
        ----------
        slots
            Slots of the region (0 or more).

        Returns
        -------
        tuple of int
            One offset per feature, each a multiple of 64.
        """
        return self._block_ends(slots)[0]

    def region_nbytes(self, slots: int) -> int:
        """Bytes of a slots region of ``slots`` slots, alignment padding included.

        The region ends on a 64-byte boundary too, so that whatever follows it
        is aligned as well.
        """
        return self._block_ends(slots)[1]

    @property
    def max_padding_nbytes(self) -> int:
        """Most alignment padding a slots region of any number of slots has.

        ``slots * slot_nbytes <= region_nbytes(slots) <= slots * slot_nbytes
        + max_padding_nbytes`` for every ``slots``.
        """
        return (_FEATURE_ALIGN - 1) * len(self.schema)

    def slots_that_fit(self, nbytes: int) -> int:
        """The most slots whose region takes at most ``nbytes`` (0 if none fits).

        The bounds of :attr:`max_padding_nbytes` put the answer between
        ``(nbytes - max_padding_nbytes) // slot_nbytes`` and
        ``nbytes // slot_nbytes``; a bisection between them makes it exact.
        """
        if nbytes <= 0:
            return 0
        fits = max(0, (nbytes - self.max_padding_nbytes) // self.slot_nbytes)
        too_many = nbytes // self.slot_nbytes + 1
        while too_many - fits > 1:  # invariant: region(fits) <= nbytes < region(too_many)
            middle = (fits + too_many) // 2
            if self.region_nbytes(middle) <= nbytes:
                fits = middle
            else:
                too_many = middle
        return fits

    def _block_ends(self, slots: int) -> tuple[tuple[int, ...], int]:
        """The block offsets and the region's (aligned) end for ``slots`` slots."""
        check_count("slots", slots)
        offsets, end = [], 0
        for per_slot in self._slot_block_nbytes:
            offsets.append(end)
            # every start is aligned, so aligning each end keeps the next start aligned
            end += _align(per_slot * slots, _FEATURE_ALIGN)
        return tuple(offsets), end

    def to_dict(self) -> dict[str, Any]:
        """Plain-type form, for HDF5 attributes and JSON."""
        return {"schema": self.schema.to_dict(), "slot_events": self.slot_events,
                "slot_nbytes": self.slot_nbytes, "order": "feature-major",
                "block_align": _FEATURE_ALIGN}
