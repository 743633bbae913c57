"""The change-log entry as Python reads it (appliance/store/changelog.py): its
layout comes from cext/apl_layout.h through cffi, and every walker of raw
entries (the secondary's history, the partial transaction an agent holds
back, the first serial of a received blob) reads fields through it."""
from __future__ import annotations

import itertools
import time

import lz4.frame
import structlog

from appliance._native import ffi, lib
from appliance.replication import applier
from appliance.replication.history import History, _strip
from appliance.store import changelog
from appliance.store.changelog import LogEntry

from store_helpers import Store

HDR_FIELDS = tuple(name for name, _ in ffi.typeof("struct apl_centry").fields)


def entry(serial: int, kind: int, key: bytes = b"", a: bytes = b"", b: bytes = b"", **fields) -> bytes:
    """One entry as the C code writes it, every header field set through cffi."""
    e = ffi.new("struct apl_centry *")
    n = ffi.sizeof("struct apl_centry") + len(key) + len(a) + len(b)
    length = (n + 7) & ~7
    values = dict(ce_len=length, ce_kind=kind, ce_serial=serial, ce_klen=len(key), ce_alen=len(a), ce_blen=len(b))
    values.update(fields)
    for name, value in values.items():
        setattr(e, name, value)
    return bytes(ffi.buffer(e)) + key + a + b + b"\0" * (length - n)


def distinct_fields() -> dict[str, int]:
    """A value for every other header field that fills all of its bytes with a byte of its own."""
    out = {}
    for i, (name, f) in enumerate(ffi.typeof("struct apl_centry").fields):
        if name not in ("ce_len", "ce_kind", "ce_serial", "ce_klen", "ce_alen", "ce_blen"):
            out[name] = int.from_bytes(bytes([0x11 * (i % 15 + 1)]) * ffi.sizeof(f.type), "little")
    return out


class TestEntryLayout:
    def test_fields_are_the_headers(self):
        """changelog.FIELDS names the header's fields, in its order."""
        assert changelog.FIELDS == HDR_FIELDS
        assert changelog.ENTRY.size == ffi.sizeof("struct apl_centry")

    def test_every_field_is_read_at_the_headers_offset(self):
        """An entry written through cffi unpacks field by field to the same values."""
        fields = distinct_fields()
        raw = entry(0x0102030405060708, lib.APL_CE_UPDATE, b"k", b"aa", b"bbb", **fields)
        got = dict(zip(changelog.FIELDS, changelog.ENTRY.unpack_from(raw)))
        e = ffi.cast("struct apl_centry *", ffi.from_buffer(raw))
        assert got == {name: getattr(e, name) for name in HDR_FIELDS}
        assert got["ce_serial"] == 0x0102030405060708 and got["ce_blen"] == 3

    def test_walk_yields_whole_entries_and_stops_at_a_malformed_one(self):
        blob = entry(5, lib.APL_CE_BEGIN, a=b"t") + entry(6, lib.APL_CE_COMMIT)
        assert [(pos, f[changelog.E_SERIAL]) for pos, f in changelog.walk(blob)] == [(0, 5), (len(entry(5, 1, a=b"t")), 6)]
        assert [f[changelog.E_SERIAL] for _, f in changelog.walk(blob[:-8])] == [5]     # the last one cut short
        assert [f[changelog.E_SERIAL] for _, f in changelog.walk(blob + entry(7, 1, ce_len=0))] == [5, 6]


class TestFirstSerial:
    def test_of_an_exported_blob(self):
        """first_serial of what apl_log_export wrote is the serial of its first entry."""
        with Store(log_size=64 << 10) as st:
            w = st.writer
            st.begin()
            first = w.log(lib.APL_CE_BEGIN, txn=1, time_ns=time.time_ns(), a=b"tlog")
            w.log(lib.APL_CE_COMMIT, txn=1, time_ns=time.time_ns())
            st.publish()
            pos, f, l, c = (ffi.new("uint64_t *") for _ in range(4))
            out = ffi.new("uint8_t[]", 4096)
            n = lib.apl_log_export(st.reader.view, pos, out, 4096, 0, 0, f, l, c)
            assert n > 0 and c[0] == 2
            blob = bytes(ffi.buffer(out, n))
        assert changelog.first_serial(blob) == first == f[0] == LogEntry.parse(0, blob[:blob.index(b"tlog") + 8]).serial

    def test_too_short_a_blob_has_none(self):
        raw = entry(42, lib.APL_CE_BEGIN)
        end = ffi.offsetof("struct apl_centry", "ce_serial") + 8
        assert changelog.first_serial(b"") is None
        assert changelog.first_serial(raw[:end - 1]) is None
        assert changelog.first_serial(raw[:end]) == 42


class TestHistory:
    def test_a_images_are_stripped_field_by_field(self):
        """Without history_a_logs an UPDATE loses its A image and nothing else; BEGIN keeps its
        T log; BLOCK entries keep their header only (the serials have no gap); entries already held
        are skipped."""
        fields = distinct_fields()
        blob = (entry(10, lib.APL_CE_BEGIN, a=b"tlog") +
                entry(11, lib.APL_CE_UPDATE, b"key", b"new-image", b"old", **fields) +
                entry(12, lib.APL_CE_BLOCK, a=b"block image") +
                entry(13, lib.APL_CE_COMMIT))
        kept, first, last = _strip(blob, keep_a=False, after=9)
        assert (first, last) == (10, 13)
        entries = [LogEntry.parse(pos, kept[pos:pos + f[changelog.E_LEN]]) for pos, f in changelog.walk(kept)]
        assert [e.serial for e in entries] == [10, 11, 12, 13]
        begin, update, block, _ = entries
        assert (block.kind, block.block, block.a) == (lib.APL_CE_BLOCK, 0, b"")
        assert begin.a == b"tlog"
        assert (update.key, update.a, update.b) == (b"key", b"", b"old")
        assert {name: getattr(update, name.removeprefix("ce_")) for name in fields if name != "ce_flags"} \
            | {"ce_flags": update.flags} == fields
        assert len(update.raw) == (ffi.sizeof("struct apl_centry") + 3 + 3 + 7) & ~7
        assert _strip(blob, keep_a=False, after=11)[1:] == (12, 13)

    def test_read_stops_at_a_malformed_entry(self, tmp_path):
        """A history file whose last entry has length 0 (damaged) reads as its whole entries,
        not as an endless run of empty ones."""
        good = entry(7, lib.APL_CE_COMMIT)
        with lz4.frame.open(tmp_path / f"history-{7:020d}-{8:020d}.lz4", "wb") as f:
            f.write(good + entry(8, lib.APL_CE_COMMIT, ce_len=0))
        h = History(tmp_path, period=3600, memory=1 << 20, disk=1 << 30, keep_a=False, log=structlog.get_logger())
        assert list(itertools.islice(h.read(0), 5)) == [good]


def test_held_back_entries_end_at_their_last_serial():
    """The serial an agent expects next after a held-back partial transaction."""
    pending = entry(20, lib.APL_CE_BEGIN, a=b"t") + entry(21, lib.APL_CE_INSERT, b"k", b"v")
    assert applier._serial_after(pending) == 21
    assert applier._serial_after(b"") == 0
