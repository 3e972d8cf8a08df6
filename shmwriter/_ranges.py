"""FrameRanges: a sorted set of frame indices kept as ranges, so a gap costs one entry.

One far frame index (``put(10_000_000, ...)`` in an open-ended run) leaves ten
million frames missing; stored one by one they would take gigabytes and one
log line each. Stored as ranges they take one entry, one log line and one
line of the file's ``shmwriter-missing-frames`` log.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

__all__ = ["FrameRanges", "as_ranges"]


class FrameRanges(Sequence[int]):
    """Sorted frame indices as disjoint half-open ranges; a read-only sequence of ints.

    It compares equal to any sequence with the same indices, so
    ``writer.missing_frames == [3, 4, 7]`` works, while ``len`` and ``in``
    cost one entry per range, not per frame.

    Parameters
    ----------
    spans
        ``(start, stop)`` pairs, ascending and not overlapping.
    """

    __slots__ = ("_length", "_spans", "_starts")

    def __init__(self, spans: Iterable[tuple[int, int]] = ()) -> None:
        self._spans: list[tuple[int, int]] = []
        self._starts: list[int] = []  # counted frames before each span, for indexing
        self._length = 0
        for start, stop in spans:
            self.add(start, stop)

    @classmethod
    def of(cls, frames: Iterable[int]) -> FrameRanges:
        """The ranges of ascending ``frames``."""
        ranges = cls()
        for frame in frames:
            ranges.add(frame, frame + 1)
        return ranges

    def add(self, start: int, stop: int) -> None:
        """Append frames ``start .. stop - 1``; they must come after every frame held."""
        if stop <= start:
            return
        if self._spans and start < self._spans[-1][1]:
            raise ValueError(f"frames {start}..{stop - 1} do not come after the frames held")
        if self._spans and start == self._spans[-1][1]:
            first, _ = self._spans[-1]
            self._spans[-1] = (first, stop)
        else:
            self._spans.append((start, stop))
            self._starts.append(self._length)
        self._length += stop - start

    @property
    def spans(self) -> list[tuple[int, int]]:
        """The ``(start, stop)`` ranges, ascending."""
        return list(self._spans)

    def lines(self) -> list[str]:
        """One line per range, ``a`` or ``a-b`` (inclusive), as the file's log stores them."""
        return [str(a) if b == a + 1 else f"{a}-{b - 1}" for a, b in self._spans]

    @classmethod
    def from_lines(cls, lines: Iterable[str]) -> FrameRanges:
        """Parse :meth:`lines` (also one index per line, as older files have it)."""
        ranges = cls()
        for line in lines:
            text = line.strip()
            if text:
                first, _, last = text.partition("-")
                ranges.add(int(first), int(last or first) + 1)
        return ranges

    def union(self, spans: Iterable[tuple[int, int]]) -> FrameRanges:
        """These frames and those of ``spans``, which may overlap them and come in any order."""
        union: list[tuple[int, int]] = []
        for start, stop in sorted([*self._spans, *spans]):
            if union and start <= union[-1][1]:
                union[-1] = (union[-1][0], max(union[-1][1], stop))
            elif stop > start:
                union.append((start, stop))
        return FrameRanges(union)

    def summary(self, limit: int = 6) -> str:
        """``1, 4-7, 9`` for at most ``limit`` ranges, then how many more."""
        shown = ", ".join(self.lines()[:limit])
        more = len(self._spans) - limit
        return shown + (f", … ({more} more ranges)" if more > 0 else "")

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> list[int]: ...
    def __getitem__(self, index: int | slice) -> int | list[int]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._length))]
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError("FrameRanges index out of range")
        span = bisect.bisect_right(self._starts, index) - 1
        return self._spans[span][0] + index - self._starts[span]

    def __iter__(self) -> Iterator[int]:
        for start, stop in self._spans:
            yield from range(start, stop)

    def __contains__(self, frame: object) -> bool:
        if not isinstance(frame, int):
            return False
        span = bisect.bisect_right(self._spans, (frame, float("inf"))) - 1
        return span >= 0 and self._spans[span][0] <= frame < self._spans[span][1]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrameRanges):
            return self._spans == other._spans
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            if len(other) != self._length:
                return False
            return all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrameRanges, (self._spans,))

    def __repr__(self) -> str:
        return f"FrameRanges([{self.summary()}])"


def as_ranges(frames: Sequence[int]) -> FrameRanges:
    """``frames`` as FrameRanges (unchanged if it is one already)."""
    return frames if isinstance(frames, FrameRanges) else FrameRanges.of(frames)
