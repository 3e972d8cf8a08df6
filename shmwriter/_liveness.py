"""Is a process alive? (A zombie, dead but not yet reaped, counts as dead.)"""

from __future__ import annotations

import psutil

__all__ = ["is_alive"]


def is_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
