"""Feature, Schema and SlotLayout: validation and layout."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import shmwriter
from shmwriter._spec import SlotLayout


def test_feature_normalises_and_describes():
    feature = shmwriter.Feature("bool", (80, 250))
    assert feature.dtype == np.dtype(bool)
    assert feature.file_dtype == np.dtype(np.uint8)
    assert feature.event_nbytes == 20000
    assert feature.is_image
    assert shmwriter.Feature(np.float32).shape == ()
    assert shmwriter.Feature("f4").to_dict() == {"dtype": "<f4", "shape": []}
    assert pickle.loads(pickle.dumps(feature)) == feature


@pytest.mark.parametrize(("args", "error", "message"), [
    (("U10",), ValueError, "dtype must be bool, an integer or a float"),
    (("complex128",), ValueError, "dtype must be bool, an integer or a float"),
    (("nonsense",), TypeError, "dtype must be a numpy dtype or its name; got 'nonsense'"),
    (("uint8", (0, 3)), ValueError, r"shape must have at most 3 positive dimensions; got \(0, 3\)"),
    (("uint8", "80x250"), TypeError, "shape must be a tuple of ints; got '80x250'"),
])
def test_feature_refuses(args, error, message):
    with pytest.raises(error, match=message):
        shmwriter.Feature(*args)


@pytest.mark.parametrize(("features", "error", "message"), [
    ({}, ValueError, "at least one feature"),
    ({"nevents": shmwriter.Feature("int32")}, ValueError, "'nevents' is reserved"),
    ({"a/b": shmwriter.Feature("int32")}, ValueError, "non-empty and have no '/'"),
    ({"deform": "float32"}, TypeError, "must be a shmwriter.Feature; got 'float32'"),
    ({1: shmwriter.Feature("int32")}, TypeError, "feature names must be strings; got 1"),
    ([("a", 1)], TypeError, "features must be a mapping"),
])
def test_schema_refuses(features, error, message):
    with pytest.raises(error, match=message):
        shmwriter.Schema(features)


def test_schema_mapping_and_pickle():
    schema = shmwriter.Schema({"b": shmwriter.Feature("uint8", (2, 3)),
                               "a": shmwriter.Feature("float64")})
    assert list(schema) == ["b", "a"]  # order kept
    assert schema.event_nbytes == 14
    assert pickle.loads(pickle.dumps(schema)) == schema
    assert "Schema(" in repr(schema)
    assert schema.to_dict()["b"] == {"dtype": "|u1", "shape": [2, 3]}


def test_layout_is_feature_major_with_aligned_blocks():
    schema = shmwriter.Schema({"x": shmwriter.Feature("uint8", (3,)),
                               "y": shmwriter.Feature("float64"),
                               "img": shmwriter.Feature("uint8", (80, 250))})
    layout = SlotLayout(schema=schema, slot_events=4)
    assert layout.slot_nbytes == 4 * (3 + 8 + 20000)  # unpadded: what a budget pays per slot
    # 5 slots: x takes 60 B (padded to 64), y 160 B (to 192), img 400000 B (a multiple of 64)
    assert layout.block_offsets(5) == (0, 64, 256)
    assert layout.region_nbytes(5) == 256 + 400000
    assert layout.block_offsets(1) == (0, 64, 128)
    assert layout.region_nbytes(0) == 0
    for slots in range(1, 40):
        offsets = layout.block_offsets(slots)
        assert all(offset % 64 == 0 for offset in offsets)
        assert layout.region_nbytes(slots) % 64 == 0
        ends = [o + f.event_nbytes * 4 * slots
                for o, f in zip(offsets, schema.values(), strict=True)]
        nexts = [*offsets[1:], layout.region_nbytes(slots)]
        assert all(end <= after for end, after in zip(ends, nexts, strict=True))
        assert layout.region_nbytes(slots) - slots * layout.slot_nbytes \
            <= layout.max_padding_nbytes
    assert [layout.slots_for(n) for n in (0, 1, 4, 5, 9)] == [0, 1, 1, 2, 3]
    with pytest.raises(ValueError, match="slot_events must be a positive integer; got 0"):
        SlotLayout(schema=schema, slot_events=0)
    with pytest.raises(ValueError, match="slots must be at least 0; got -1"):
        layout.region_nbytes(-1)


def test_layout_to_dict_and_pickle():
    schema = shmwriter.Schema({"v": shmwriter.Feature("float32")})
    layout = SlotLayout(schema=schema, slot_events=3)
    assert layout.to_dict() == {"schema": {"v": {"dtype": "<f4", "shape": []}},
                                "slot_events": 3, "slot_nbytes": 12, "order": "feature-major",
                                "block_align": 64}
    again = pickle.loads(pickle.dumps(layout))
    assert again == layout
    assert again.region_nbytes(7) == layout.region_nbytes(7) == 128


@pytest.mark.parametrize(("features", "slot_events"), [
    ({"x": shmwriter.Feature("uint8", (3,)), "y": shmwriter.Feature("float64")}, 1),
    ({"x": shmwriter.Feature("uint8", (3,)), "y": shmwriter.Feature("float64")}, 5),
    ({"m": shmwriter.Feature("bool", (7, 9)), "a": shmwriter.Feature("int16"),
      "b": shmwriter.Feature("uint8")}, 3),
    ({"img": shmwriter.Feature("uint8", (80, 250)), "d": shmwriter.Feature("float32")}, 4),
    ({f"s{i}": shmwriter.Feature("uint8") for i in range(20)}, 1),
])
def test_slots_that_fit_is_exact(features, slot_events):
    layout = SlotLayout(schema=shmwriter.Schema(features), slot_events=slot_events)
    one = layout.region_nbytes(1)
    budgets = [0, 1, one - 1, one, one + 1, 10 * layout.slot_nbytes, 2**20 + 3, 2**24 - 1,
               *range(one, 40 * one, max(1, one // 7))]
    for budget in budgets:
        n = layout.slots_that_fit(budget)
        assert layout.region_nbytes(n) <= budget < layout.region_nbytes(n + 1), budget
    assert layout.slots_that_fit(-5) == 0
