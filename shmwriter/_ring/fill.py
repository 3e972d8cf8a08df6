"""How a producer writes events into the ring: copied into slots as the file stores them.

:class:`SlotFiller` maps the ring in the producer's process (on first use)
and copies a frame's events into its granted slots, feature by feature
through one view per feature of the whole ring. Boolean features (masks) are
stored as the file has them, uint8 0/255, so that this conversion runs in the
producers, in parallel, not in the writer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .ring import RingSpec, SlotRing

__all__ = ["SlotFiller"]


def _store_mask(mask: np.ndarray[Any, Any], out: np.ndarray[Any, Any]) -> None:
    """Write boolean ``mask`` into uint8 ``out`` as the file stores it: True as 255.

    The cast to uint8 makes every True 1 (a bool's byte may be any non-zero value),
    and -1 wraps to 255: together cheaper than multiplying by 255. ``out`` may be
    ``mask``'s own memory.
    """
    np.copyto(out, mask, casting="unsafe")
    np.negative(out, out=out)


class SlotFiller:
    """A producer's writes into the ring of ``spec``. :meth:`close` unmaps it (idempotent)."""

    _ring: SlotRing | None = None

    def __init__(self, spec: RingSpec) -> None:
        self._spec = spec
        self._rows: list[tuple[str, np.ndarray[Any, Any], bool]] = []
        self._masks = frozenset(n for n, f in spec.layout.schema.items() if f.dtype.kind == "b")

    def ring(self) -> SlotRing:
        """The ring, mapped in this process."""
        if self._ring is None:
            self._ring = SlotRing.attach(self._spec)
        return self._ring

    def copy_in(self, slots: list[int], arrays: Mapping[str, np.ndarray[Any, Any]],
                nevents: int) -> None:
        """Copy ``nevents`` events of ``arrays`` into ``slots``, in order."""
        per_slot = self._spec.layout.slot_events
        if len(slots) == 1:  # the common frame: one copy per feature, nothing sliced
            self._copy_rows(arrays, slots[0] * per_slot, nevents)
            return
        for j, slot in enumerate(slots):
            start = j * per_slot
            stop = min(start + per_slot, nevents)
            self._copy_rows({name: array[start:stop] for name, array in arrays.items()},
                            slot * per_slot, stop - start)

    def _copy_rows(self, arrays: Mapping[str, np.ndarray[Any, Any]], at: int,
                   nevents: int) -> None:
        """Copy the ``nevents`` events of ``arrays`` to rows ``at ..`` of the ring."""
        stop = at + nevents
        for name, rows, is_mask in self._targets():
            if is_mask:
                _store_mask(arrays[name], rows[at:stop])
            else:
                # an assignment costs half of np.copyto's call; the casts were checked
                rows[at:stop] = arrays[name]

    def copy_into_run(self, run: list[int], arrays: Mapping[str, np.ndarray[Any, Any]],
                      nevents: int) -> None:
        """Copy ``nevents`` events of ``arrays`` back to back into the consecutive slots
        ``run``: one copy per feature."""
        views = self.ring().run_views(run[0], nevents, as_stored=True)
        for name, array in arrays.items():
            if name in self._masks:
                _store_mask(array, views[name])
            else:
                views[name][...] = array

    def run_views(self, run: list[int], nevents: int) -> dict[str, np.ndarray[Any, Any]]:
        """Writable views of ``nevents`` events from the first slot of ``run`` on."""
        if not run:
            return {name: np.empty((0, *f.shape), f.dtype)
                    for name, f in self._spec.layout.schema.items()}
        return self.ring().run_views(run[0], nevents)

    def store_masks_as_bytes(self, arrays: Mapping[str, np.ndarray[Any, Any]]) -> None:
        """Turn boolean features filled in place into the uint8 0/255 the file stores."""
        for name in self._masks:
            _store_mask(arrays[name], arrays[name].view(np.uint8))

    def close(self) -> None:
        """Unmap the ring (views handed out keep their memory)."""
        if self._ring is not None:
            self._rows = []
            self._ring.close()
            self._ring = None

    def _targets(self) -> list[tuple[str, np.ndarray[Any, Any], bool]]:
        """``(feature, its rows across the ring as stored, whether a mask)`` in schema
        order: one view per feature, made once."""
        if not self._rows:
            self._rows = [(name, rows, name in self._masks)
                          for name, rows in self.ring().row_views().items()]
        return self._rows
