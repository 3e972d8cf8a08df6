"""EventQueue: an mp.Queue of (frame_index, events) whose arrays travel through shared memory."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time

import numpy as np
import pytest
from _queue_workers import (
    dcnum_events,
    get_and_report,
    get_frames,
    get_one_then_wait,
    lease_slowly_then_get,
    lease_then_die,
    publish_turn_then_die,
    put_and_report,
    put_events,
    take_slots_and_wait,
    wait_in_get_then_die,
)

import shmwriter
from shmwriter import EventQueue, Feature, FrameError, RingFullError, Schema

CTX = multiprocessing.get_context("spawn")


def assert_same_events(got, expected):
    if expected is None:
        assert got is None
        return
    assert list(got) == list(expected)
    for name, array in expected.items():
        assert got[name].dtype == array.dtype, name
        np.testing.assert_array_equal(got[name], array, err_msg=name)


def own_segments() -> set[str]:
    """Segments in /dev/shm named after this process (an EventQueue's creator)."""
    return {name for name in os.listdir("/dev/shm") if name.startswith(f"shmw_{os.getpid()}_")}


def test_round_trip_in_one_process_returns_the_same_tuples():
    with EventQueue(memory_budget_nbytes=2**20) as q:
        frames = [3, 0, 5, 1, 16, 2]  # 5 and 16 span several slots; 0 and 2 have no events
        for frame in frames:
            q.put((frame, dcnum_events(frame)))
        for frame in frames:  # one producer: first in, first out
            got_frame, events = q.get(timeout=5)
            assert got_frame == frame
            assert_same_events(events, dcnum_events(frame))
        assert q.free_slots == q.slots
        assert q.empty()


def test_schema_is_inferred_from_the_first_events():
    with EventQueue(memory_budget_nbytes=2**20, slot_events=2) as q:
        assert q.schema is None and q.slots is None
        q.put((0, None))  # no events: needs no schema
        q.put((1, {"deform": np.zeros(0)}))  # no events either
        q.put((2, {"mask": np.ones((3, 4, 5), bool), "deform": np.arange(3.0)}))
        assert q.schema == Schema({"mask": Feature("bool", (4, 5)), "deform": Feature("float64")})
        assert q.slot_events == 2
        assert q.get(timeout=5) == (0, None)
        frame, events = q.get(timeout=5)
        assert frame == 1 and events["deform"].shape == (0,) and events["mask"].shape == (0, 4, 5)
        frame, events = q.get(timeout=5)
        assert frame == 2 and events["mask"].all() and list(events["deform"]) == [0, 1, 2]
        # a safe cast is fine (float32 into float64), the schema's dtype comes back
        q.put((3, {"mask": np.zeros((1, 4, 5), bool), "deform": np.ones(1, np.float32)}))
        assert q.get(timeout=5)[1]["deform"].dtype == np.float64


@pytest.mark.parametrize(("events", "feature", "match"), [
    ({"mask": np.ones((1, 4, 5), bool)}, "deform", "frame 7: feature 'deform' is missing"),
    ({"mask": np.ones((1, 4, 5), bool), "deform": np.ones(1), "extra": np.ones(1)}, "extra",
     "frame 7: unknown feature 'extra'"),
    ({"mask": np.ones((1, 4, 6), bool), "deform": np.ones(1)}, "mask",
     r"frame 7: feature 'mask' has shape \(1, 4, 6\); expected \(nevents, 4, 5\)"),
    ({"mask": np.ones((1, 4, 5), bool), "deform": np.ones(1, np.complex64)}, "deform",
     "frame 7: feature 'deform' has dtype complex64, which cannot be cast safely to float64"),
    ({"mask": np.ones((2, 4, 5), bool), "deform": np.ones(1)}, "deform",
     "frame 7: feature 'deform' has 1 events but 'mask' has 2"),
])
def test_a_later_event_that_does_not_fit_raises_at_the_producer(events, feature, match):
    with EventQueue(memory_budget_nbytes=2**20) as q:
        q.put((0, {"mask": np.ones((1, 4, 5), bool), "deform": np.ones(1)}))
        with pytest.raises(FrameError, match=match) as info:
            q.put((7, events))
        assert "inferred from the first events" in str(info.value)
        assert info.value.frame_index == 7 and info.value.feature == feature
        assert q.get(timeout=5)[0] == 0
        with pytest.raises(queue.Empty):  # nothing of frame 7 was sent
            q.get(timeout=0.2)
        assert q.free_slots == q.slots


def test_first_events_that_cannot_be_a_schema_raise():
    with EventQueue(memory_budget_nbytes=2**20) as q:
        with pytest.raises(FrameError, match=r"frame 4: feature 'name' .* cannot be a feature"):
            q.put((4, {"deform": np.ones(2), "name": np.array(["a", "b"])}))
        with pytest.raises(FrameError, match="feature name 'nevents' is reserved"):
            q.put((4, {"nevents": np.ones(2)}))
        with pytest.raises(FrameError, match="feature 'deform' is a scalar"):
            q.put((4, {"deform": 1.0}))
        assert q.schema is None  # nothing was published: the next good frame decides
        q.put((5, {"deform": np.ones(2, np.int16)}))
        assert q.schema == Schema({"deform": Feature("int16")})


def test_given_schema_checks_the_first_frame_too(small_schema):
    with EventQueue(small_schema, slots=4) as q:
        assert q.schema == small_schema and q.slots == 4 and q.free_slots == 4
        with pytest.raises(FrameError, match="frame 0: feature 'image' is missing") as info:
            q.put((0, {"deform": np.ones(1, np.float32)}))
        assert "inferred" not in str(info.value)


def test_put_arguments_are_checked():
    with EventQueue(memory_budget_nbytes=2**20) as q:
        with pytest.raises(TypeError, match=r"put\(\) takes a \(frame_index, events\) pair"):
            q.put("STOP")
        with pytest.raises(TypeError, match=r"frame_index must be an int; got 1\.5"):
            q.put((1.5, None))
        with pytest.raises(FrameError, match="frame index must be >= 0; got -1"):
            q.put((-1, None))
        with pytest.raises(TypeError, match="frame 2: events must be a mapping"):
            q.put((2, [1, 2]))
    with pytest.raises(ValueError, match="slots=8 needs a schema"):
        EventQueue(slots=8)
    with pytest.raises(TypeError, match=r"schema must be a shmwriter\.Schema or None"):
        EventQueue({"deform": Feature("float64")})


def test_too_small_budget_and_too_large_frames_raise():
    with EventQueue(memory_budget_nbytes=4096) as q:
        with pytest.raises(ValueError, match=r"memory_budget_nbytes=4096 cannot hold one slot "
                                             r"of 32\d{3} bytes"):
            q.put((0, {"image": np.zeros((1, 80, 100), np.uint8)}))
    with EventQueue(Schema({"deform": Feature("float64")}), slots=2, slot_events=3) as q:
        with pytest.raises(FrameError, match=r"frame 9 has 7 events but one frame can hold at "
                                             r"most 6 \(slots × slot_events\)"):
            q.put((9, {"deform": np.ones(7)}))
        q.put((9, {"deform": np.arange(6.0)}))  # exactly the two slots
        assert list(q.get(timeout=5)[1]["deform"]) == list(range(6))


def test_put_with_a_timeout_raises_queue_full_and_get_raises_empty():
    """As mp.Queue: put(timeout=...) and put_nowait raise queue.Full (also a RingFullError)."""
    with EventQueue(Schema({"deform": Feature("float64")}), slots=2, slot_events=1) as q:
        q.put((0, {"deform": np.ones(1)}))
        q.put((1, {"deform": np.ones(1)}))
        assert q.full()
        with pytest.raises(queue.Full, match=r"frame 2: waited .* for 1 free slot.*0 of 2 "
                                             r"are free") as info:
            q.put((2, {"deform": np.ones(1)}), timeout=0.3)
        assert isinstance(info.value, RingFullError)
        with pytest.raises(queue.Full, match=r"frame 2: .* 0 of 2 are free"):
            q.put_nowait((2, {"deform": np.ones(1)}))
        with pytest.raises(queue.Full):
            q.put((2, {"deform": np.ones(1)}), block=False)
        q.put((2, None))  # a frame without events needs no slot
        assert [q.get_nowait()[0] for _ in range(3)] == [0, 1, 2]
        with pytest.raises(queue.Empty):
            q.get_nowait()
        with pytest.raises(queue.Empty):
            q.get(timeout=0.1)


def test_put_without_timeout_waits_for_a_slow_consumer():
    """put() blocks like a bounded mp.Queue's while the consumer holds every slot, then goes on.

    The consumer keeps the only slot for 1.5 s, several of put's liveness checks.
    """
    with EventQueue(Schema({"deform": Feature("float64")}), slots=1, slot_events=1) as q:
        leased, report = CTX.Queue(), CTX.Queue()
        q.put((0, {"deform": np.zeros(1)}))
        consumer = CTX.Process(target=lease_slowly_then_get, args=(q, leased, 1.5, report))
        consumer.start()
        assert leased.get(timeout=30) == 0  # the consumer holds the only slot now
        assert q.free_slots == 0
        q.put((1, {"deform": np.ones(1)}))  # no timeout: waits until the lease is released
        assert report.get(timeout=30) == 1
        consumer.join(30)
        assert consumer.exitcode == 0
        assert q.free_slots == 1


def test_put_raises_broken_error_when_the_consumer_is_killed_meanwhile():
    """A producer blocked in put() must not wait for a consumer that no longer exists."""
    with EventQueue(Schema({"deform": Feature("float64")}), slots=1, slot_events=1) as q:
        got, stop, started, report = CTX.Queue(), CTX.Event(), CTX.Event(), CTX.Queue()
        q.put((0, {"deform": np.zeros(1)}))
        consumer = CTX.Process(target=get_one_then_wait, args=(q, got, stop))
        consumer.start()
        assert got.get(timeout=30) == 0  # the consumer took a frame: it is the queue's consumer
        q.put((1, {"deform": np.ones(1)}))  # the ring is full again; the consumer takes no more
        producer = CTX.Process(target=put_and_report, args=(q, 2, started, report))
        producer.start()
        assert started.wait(30)
        os.kill(consumer.pid, signal.SIGKILL)
        consumer.join(30)
        assert consumer.exitcode == -signal.SIGKILL
        name, message = report.get(timeout=30)  # the safety bound; detection takes ~0.5 s
        assert name == "BrokenError", message
        assert f"frame 2: the queue's consumer (pid {consumer.pid}) is gone" in message
        producer.join(30)
        assert producer.exitcode == 0


def test_lease_gives_views_into_shared_memory_until_released():
    with EventQueue(Schema({"area": Feature("int64")}), slots=4, slot_events=2) as q:
        q.put((8, {"area": np.arange(5)}))
        with q.lease(timeout=5) as lease:
            assert (lease.frame_index, lease.nevents, lease.nslots) == (8, 5, 3)
            assert q.free_slots == 1
            parts = lease.parts()
            assert [count for _, count in parts] == [2, 2, 1]
            assert np.concatenate([views["area"] for views, _ in parts]).tolist() == [0, 1, 2, 3, 4]
            with pytest.raises(ValueError, match="read-only"):
                parts[0][0]["area"][0] = 1
        assert q.free_slots == 4
        lease.release()  # idempotent
        assert q.free_slots == 4


def test_threads_share_one_queue():
    with EventQueue(memory_budget_nbytes=2**20, slot_events=2) as q:
        got: dict[int, object] = {}
        done = threading.Event()

        def consume():
            while not done.is_set():
                try:
                    frame, events = q.get(timeout=0.1)
                except queue.Empty:
                    continue
                assert frame not in got
                got[frame] = events

        frames = list(range(120))
        producers = [threading.Thread(target=put_events, args=(q, frames[k::3])) for k in range(3)]
        consumers = [threading.Thread(target=consume) for _ in range(2)]
        for thread in producers + consumers:
            thread.start()
        deadline = time.monotonic() + 20
        while len(got) < len(frames) and time.monotonic() < deadline:
            time.sleep(0.01)
        done.set()
        for thread in producers + consumers:
            thread.join(10)
        assert sorted(got) == frames
        for frame in frames:
            assert_same_events(got[frame], dcnum_events(frame))
        assert q.free_slots == q.slots


def test_spawned_producers_and_a_spawned_consumer():
    with EventQueue(memory_budget_nbytes=2**20) as q:
        assert own_segments() == set()  # its name was unlinked at once
        report = CTX.Queue()
        frames = list(range(150))
        consumer = CTX.Process(target=get_frames, args=(q, len(frames), report))
        producers = [CTX.Process(target=put_events, args=(q, frames[k::3])) for k in range(3)]
        for process in [consumer, *producers]:
            process.start()
        got = report.get(timeout=60)
        for process in [consumer, *producers]:
            process.join(30)
            assert process.exitcode == 0
        assert sorted(got) == frames
        for frame in frames:
            assert_same_events(got[frame], dcnum_events(frame))
        assert q.free_slots == q.slots
    assert own_segments() == set()


def test_slots_of_a_killed_producer_come_back_at_once():
    with EventQueue(Schema({"deform": Feature("float64")}), slots=4, slot_events=1) as q:
        taken, said = CTX.Pipe(duplex=False)
        dying = CTX.Process(target=take_slots_and_wait, args=(q, 3, said))
        dying.start()
        assert taken.poll(30) and taken.recv() == 3
        assert q.free_slots == 1  # it holds three of the four
        os.kill(dying.pid, signal.SIGKILL)
        dying.join(30)
        assert dying.exitcode == -signal.SIGKILL
        assert q.free_slots == 4  # its channel ended with it: the hub took them back
        for frame in range(4):  # all four slots are usable again
            q.put((frame, {"deform": np.full(1, frame, np.float64)}))
        assert [q.get(timeout=5)[0] for _ in range(4)] == [0, 1, 2, 3]


def test_slots_of_a_killed_consumer_come_back():
    with EventQueue(Schema({"deform": Feature("float64")}), slots=2, slot_events=1) as q:
        q.put((0, {"deform": np.ones(1)}))
        q.put((1, {"deform": np.ones(1)}))
        dying = CTX.Process(target=lease_then_die, args=(q,))
        dying.start()
        dying.join(30)
        assert dying.exitcode == -signal.SIGKILL
        q.put((2, {"deform": np.ones(1)}))  # waits for a slot and takes the dead one's back
        assert [q.get(timeout=5)[0] for _ in range(2)] == [1, 2]


def test_a_killed_schema_publisher_does_not_block_the_others():
    with EventQueue(memory_budget_nbytes=2**20) as q:
        dying = CTX.Process(target=publish_turn_then_die, args=(q,))
        dying.start()
        dying.join(30)
        assert dying.exitcode == -signal.SIGKILL
        q.put((0, {"deform": np.ones(2)}))  # the hub passed the turn on when it died
        assert q.schema == Schema({"deform": Feature("float64")})
        assert q.get(timeout=5)[0] == 0


def test_close_pickle_and_repr():
    q = EventQueue(memory_budget_nbytes=2**16)
    assert "schema not known yet" in repr(q)
    q.put((0, {"deform": np.ones(2)}))
    slots = q.slots
    assert 2000 <= slots <= 2**16 // 32  # a slot of 4 float64 takes 32 bytes, unpadded
    assert f"1 features, {slots} slots × 4 events, {slots - 1} free" in repr(q)
    q.join_thread()
    q.cancel_join_thread()
    assert q.qsize() == 1 and not q.empty()
    q.close()
    q.close()
    assert q.closed and repr(q) == "<closed EventQueue>"
    with pytest.raises(shmwriter.ClosedError, match="this EventQueue was closed"):
        q.put((1, None))
    with pytest.raises(shmwriter.ClosedError):
        q.get(timeout=0.1)
    with pytest.raises(shmwriter.ClosedError):
        pickle.dumps(q)


QUEUE_SCRIPT = """
import pickle, sys
import numpy as np
event_queue = pickle.loads(sys.stdin.buffer.read())
for frame in range(5):
    event_queue.put((frame, {"deform": np.full(frame, frame, np.float64)}))
event_queue.close()
"""


def test_a_process_started_by_hand_puts_into_the_pickled_queue():
    """The queue pickles into a ticket: any process of the user attaches, not only children."""
    import subprocess
    import sys
    with EventQueue(Schema({"deform": Feature("float64")}), slots=2, slot_events=2) as q:
        blob = pickle.dumps(q)
        assert b"shmwriter" in blob and len(blob) < 1000  # no descriptors, a few strings
        script = subprocess.Popen([sys.executable, "-c", QUEUE_SCRIPT], stdin=subprocess.PIPE)
        script.stdin.write(blob)
        script.stdin.close()
        got = [q.get(timeout=30) for _ in range(5)]  # 2 slots: the script waits for us
        assert script.wait(30) == 0
        assert [frame for frame, _ in got] == list(range(5))
        for frame, events in got:
            assert events["deform"].tolist() == [frame] * frame
        assert q.free_slots == 2


def test_a_forged_ticket_is_refused_and_the_queue_goes_on():
    with EventQueue(Schema({"deform": Feature("float64")}), slots=2) as q:
        q.put((0, {"deform": np.ones(1)}))
        blob = pickle.dumps(q)
        secret = q._ticket.secret.encode()
        assert blob.count(secret) == 1
        forged = pickle.loads(blob.replace(secret, b"00" * 32))
        with pytest.raises(shmwriter.AttachError, match="wrong secret"):
            forged.put((1, None))
        assert q.get(timeout=5)[0] == 0
        assert q.qsize() == 0  # nothing of the forged put arrived


def test_closing_the_queue_in_its_creator_ends_it_for_every_process():
    q = EventQueue(Schema({"deform": Feature("float64")}), slots=1, slot_events=1)
    started, report = CTX.Event(), CTX.Queue()
    consumer = CTX.Process(target=get_and_report, args=(q, started, report))
    consumer.start()
    assert started.wait(30)
    time.sleep(0.3)  # most likely it waits at the hub now; attaching after the close
    #                  raises the same error
    q.close()
    name, message = report.get(timeout=30)
    assert name == "BrokenError"
    assert f"the queue's creator (pid {os.getpid()}) closed the queue or exited" in message
    consumer.join(30)
    assert consumer.exitcode == 0


def test_put_nowait_takes_a_free_slot_at_once_and_a_timed_out_get_loses_nothing():
    with EventQueue(Schema({"deform": Feature("float64")}), slots=2, slot_events=1) as q:
        with pytest.raises(queue.Empty):
            q.get(timeout=0.2)  # the hub answers its withdrawn TAKE; nothing stays behind
        q.put_nowait((0, {"deform": np.zeros(1)}))  # a free slot: taken without waiting
        q.put_nowait((1, {"deform": np.ones(1)}))
        assert q.qsize() == 2 and q.full()
        assert [q.get_nowait()[0] for _ in range(2)] == [0, 1]
        assert q.free_slots == 2 and q.empty()


def test_a_consumer_killed_while_it_waits_leaves_the_next_frame_to_others():
    with EventQueue(Schema({"deform": Feature("float64")}), slots=2, slot_events=1) as q:
        started = CTX.Event()
        dying = CTX.Process(target=wait_in_get_then_die, args=(q, started))
        dying.start()
        assert started.wait(30)
        dying.join(30)
        assert dying.exitcode == -signal.SIGKILL
        q.put((7, {"deform": np.ones(1)}))  # not handed to the dead consumer's TAKE
        assert q.get(timeout=5)[0] == 7


def test_a_reader_keeps_frames_coming_and_gives_back_those_it_did_not_take():
    with EventQueue(Schema({"deform": Feature("float64")}), slots=8, slot_events=1) as q:
        for frame in range(6):
            q.put((frame, {"deform": np.full(1, frame, np.float64)}))
        with q.reader(ahead=4) as reader:
            assert reader.get(timeout=5)[0] == 0
            with reader.lease(timeout=5) as lease:
                assert lease.frame_index == 1 and lease.parts()[0][0]["deform"][0] == 1
            assert q.qsize() <= 2  # at least 2 and 3 went to the reader ahead of its takes
        # closed: the frames it received and did not take are back at the front, in order
        assert [q.get(timeout=5)[0] for _ in range(4)] == [2, 3, 4, 5]
        assert q.free_slots == 8
        with pytest.raises(shmwriter.ClosedError, match="EventReader is closed"):
            reader.get(timeout=0.1)
        with pytest.raises(ValueError, match="ahead"):
            q.reader(ahead=0)
