"""Checking a frame's events (or a batch's) against a schema, before anything is sent.

The Producer and the EventQueue both check with :func:`check_events`, so a
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

__all__ = ["EventArrays", "check_batch_events", "check_counts", "check_events"]

#: What a frame's events are given as: feature name to array-like of ``(nevents, *shape)``.
EventArrays = Mapping[str, npt.ArrayLike]


def check_events(schema: Schema, frame_index: int, events: EventArrays | None,
                  where: str | None = None) -> tuple[int, dict[str, np.ndarray[Any, Any]]]:
    """Validate one frame's events (or a batch's); return the event count and the arrays.

    ``where`` starts every message (default ``frame <frame_index>``).
    """
    where = where or f"frame {frame_index}"
    if events is None:
        return 0, {}
    if not isinstance(events, Mapping):
        raise TypeError(f"{where}: events must be a mapping of feature name to array, or "
                        f"None; got {type(events).__name__}")
    features = schema.features
    if len(events) != len(features) or not all(name in features for name in events):
        _raise_for_names(features, frame_index, events, where)
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    nevents = -1
    for name, feature in features.items():
        array = np.asarray(events[name])
        if array.shape[1:] != feature.shape or array.ndim != 1 + len(feature.shape):
            raise FrameError(
                f"{where}: feature {name!r} has shape {array.shape}; expected "
                f"(nevents, {', '.join(map(str, feature.shape))})".replace(", )", ")"),
                frame_index=frame_index, feature=name)
        if array.dtype != feature.dtype and not np.can_cast(array.dtype, feature.dtype,
                                                            casting="safe"):
            raise FrameError(
                f"{where}: feature {name!r} has dtype {array.dtype}, which cannot be cast "
                f"safely to {feature.dtype}; convert it or change the schema",
                frame_index=frame_index, feature=name)
        if nevents < 0:
            nevents = len(array)
        elif len(array) != nevents:
            raise FrameError(
                f"{where}: feature {name!r} has {len(array)} events but "
                f"{next(iter(arrays))!r} has {nevents}", frame_index=frame_index, feature=name)
        arrays[name] = array
    return max(nevents, 0), arrays


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


def check_batch_events(schema: Schema, pairs: Sequence[tuple[int, int]],
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
    nevents, arrays = check_events(schema, first, events, where)
    if nevents != total:
        name = next(iter(arrays))
        raise FrameError(f"{where}: feature {name!r} has {nevents} events but nevents adds "
                         f"up to {total}", frame_index=first, feature=name)
    return arrays


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
