"""Descriptor records and the pipes that carry them."""

from __future__ import annotations

import os

import pytest

from shmwriter._channel.records import (
    MAX_SLOTS_PER_RECORD,
    Kind,
    decode_records,
    encode_record,
    open_pipe_pair,
    read_grants,
    write_record,
)
from shmwriter.errors import BrokenError


def test_records_round_trip_and_split_reads():
    raw = (encode_record(Kind.HELLO, 1234) + encode_record(Kind.FRAME, 7, 5, [3, 9])
           + encode_record(Kind.REQUEST, nevents=2))
    buffer = bytearray(raw[:30])  # a read may end inside a record
    first = list(decode_records(buffer))
    buffer += raw[30:]
    records = first + list(decode_records(buffer))
    assert [(r.kind, r.value, r.nevents, r.slots) for r in records] == [
        (Kind.HELLO, 1234, 0, ()), (Kind.FRAME, 7, 5, (3, 9)), (Kind.REQUEST, 0, 2, ())]
    assert buffer == b""


def test_record_size_limit():
    assert len(encode_record(Kind.FRAME, 1, 1, range(MAX_SLOTS_PER_RECORD))) <= 4096
    with pytest.raises(ValueError, match="at most"):
        encode_record(Kind.FRAME, 1, 1, range(MAX_SLOTS_PER_RECORD + 1))


def test_full_pipe_times_out_and_closed_reader_breaks():
    (desc_w, grant_r), (desc_r, grant_w) = open_pipe_pair()
    try:
        record = encode_record(Kind.FRAME, 1, 1, [0])
        with pytest.raises(TimeoutError, match=r"read no descriptor for 0\.2 s"):
            while True:
                write_record(desc_w, record, 0.2)
        os.close(desc_r)
        desc_r = -1
        with pytest.raises(BrokenError, match="closed the descriptor channel"):
            write_record(desc_w, record, 0.2)
        assert read_grants(grant_r, 0.05) == []
        os.write(grant_w, bytes(8))
        assert read_grants(grant_r, 0.05) == [0, 0]
        os.close(grant_w)
        grant_w = -1
        assert read_grants(grant_r, 0.05) is None  # end of file: the writer is gone
    finally:
        for fd in (desc_w, grant_r, desc_r, grant_w):
            if fd >= 0:
                os.close(fd)
