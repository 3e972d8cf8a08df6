"""Property: whatever the schema, sizes, producers, order and kills, every accepted event is
in the file exactly once and in order, every frame not delivered is listed as missing, and
/dev/shm is as before."""

from __future__ import annotations

import multiprocessing
import os

import h5py
import numpy as np
from _workers import put_plan, random_events
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmwriter

CTX = multiprocessing.get_context("spawn")
DTYPES = ["bool", "uint8", "int16", "uint32", "int64", "float32", "float64"]
SHAPES = [(), (3,), (2, 5)]


@st.composite
def runs(draw):
    nfeatures = draw(st.integers(1, 3))
    schema = shmwriter.Schema({
        f"f{k}": shmwriter.Feature(draw(st.sampled_from(DTYPES)), draw(st.sampled_from(SHAPES)))
        for k in range(nfeatures)})
    slot_events = draw(st.integers(1, 3))
    frames = draw(st.integers(1, 60))
    nevents = draw(st.lists(st.integers(0, 2 * slot_events), min_size=frames, max_size=frames))
    producers = draw(st.integers(1, 3))
    order = draw(st.permutations(range(frames)))
    shares = [order[k::producers] for k in range(producers)]
    # at most one producer dies, after a drawn number of its frames
    victim = draw(st.integers(-1, producers - 1))
    die_after = draw(st.integers(0, max(0, len(shares[victim]) - 1))) if victim >= 0 else None
    return schema, slot_events, nevents, shares, victim, die_after


def shm_entries() -> set[str]:
    """Run segments owned by this process (other test runs may share /dev/shm)."""
    return {name for name in os.listdir("/dev/shm") if name.startswith(f"shmw_{os.getpid()}_")}


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(run=runs())
def test_accepted_events_are_written_once_in_order(tmp_path_factory, run):
    schema, slot_events, nevents, shares, victim, die_after = run
    path = tmp_path_factory.mktemp("prop") / "out.rtdc"
    frames = len(nevents)
    before = shm_entries()
    writer = shmwriter.Writer(path, schema, total_frames=frames, slots=2 * slot_events + 2,
                              slot_events=slot_events, write_threshold=7, allow_gaps=True)
    with writer:
        workers = []
        for k, share in enumerate(shares):
            plan = [(f, nevents[f]) for f in share]
            workers.append(CTX.Process(target=put_plan, args=(
                writer.producer(), schema, plan, die_after if k == victim else None)))
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
    lost = sorted(shares[victim][die_after:]) if victim >= 0 else []
    assert writer.missing_frames == lost
    delivered = [f for f in range(frames) if f not in set(lost)]
    with h5py.File(path) as h5:
        events = h5["events"]
        for name, feature in schema.items():
            parts = [random_events(schema, f, nevents[f]) for f in delivered]
            parts = [p[name] for p in parts if p is not None]
            expected = (np.concatenate(parts) if parts
                        else np.zeros((0, *feature.shape), feature.dtype))
            if feature.dtype.kind == "b":
                expected = expected.astype(np.uint8) * 255
            np.testing.assert_array_equal(events[name][:], expected, err_msg=name)
        frame_of_event = np.repeat(delivered, [nevents[f] for f in delivered])
        np.testing.assert_array_equal(events["frame"][:], frame_of_event)
    assert shm_entries() <= before
