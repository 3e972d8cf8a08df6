"""TreeMemory: the summed PSS of a real process tree, children and grandchildren included."""

from __future__ import annotations

import multiprocessing
import os

import psutil

from shmwriter.ops.memory import TreeMemory
from tests._workers import hold_memory

_HELD = 64 * 2**20


def _psutil_tree_pss(pid: int) -> int:
    root = psutil.Process(pid)
    return sum(process.memory_full_info().pss
               for process in [root, *root.children(recursive=True)])


def test_a_sample_counts_every_descendant_as_psutil_does() -> None:
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    memory = TreeMemory()
    alone = memory.sample()
    child = ctx.Process(target=hold_memory, args=(_HELD, ready, release, 1))
    child.start()
    try:
        assert ready.wait(60)
        sampled = memory.sample()
        reference = _psutil_tree_pss(os.getpid())
        # a child and a grandchild, each holding 64 MiB of its own
        assert sampled - alone > 2 * _HELD
        assert abs(sampled - reference) < 4 * 2**20  # the pages each call itself touches
        child_only = TreeMemory(child.pid).sample()
        assert 2 * _HELD < child_only < sampled
    finally:
        release.set()
        child.join(60)
    assert memory.peak_nbytes >= sampled
    assert memory.sample() < sampled - _HELD  # the tree is gone again


def test_a_pid_that_is_gone_samples_as_nothing() -> None:
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    release.set()
    child = ctx.Process(target=hold_memory, args=(0, ready, release))
    child.start()
    child.join(60)
    assert TreeMemory(child.pid).sample() == 0
