"""BlockPlan: a run's frames in blocks, block ``b`` written by part ``b mod parts``.

A run too large for one host is written by several Writers, one per node.
Each owns every ``parts``-th block of ``frames_per_block`` frames and numbers
its frames locally, ``0 .. part_frames(k) - 1``, in the order of its blocks.
The plan is the one source of that mapping: the producer side turns a run's
frame index into the part's, and the merge turns each part's frames back.

Each part's file records its plan in the log :data:`PART_LOG` (see
:meth:`BlockPlan.log_lines`), so a merge needs only the files.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ._ranges import FrameRanges
from ._validate import check_count, check_positive_int

__all__ = ["PART_LOG", "BlockPlan"]

#: The log of a part's file that holds its plan (the merged file has no such log).
PART_LOG = "shmwriter-part"


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockPlan:
    """Frames ``0 .. total_frames - 1`` in blocks; block ``b`` belongs to part ``b mod parts``.

    Parameters
    ----------
    total_frames
        Frames of the whole run.
    frames_per_block
        Frames of each block (the last one may have fewer).
    parts
        Writers sharing the run.
    """

    total_frames: int
    frames_per_block: int
    parts: int

    def __post_init__(self) -> None:
        check_positive_int("total_frames", self.total_frames)
        check_positive_int("frames_per_block", self.frames_per_block)
        check_positive_int("parts", self.parts)
        if self.parts > self.nblocks:
            raise ValueError(f"{self.total_frames} frames in blocks of {self.frames_per_block} "
                             f"make {self.nblocks} block(s), fewer than the {self.parts} parts: "
                             f"every part needs a block; use fewer parts or smaller blocks")

    @property
    def nblocks(self) -> int:
        """Blocks of the run."""
        return -(-self.total_frames // self.frames_per_block)

    def block(self, number: int) -> range:
        """The frames of block ``number``."""
        check_count("block", number)
        if number >= self.nblocks:
            raise ValueError(f"block must be < {self.nblocks} (the run's blocks); got {number}")
        start = number * self.frames_per_block
        return range(start, min(start + self.frames_per_block, self.total_frames))

    def blocks(self, part: int | None = None) -> Iterator[range]:
        """The frames of each block in run order, or only those of ``part``."""
        first, step = (0, 1) if part is None else (self._check_part(part), self.parts)
        for number in range(first, self.nblocks, step):
            yield self.block(number)

    def part_of(self, frame: int) -> int:
        """The part that writes run frame ``frame``."""
        self._check_frame(frame)
        return (frame // self.frames_per_block) % self.parts

    def part_frames(self, part: int) -> int:
        """Frames part ``part`` writes."""
        return sum(len(block) for block in self.blocks(part))

    def to_part(self, frame: int) -> int:
        """Part ``part_of(frame)``'s own index of run frame ``frame``."""
        self._check_frame(frame)
        number, offset = divmod(frame, self.frames_per_block)
        return (number // self.parts) * self.frames_per_block + offset

    def to_run(self, part: int, frame: int) -> int:
        """The run's index of part ``part``'s frame ``frame``."""
        local_block, offset = divmod(frame, self.frames_per_block)
        return (local_block * self.parts + part) * self.frames_per_block + offset

    def spans(self) -> Iterator[tuple[int, range]]:
        """``(part, part frames)`` of each block, in run order: what a merge copies."""
        for number in range(self.nblocks):
            block, part = self.block(number), number % self.parts
            start = self.to_part(block.start)
            yield part, range(start, start + len(block))

    def to_run_ranges(self, part: int, frames: Iterable[tuple[int, int]]) -> FrameRanges:
        """Part ``part``'s ``(start, stop)`` frame ranges as ranges of run frames."""
        pieces = []
        for start, stop in frames:
            while start < stop:  # one piece per block the range crosses
                end = min(stop, (start // self.frames_per_block + 1) * self.frames_per_block)
                first = self.to_run(part, start)
                pieces.append((first, first + end - start))
                start = end
        return FrameRanges(sorted(pieces))

    def log_lines(self, part: int) -> list[str]:
        """The lines of :data:`PART_LOG` in part ``part``'s file."""
        return [f"part={self._check_part(part)}", f"parts={self.parts}",
                f"frames_per_block={self.frames_per_block}",
                f"total_frames={self.total_frames}"]

    @classmethod
    def from_log(cls, lines: Iterable[str]) -> tuple[BlockPlan, int]:
        """The plan and part number that :meth:`log_lines` wrote."""
        values = dict(line.partition("=")[::2] for line in lines)
        try:
            plan = cls(total_frames=int(values["total_frames"]),
                       frames_per_block=int(values["frames_per_block"]),
                       parts=int(values["parts"]))
            return plan, plan._check_part(int(values["part"]))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"the {PART_LOG} log {sorted(values.items())} is not a block "
                             f"plan: {exc}") from None

    def _check_frame(self, frame: int) -> None:
        if not 0 <= frame < self.total_frames:
            raise ValueError(f"frame must be in 0..{self.total_frames - 1}; got {frame}")

    def _check_part(self, part: int) -> int:
        check_count("part", part)
        if part >= self.parts:
            raise ValueError(f"part must be < {self.parts} (the plan's parts); got {part}")
        return part
