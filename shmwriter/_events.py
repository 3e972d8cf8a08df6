"""Checking a frame's events (or a batch's) against a schema, before anything is sent.

The Producer and the EventQueue both check with an :class:`EventCheck`, so a
frame that does not fit raises the same :class:`~shmwriter.FrameError`,
naming the frame and the feature, in the process that put it. An EventQueue
without a schema makes one from its first events with :func:`infer_schema`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ._spec import Feature, Schema
from .errors import FrameError

__all__ = ["EventArrays", "EventCheck", "check_counts", "infer_schema"]

#: What a frame's events are given as: feature name to array-like of ``(nevents, *shape)``.
EventArrays = Mapping[str, npt.ArrayLike]


class EventCheck:
    """Checks frames against ``schema``; made once, called for every frame.

    ``put()`` runs it for every frame, so what can be worked out once (each
    feature's dtype, shape and number of dimensions) is, and a feature that is
    already an ndarray of the schema's dtype costs a few compares.
    """

    __slots__ = ("_features", "_specs", "schema")

    def __init__(self, schema: Schema) -> None:
        #: The schema checked against.
        self.schema = schema
        self._features = schema.features
        self._specs = tuple((name, f.dtype, f.shape, 1 + len(f.shape))
                            for name, f in schema.items())

    def __call__(self, frame_index: int, events: EventArrays | None,
                 where: str | None = None) -> tuple[int, dict[str, np.ndarray[Any, Any]]]:
        """Validate one frame's events (or a batch's); return the event count and the arrays.

        ``where`` starts every message (default ``frame <frame_index>``).
        """
        if events is None:
            return 0, {}
        if not isinstance(events, Mapping):
            raise TypeError(f"{where or f'frame {frame_index}'}: events must be a mapping of "
                            f"feature name to array, or None; got {type(events).__name__}")
        if events.keys() != self._features.keys():
            _raise_for_names(self._features, frame_index, events, where or f"frame {frame_index}")
        arrays: dict[str, np.ndarray[Any, Any]] = {}
        nevents = -1
        for name, dtype, shape, ndim in self._specs:
            array = events[name]
            if type(array) is not np.ndarray:
                array = np.asarray(array)
            if array.ndim != ndim or (ndim > 1 and array.shape[1:] != shape) \
                    or (array.dtype != dtype and not np.can_cast(array.dtype, dtype, "safe")):
                raise _feature_error(self._features[name], frame_index, name, array,
                                     where or f"frame {frame_index}")
            if (count := len(array)) != nevents:
                if nevents >= 0:
                    raise FrameError(
                        f"{where or f'frame {frame_index}'}: feature {name!r} has {count} "
                        f"events but {next(iter(arrays))!r} has {nevents}",
                        frame_index=frame_index, feature=name)
                nevents = count
            arrays[name] = array
        return max(nevents, 0), arrays

    def batch(self, pairs: Sequence[tuple[int, int]],
              events: EventArrays | None) -> dict[str, np.ndarray[Any, Any]]:
        """Validate a batch's events: ``pairs`` are its ``(frame, nevents)``, ``events`` the
        events of all of them concatenated; return the arrays."""
        total = sum(count for _, count in pairs)
        if not pairs:
            return {}
        first = pairs[0][0]
        where = f"the batch of {len(pairs)} frames from frame {first}"
        if events is None:
            if total:
                raise FrameError(f"{where}: events is None but nevents adds up to {total}",
                                 frame_index=first)
            return {}
        nevents, arrays = self(first, events, where)
        if nevents != total:
            name = next(iter(arrays))
            raise FrameError(f"{where}: feature {name!r} has {nevents} events but nevents adds "
                             f"up to {total}", frame_index=first, feature=name)
        return arrays


def _feature_error(feature: Feature, frame_index: int, name: str, array: np.ndarray[Any, Any],
                   where: str) -> FrameError:
    """The error for a feature whose shape or dtype does not fit the schema."""
    if array.shape[1:] != feature.shape or not array.ndim:
        return FrameError(
            f"{where}: feature {name!r} has shape {array.shape}; expected "
            f"(nevents, {', '.join(map(str, feature.shape))})".replace(", )", ")"),
            frame_index=frame_index, feature=name)
    return FrameError(
        f"{where}: feature {name!r} has dtype {array.dtype}, which cannot be cast "
        f"safely to {feature.dtype}; convert it or change the schema",
        frame_index=frame_index, feature=name)


def _raise_for_names(features: Mapping[str, Any], frame_index: int, events: EventArrays,
                     where: str) -> None:
    for name in events:
        if name not in features:
            raise FrameError(f"{where}: unknown feature {name!r}; the schema has "
                             f"{list(features)}", frame_index=frame_index, feature=str(name))
    for name in features:
        if name not in events:
            raise FrameError(f"{where}: feature {name!r} is missing",
                             frame_index=frame_index, feature=name)


def check_counts(frames: object, nevents: object) -> list[tuple[int, int]]:
    """``(frame, nevents)`` pairs of a batch, checked for types and lengths."""
    if not isinstance(frames, Sequence | np.ndarray) or isinstance(frames, str | bytes):
        raise TypeError(f"frames must be a sequence of frame indices; got {frames!r}")
    if not isinstance(nevents, Sequence | np.ndarray) or isinstance(nevents, str | bytes):
        raise TypeError(f"nevents must be a sequence of event counts; got {nevents!r}")
    if len(frames) != len(nevents):
        raise ValueError(f"frames and nevents must be as long as each other; got "
                         f"{len(frames)} and {len(nevents)}")
    pairs = []
    for frame, count in zip(frames, nevents, strict=True):
        if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 0:
            raise FrameError(f"frame {frame}: nevents must be an int >= 0; got {count!r}",
                             frame_index=frame)
        pairs.append((frame, int(count)))
    return pairs


def infer_schema(frame_index: int, arrays: Mapping[str, np.ndarray[Any, Any]]) -> Schema:
    """One Feature per array: its dtype and the shape of one event."""
    features = {}
    for name, array in arrays.items():
        try:
            features[name] = Feature(array.dtype, array.shape[1:])
        except (TypeError, ValueError) as exc:
            raise FrameError(f"frame {frame_index}: feature {name!r} (dtype {array.dtype}, "
                             f"shape {array.shape}) cannot be a feature: {exc}",
                             frame_index=frame_index, feature=str(name)) from None
    try:
        return Schema(features)
    except (TypeError, ValueError) as exc:
        raise FrameError(f"frame {frame_index}: {exc}", frame_index=frame_index) from None
