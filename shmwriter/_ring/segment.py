"""POSIX shared-memory segments: create (reserved up front), attach, unlink; the one owner
of both lifetimes: named (a Writer's ring, seen by ``top`` and ``clean``) and unlinked at
once (an EventQueue's).

The creator reserves every page with ``posix_fallocate`` so that a full
/dev/shm fails here with a clear error instead of killing a later writer with
SIGBUS. Segments are created owner-only (mode 0600). Attaching never registers
the segment with ``multiprocessing.resource_tracker`` (on Python < 3.13 an
attaching process would otherwise unlink it at exit); only the creator
registers it, so that the tracker removes it if the creator dies without
cleaning up.
"""

from __future__ import annotations

import mmap
import os
import secrets
from multiprocessing import resource_tracker

import posix_ipc
import psutil

from ..errors import ShmSpaceError

__all__ = ["NAME_PREFIX", "attach_segment", "create_segment", "create_unlinked_segment",
           "new_run_name", "unlink_segment"]

#: Every segment name starts with this, followed by the owner's pid.
NAME_PREFIX = "shmw_"
SHM_DIR = "/dev/shm"


def new_run_name() -> str:
    """A name no concurrent run can have: prefix, owner pid, 64 random bits."""
    return f"{NAME_PREFIX}{os.getpid()}_{secrets.token_hex(8)}"


def check_space(nbytes: int) -> None:
    """Raise ShmSpaceError if /dev/shm or free memory cannot hold ``nbytes``."""
    shm_free = psutil.disk_usage(SHM_DIR).free if os.path.isdir(SHM_DIR) else nbytes
    mem_free = psutil.virtual_memory().available
    for what, free in (("/dev/shm", shm_free), ("available memory", mem_free)):
        if nbytes > free:
            raise ShmSpaceError(
                f"the slot ring needs {nbytes / 2**20:.1f} MiB but {what} has only "
                f"{free / 2**20:.1f} MiB free; use fewer slots, fewer slot_events or a "
                f"smaller memory_budget_nbytes")


def create_segment(name: str, nbytes: int) -> mmap.mmap:
    """Create segment ``name`` of ``nbytes``, reserve its pages and map it.

    Raises
    ------
    ShmSpaceError
        If /dev/shm or memory cannot hold it (checked first, then by reserving).
    FileExistsError
        If a segment of that name exists.
    """
    check_space(nbytes)
    shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600)
    try:
        try:
            os.posix_fallocate(shm.fd, 0, nbytes)
        except OSError as exc:
            raise ShmSpaceError(
                f"could not reserve {nbytes / 2**20:.1f} MiB in /dev/shm for the slot ring: "
                f"{exc.strerror}") from exc
        mapping = mmap.mmap(shm.fd, nbytes)
    except BaseException:
        shm.unlink()
        raise
    finally:
        shm.close_fd()
    resource_tracker.register("/" + name, "shared_memory")
    return mapping


def create_unlinked_segment(nbytes: int) -> tuple[str, int, mmap.mmap]:
    """A segment of ``nbytes`` whose name is removed at once: ``(name, fd, mapping)``.

    Only its file descriptor and mappings keep it, so it lives exactly as long
    as some process holds one of them: it cannot leak, however its users exit,
    and it cannot be removed while one still needs it (an EventQueue's
    segment). The caller owns ``fd``.

    Raises
    ------
    ShmSpaceError
        If /dev/shm or memory cannot hold it.
    """
    name = new_run_name()
    mapping = create_segment(name, nbytes)
    try:
        shm = posix_ipc.SharedMemory("/" + name)
        try:
            fd = os.dup(shm.fd)
        finally:
            shm.close_fd()
    except BaseException:
        mapping.close()
        raise
    finally:
        unlink_segment(name)  # from now on only descriptors and mappings keep it
    return name, fd, mapping


def attach_segment(name: str, nbytes: int) -> mmap.mmap:
    """Map the existing segment ``name``; it must hold at least ``nbytes``."""
    shm = posix_ipc.SharedMemory("/" + name)
    try:
        if shm.size < nbytes:
            raise ValueError(f"segment {name!r} holds {shm.size} bytes; expected {nbytes}")
        return mmap.mmap(shm.fd, nbytes)
    finally:
        shm.close_fd()


def unlink_segment(name: str, *, tracked: bool = True) -> bool:
    """Remove segment ``name``; False if it was already gone.

    ``tracked`` says whether this process registered it with the resource
    tracker (the creator did), which must then forget it.
    """
    try:
        posix_ipc.unlink_shared_memory("/" + name)
        gone = True
    except posix_ipc.ExistentialError:
        gone = False
    if tracked:
        resource_tracker.unregister("/" + name, "shared_memory")
    return gone
