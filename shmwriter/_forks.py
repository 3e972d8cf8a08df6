"""Descriptors a forked child must not keep: a server's and its clients' pipe ends.

A child forked from this process (``os.fork``, multiprocessing's ``fork``
start method, a process pool) gets copies of every descriptor. If it kept
those of a queue's hub, a writer thread or their clients, the other side of
each pipe would never see end of file when this process closes them or dies,
and would wait for a peer that is gone. So each such object registers here,
and in a forked child :meth:`ForkSafe._close_after_fork` closes its copies at
once (the child runs none of their threads). Spawned processes inherit
nothing and need none of this.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol

__all__ = ["ForkSafe", "close_in_forked_children"]


class ForkSafe(Protocol):
    """What registers here."""

    def _close_after_fork(self) -> None:
        """Close this object's descriptors in a forked child, quietly."""


# one process-wide hook (a fork is process-wide); weak references, so nothing is kept alive
_registered: weakref.WeakSet[ForkSafe] = weakref.WeakSet()


def close_in_forked_children(obj: ForkSafe) -> None:
    """Have ``obj._close_after_fork()`` called in every child forked from now on."""
    _registered.add(obj)


def _after_fork_in_child() -> None:
    for obj in list(_registered):
        try:
            obj._close_after_fork()
        except OSError:
            pass  # closed already
    _registered.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
