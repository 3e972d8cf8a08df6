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


def test_layout_aligns_features_and_slots():
    schema = shmwriter.Schema({"x": shmwriter.Feature("uint8", (3,)),
                               "y": shmwriter.Feature("float64"),
                               "img": shmwriter.Feature("uint8", (80, 250))})
    layout = SlotLayout(schema=schema, slot_events=4)
    assert layout.offsets == (0, 64, 128)
    assert all(offset % 64 == 0 for offset in layout.offsets)
    assert layout.slot_nbytes % 4096 == 0
    assert layout.slot_nbytes >= 128 + 4 * 20000
    assert [layout.slots_for(n) for n in (0, 1, 4, 5, 9)] == [0, 1, 1, 2, 3]
    with pytest.raises(ValueError, match="slot_events must be a positive integer; got 0"):
        SlotLayout(schema=schema, slot_events=0)
