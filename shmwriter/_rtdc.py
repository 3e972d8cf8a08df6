"""The .rtdc layout names every writer and reader here shares.

The log and attribute names shmwriter writes and ``inspect`` reads, the HDF5
image attributes of 2-D features, dclab's log line limit and the chunk-size
rule (which dcnum's writer uses too). The sink, the dcnum drop-in, ``inspect``,
``replay`` and the benchmark take them from here, so they cannot drift.
"""

from __future__ import annotations

__all__ = ["EVENT_COUNT_ATTR", "IMAGE_ATTRS", "LOG_LINE_LIMIT", "MAX_FRAME_INDEX",
           "MISSING_FRAMES_LOG", "RUN_LOG", "chunk_rows"]

#: Root attribute with the number of events, set when a run closes cleanly.
EVENT_COUNT_ATTR = "experiment:event count"
#: Name of the log (under ``/logs``) listing frames that never arrived, one range a line.
MISSING_FRAMES_LOG = "shmwriter-missing-frames"
#: Name of the log (under ``/logs``) that says how the run ended, one ``key=value`` a line.
RUN_LOG = "shmwriter-run"
#: Longest line dclab accepts in a file's logs (its check_dataset alerts beyond).
LOG_LINE_LIMIT = 100
#: HDF5 image attributes of every 2-D feature (images, masks), as .rtdc files carry them.
IMAGE_ATTRS = {"CLASS": "IMAGE", "IMAGE_VERSION": "1.2", "IMAGE_SUBCLASS": "IMAGE_GRAYSCALE"}
#: Highest frame index: the file stores frame indices as uint32.
MAX_FRAME_INDEX = 2**32 - 1
_CHUNK_NBYTES = 2**20


def chunk_rows(event_nbytes: int) -> int:
    """Events per HDF5 chunk: about 1 MiB, between 10 and 1000 rows (as dcnum's writer)."""
    return min(1000, max(10, _CHUNK_NBYTES // max(event_nbytes, 1)))
