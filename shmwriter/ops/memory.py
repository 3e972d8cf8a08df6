"""Memory of a process tree: the sum of proportional set sizes (PSS).

PSS counts a page shared by n processes as 1/n in each, so the sum over the
processes counts the shared-memory ring (and shared libraries) once, not once
per process that maps it.
"""

from __future__ import annotations

import os

import psutil

__all__ = ["TreeMemory"]


class TreeMemory:
    """Samples the memory of a process and all its descendants; keeps the peak.

    Parameters
    ----------
    pid
        Root of the tree (default: this process).
    """

    def __init__(self, pid: int | None = None) -> None:
        self._root = psutil.Process(pid or os.getpid())
        #: Highest sum seen by :meth:`sample`, in bytes.
        self.peak_nbytes = 0

    def sample(self) -> int:
        """Sum of PSS over the tree now, in bytes; updates :attr:`peak_nbytes`."""
        total = 0
        for process in [self._root, *self._root.children(recursive=True)]:
            try:
                total += process.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        self.peak_nbytes = max(self.peak_nbytes, total)
        return total
