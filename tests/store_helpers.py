"""Helpers for tests/test_store.py.

- :class:`Store`: a freshly formatted appliance (writer + reader) that is always
  unlinked; every store ever created is listed in :data:`LIVE` until it is, so a
  fixture finalizer can remove whatever a failing test left behind.
- A plain Python model check (:func:`check_state`) that reads the store through
  every read path (get, count, scans with tiny continuation buffers, block
  images) and compares with a dict; a table's schema over a store's files
  and its native reader (:func:`table_schema`, :func:`native_reader`).
- Readers of the shared memory that bypass the C read path: the tree walk over
  block images (:func:`walk_tree`), the slot audit over the location table and
  the overflow chains (:func:`audit_slots`), and the change log
  (:func:`read_log`).
"""
from __future__ import annotations

import os
import random
import struct
import time
import uuid
from array import array
from dataclasses import dataclass
from types import SimpleNamespace

import msgpack

from appliance._native import check, ffi, lib, raise_for
from appliance.config import TableConfig
from appliance.store.reader import Reader
from appliance.store.records import TableSchema
from appliance.store.segment import SHM_DIR, Attachment, Geometry, SegmentNames, exists, unlink_all
from appliance.store.writer import FileSpec, Writer

ADDR_NONE = (1 << 64) - 1
HDR = ffi.sizeof("struct apl_bhdr")
SLOT = ffi.sizeof("struct apl_slot")
CE_HDR = ffi.sizeof("struct apl_centry")
INSERT, UPDATE, UPSERT = lib.APL_PUT_INSERT, lib.APL_PUT_UPDATE, lib.APL_PUT_UPSERT

#: every store created and not unlinked yet: appliance name -> number of device segments
LIVE: dict[str, int] = {}
#: every appliance name this process created segments under (the same mapping, never emptied)
CREATED: dict[str, int] = {}


#: every appliance name this test process handed out (conftest checks, after
#: each test, that none of the names it made is still in /dev/shm)
CREATED_NAMES: set[str] = set()


def unique_name(prefix: str = "t") -> str:
    """A fresh appliance name, so no test's segments collide with another's."""
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    CREATED_NAMES.add(name)
    return name


def linked_segments(names) -> list[str]:
    """The /dev/shm entries that belong to any of `names`."""
    names = set(names)
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith("apl.") and n.split(".")[1] in names)


def max_record(block_size: int) -> int:
    """Bytes one leaf record may take: slot + key + value."""
    return (block_size - HDR) // 2


def max_key(block_size: int) -> int:
    return min((block_size - HDR) // 4 - SLOT, lib.APL_MAX_KEY)


def max_value(block_size: int, klen: int) -> int:
    return max_record(block_size) - SLOT - klen


def mp_value(size: int, seed: int) -> bytes:
    """A value of exactly `size` bytes (b"" for 0), varying with seed (a msgpack
    object, so tests may decode it; the store itself never looks inside)."""
    if size == 0:
        return b""
    if size == 1:
        return msgpack.packb(seed % 128)
    rnd = random.Random(seed)
    if size <= 257:  # bin8: 2 header bytes
        out = msgpack.packb(rnd.randbytes(size - 2))
    elif size == 258:  # [fixint, bin8(254)]
        out = msgpack.packb([seed % 128, rnd.randbytes(254)])
    else:  # bin16: 3 header bytes
        out = msgpack.packb(rnd.randbytes(size - 3))
    assert len(out) == size
    return out


def table_schema(fields: dict, *, pk: str = "id", alt: tuple = (), block_size: int = 1024,
                 name: str = "t") -> TableSchema:
    """The schema of a table over a :class:`Store`'s files: the table is file
    0, its alternate keys files 1, 2, ... in order (as Store makes them)."""
    cfg = TableConfig.model_validate({"primary_key": pk, "alternate_keys": list(alt), "fields": fields})
    return TableSchema(name, cfg, 0, {f: i for i, f in enumerate(alt, 1)}, max_record(block_size))


def native_reader(reader: Reader, schema: TableSchema):
    """The table's native reader (cext/apl_py.c), its failed reads raised as the client's are."""
    def on_error(rc, op, arg):
        raise_for(rc, f"{schema.name}.{op}({'' if arg is None else repr(arg)})")
    return reader.table_reader(schema, on_error)


# ----------------------------------------------------------------------------
# Stores
# ----------------------------------------------------------------------------

class Store:
    """A formatted appliance with one Writer and one Reader; close() unlinks it.

    File 0 is a primary file; files 1.. are alternate-key indexes of file 0.
    """

    def __init__(self, *, block_size: int = 1024, max_overflow: int = 1, nsegments: int = 1,
                 segment_size: int = 2 << 20, nfiles: int = 1, nreaders: int = 16,
                 log_size: int = 64 << 10, reserve_slots: int = 0) -> None:
        self.name = unique_name()
        self.nsegments = nsegments
        self.block_size = block_size
        self.max_overflow = max_overflow
        self.reserve_slots = reserve_slots
        self.pins: list = []
        CREATED[self.name] = nsegments
        self.readers: list[Reader] = []
        self.writers: list[Writer] = []  # abandoned ("crashed") writers first, the live one last
        LIVE[self.name] = nsegments
        try:
            geo = Geometry(block_size=block_size, nsegments=nsegments, segment_size=segment_size,
                           nfiles=nfiles, max_overflow=max_overflow, nreaders=nreaders,
                           log_size=log_size)
            files = [FileSpec("t", lib.APL_FILE_PRIMARY, 0)]
            files += [FileSpec(f"t.a{i}", lib.APL_FILE_ALTKEY, 0) for i in range(1, nfiles)]
            self.writers.append(Writer.create(self.name, geo, mode=0o600, gid=None, schema_hash=1,
                                              files=files, reserve_slots=reserve_slots))
            self.reader = self.attach_reader()
        except BaseException:
            self.close()
            raise

    @property
    def writer(self) -> Writer:
        return self.writers[-1]

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def attach_reader(self) -> Reader:
        r = Reader(Attachment(self.name, writable=False))
        self.readers.append(r)
        return r

    def pin(self, reader: Reader | None = None):
        p = (reader or self.reader).pin()
        self.pins.append(p)
        return p

    def begin(self) -> None:
        if not self.writer.in_batch:
            self.writer.begin()

    def publish(self) -> int:
        """Publish the open batch (an empty one if none is open), reclaim; returns
        the published version."""
        self.begin()
        self.writer.publish(time.time_ns(), 0)
        self.writer.reclaim()
        return self.writer.att.sb.sb_version

    def crash_and_recover(self, reserve_slots: int | None = None) -> dict:
        """Abandon the writer as a crash would (its C state is never used again) and
        recover the store with a new Writer over a fresh writable attachment."""
        w = Writer(Attachment(self.name, writable=True),
                   self.reserve_slots if reserve_slots is None else reserve_slots)
        self.writers.append(w)
        return w.recover()

    def close(self) -> None:
        try:
            for p in self.pins:
                p.close()
            for r in self.readers:
                r.att.close()
            for w in self.writers:
                w.close()
        finally:
            self.pins, self.readers, self.writers = [], [], []
            unlink_all(self.name, self.nsegments)
            LIVE.pop(self.name, None)


class ReservedName:
    """A unique appliance name for code that creates segments itself; on exit
    its segments are unlinked whatever happened."""

    def __init__(self, nsegments: int) -> None:
        self.name = unique_name()
        self.nsegments = nsegments
        LIVE[self.name] = CREATED[self.name] = nsegments

    def __enter__(self) -> str:
        return self.name

    def __exit__(self, *exc) -> None:
        unlink_all(self.name, self.nsegments)
        LIVE.pop(self.name, None)


def unlink_leftovers() -> list[str]:
    """Unlink every segment of every store this process created that is still
    linked (not closed, or closed without unlinking); returns their names."""
    left = [name for name, n in CREATED.items()
            if name in LIVE or any(exists(seg) for seg in SegmentNames(name, n).all())]
    for name in left:
        unlink_all(name, CREATED[name])
        LIVE.pop(name, None)
    return left


# ----------------------------------------------------------------------------
# The shared memory, read directly
# ----------------------------------------------------------------------------

def file_entry(att: Attachment, file: int):
    return ffi.cast("struct apl_file *", att.meta.ptr + att.sb.sb_files_off)[file]


def live_numbers(att: Attachment) -> dict[int, int]:
    """Block number -> address of its newest version, from the location table."""
    sb = att.sb
    loc = array("Q")
    loc.frombytes(ffi.buffer(att.meta.ptr + sb.sb_loc_off, 8 * sb.sb_max_blocks))
    return {n: a for n, a in enumerate(loc) if a != ADDR_NONE}


def block_at(att: Attachment, addr: int):
    seg, slot = addr >> 48, addr & ((1 << 48) - 1)
    return ffi.cast("struct apl_bhdr *", att.devices[seg].ptr + (slot + 1) * att.sb.sb_block_size)


def damage(name: str, device: int, slot: int, block_size: int = 4096) -> None:
    """Flip bytes of a block's record heap in its device segment, behind the controller's back."""
    fd = os.open(f"{SHM_DIR}/apl.{name}.dev{device}", os.O_RDWR)
    try:
        at = (slot + 1) * block_size + block_size - 24
        old = os.pread(fd, 8, at)
        os.pwrite(fd, bytes(b ^ 0x5A for b in old), at)
    finally:
        os.close(fd)


def slot_key(block, slot) -> bytes:
    """The full key of a slot of a mapped block: its first 8 bytes are the
    slot's sl_prefix, the rest the record's first bytes (apl_layout.h)."""
    n = slot.sl_klen
    head = int(slot.sl_prefix).to_bytes(8, "big")[:min(n, 8)]
    return head + bytes(ffi.buffer(ffi.cast("uint8_t *", block) + slot.sl_off, max(n - 8, 0)))


def keys_at(att: Attachment, number: int, offset: int) -> list[bytes]:
    """The keys of the records at `offset` (block index * block_size + heap
    offset) in the newest version of chain `number` (pending versions
    included): one, but for records with no heap bytes (a key of at most 8
    bytes and an empty value), which share the offset of their neighbour."""
    bsize = att.sb.sb_block_size
    addr = ffi.cast("uint64_t *", att.meta.ptr + att.sb.sb_loc_off)[number]
    for _ in range(offset // bsize):
        addr = block_at(att, addr).bh_next
    b = block_at(att, addr)
    slots = ffi.cast("struct apl_slot *", ffi.cast("uint8_t *", b) + HDR)
    return [slot_key(b, slots[i]) for i in range(b.bh_nslots) if slots[i].sl_off == offset % bsize]


def audit_slots(store: Store) -> dict:
    """With nothing pinned and everything reclaimed: every used slot is a block of a
    current chain, no slot is in two chains, chains respect max_overflow and
    bh_chain, and the writer's counters agree. Returns the counts."""
    w = store.writer
    w.reclaim()
    att = w.att
    heads = live_numbers(att)
    seen: set[int] = set()
    for num, addr in heads.items():
        head = block_at(att, addr)
        n, a = 0, addr
        while a != ADDR_NONE:
            assert a not in seen, f"slot {a:#x} is in two chains (block {num})"
            seen.add(a)
            b = block_at(att, a)
            assert b.bh_number == num, f"block {num}: chain member says {b.bh_number}"
            n += 1
            assert n <= 1 + store.max_overflow, f"block {num}: chain longer than 1 + max_overflow"
            a = b.bh_next
        assert head.bh_chain == n, f"block {num}: bh_chain {head.bh_chain} but {n} blocks"
    st = w.stats()
    assert st["retire_pending"] == 0, st
    assert st["slots_total"] - st["slots_free"] == len(seen), (st, len(seen))
    assert st["blocks_used"] == len(heads), (st, len(heads))
    assert sum(st["segment_free"]) == st["slots_free"]
    return {"slots_used": len(seen), "blocks": len(heads)}


# ----------------------------------------------------------------------------
# Block images and the tree
# ----------------------------------------------------------------------------

@dataclass
class Image:
    number: int
    kind: int
    file: int
    level: int
    records: list  # (key, aux, value or None)
    count: int | None = None  # meta block


def parse_image(img: bytes) -> Image:
    number, kind, file, level, _, nrec = struct.unpack_from("<IIIHHI", img, 0)
    off = 20
    if kind == lib.APL_BLK_META:
        (count,) = struct.unpack_from("<Q", img, off)
        assert off + 8 == len(img)
        return Image(number, kind, file, level, [], count)
    recs = []
    for _ in range(nrec):
        klen, aux = struct.unpack_from("<HI", img, off)
        off += 6
        key = img[off:off + klen]
        off += klen
        val = None
        if level == 0:
            val = img[off:off + aux]
            off += aux
        recs.append((key, aux, val))
    assert off == len(img), "block image has trailing bytes"
    return Image(number, kind, file, level, recs)


@dataclass
class Tree:
    height: int            # levels, the leaves included
    leaves: int            # leaf chains
    inner: int             # inner blocks
    records: list          # (key, value) in key order
    count: int             # the meta block's record count
    leaf_keys: list        # the keys of each leaf chain, left to right


def walk_tree(reader: Reader, file: int, version: int = 0) -> Tree:
    """Walk a file's tree through block images and check its invariants: levels
    step down by one, inner blocks are non-empty with increasing separators, every
    record lies in the key range its parents route to it, non-root leaves are
    non-empty, keys are strictly increasing."""
    fe = file_entry(reader.att, file)
    records: list = []
    leaf_keys: list = []
    stats = {"leaves": 0, "inner": 0}

    def image(num):
        img = reader.block_image(num, version)
        assert img is not None, f"block {num} is missing at version {version}"
        im = parse_image(img)
        assert im.number == num and im.file == file, (num, im.number, im.file)
        return im

    def visit(num, lo, hi, level, is_root):
        im = image(num)
        if level is not None:
            assert im.level == level, f"block {num}: level {im.level}, expected {level}"
        if im.level == 0:
            assert im.kind == lib.APL_BLK_LEAF, f"block {num}: kind {im.kind:#x}"
            assert im.records or is_root, f"non-root leaf {num} is empty"
            for key, aux, val in im.records:
                assert lo is None or key >= lo, f"block {num}: key {key!r} below its range"
                assert hi is None or key < hi, f"block {num}: key {key!r} above its range"
                assert records == [] or records[-1][0] < key, f"block {num}: key order {key!r}"
                assert aux == len(val)
                records.append((key, val))
            leaf_keys.append([k for k, _, _ in im.records])
            stats["leaves"] += 1
            return 1
        assert im.kind == lib.APL_BLK_INNR, f"block {num}: kind {im.kind:#x}"
        assert im.records, f"inner block {num} is empty"
        stats["inner"] += 1
        seps = [k for k, _, _ in im.records]
        for a, b in zip(seps[1:], seps[2:]):
            assert a < b, f"inner block {num}: separators out of order"
        for i, (_, child, _) in enumerate(im.records):
            clo = lo if i == 0 else (seps[i] if lo is None else max(lo, seps[i]))
            chi = hi if i + 1 == len(seps) else (seps[i + 1] if hi is None else min(hi, seps[i + 1]))
            visit(child, clo, chi, im.level - 1, False)
        return im.level + 1

    height = visit(fe.fl_root, None, None, None, True)
    count = image(fe.fl_meta).count
    return Tree(height, stats["leaves"], stats["inner"], records, count, leaf_keys)


# ----------------------------------------------------------------------------
# Reads compared with a model
# ----------------------------------------------------------------------------

def raw_scan_keys(reader: Reader, file: int, lo: bytes | None, hi: bytes | None, *,
                  lo_incl: bool = True, version: int = 0, cap: int = 64) -> list[bytes]:
    """apl_scan(APL_SCAN_KEYS) with a tiny buffer, following the continuation
    contract by hand (resume key, exclusive) so that it is used on every call."""
    count = ffi.new("uint64_t *")
    more = ffi.new("int *")
    resume = ffi.new("uint8_t[]", lib.APL_MAX_KEY)
    rlen = ffi.new("uint32_t *")
    start, incl = (lo or b""), (lo_incl or lo is None)
    hib, hil = (hi, len(hi)) if hi is not None else (ffi.NULL, lib.APL_NO_BOUND)
    buf = ffi.new("uint8_t[]", cap)
    out: list[bytes] = []
    while True:
        n = lib.apl_scan(reader.view, file, start, len(start), incl, hib, hil, version,
                         lib.APL_SCAN_KEYS, buf, cap, count, resume, rlen, more)
        if n == lib.APL_EBUFSIZE:  # the next key alone needs more: grow and retry
            cap = max(cap * 2, struct.unpack("<Q", ffi.buffer(buf, 8))[0])
            buf = ffi.new("uint8_t[]", cap)
            continue
        check(n, "scan keys")
        data = bytes(ffi.buffer(buf, n))
        off = got = 0
        while off < n:
            (kl,) = struct.unpack_from("<H", data, off)
            out.append(data[off + 2:off + 2 + kl])
            off += 2 + kl
            got += 1
        assert got == count[0]
        if not more[0]:
            return out
        assert got > 0, "a call that returns nothing must not ask for more"
        start, incl = bytes(ffi.buffer(resume, rlen[0])), False
        assert start == out[-1]


def in_range(key: bytes, lo: bytes | None, hi: bytes | None, lo_incl: bool) -> bool:
    if lo is not None and (key < lo or (key == lo and not lo_incl)):
        return False
    return hi is None or key < hi


def check_range(reader: Reader, file: int, model: dict, lo, hi, lo_incl: bool, version=None) -> None:
    """Bounded scans (values, keys) equal the model's records in [lo, hi)."""
    keys = sorted(k for k in model if in_range(k, lo, hi, lo_incl))
    assert raw_scan_keys(reader, file, lo, hi, lo_incl=lo_incl, version=version or 0) == keys
    got = list(reader.scan_raw(file, lo, hi, lo_incl=lo_incl, version=version))
    assert got == [model[k] for k in keys]
    if lo_incl:
        assert list(reader.scan_keys(file, lo, hi, version=version)) == keys


def check_state(store: Store, model: dict, *, file: int = 0, version: int | None = None,
                absent=(), reader: Reader | None = None, tree: bool = True) -> Tree | None:
    """Everything readable from `file` at `version` (None = latest) equals `model`."""
    r = reader or store.reader
    ver = version or 0
    keys = sorted(model)
    assert r.count(file, ver) == len(model)
    for k in keys:
        assert r.get_raw(file, k, ver) == model[k], k
    for k in absent:
        if k not in model:
            assert r.get_raw(file, k, ver) is None, k
    assert list(r.scan_keys(file, None, None, version=version)) == keys
    assert list(r.scan_raw(file, None, None, version=version)) == [model[k] for k in keys]
    assert raw_scan_keys(r, file, None, None, version=ver) == keys
    if not tree:
        return None
    t = walk_tree(r, file, ver)
    assert t.records == [(k, model[k]) for k in keys]
    assert t.count == len(model)
    return t


# ----------------------------------------------------------------------------
# The change log
# ----------------------------------------------------------------------------

#: header fields of struct apl_centry, as Entry attributes (without the ce_ prefix)
CE_FIELDS = ("len", "kind", "flags", "file", "block", "serial", "txn", "epoch", "time_ns",
             "version", "offset")


class Entry(SimpleNamespace):
    """One change-log entry: pos (log position), the CE_FIELDS, key, a, b."""


def read_log(reader: Reader, pos: int, cap: int = 1 << 16) -> tuple[list[Entry], int, int]:
    """Read entries from log position `pos` up to the published head with
    apl_log_read. Returns (entries, position reached, last return code: 0 at the
    head, or a negative APL_* code such as APL_ELOGFULL)."""
    p = ffi.new("uint64_t *", pos)
    buf = ffi.new("uint8_t[]", cap)
    out: list[Entry] = []
    while True:
        n = lib.apl_log_read(reader.view, p, buf, cap)
        if n <= 0:
            return out, p[0], n
        c = ffi.cast("struct apl_centry *", buf)
        e = Entry(pos=p[0] - n, **{f: getattr(c, "ce_" + f) for f in CE_FIELDS})  # after any PAD
        assert e.len == n and n % 8 == 0 and n >= CE_HDR
        data = bytes(ffi.buffer(buf, n))
        a0 = CE_HDR + c.ce_klen
        b0 = a0 + c.ce_alen
        assert b0 + c.ce_blen <= n
        e.key, e.a, e.b = data[CE_HDR:a0], data[a0:b0], data[b0:b0 + c.ce_blen]
        out.append(e)


def log_bounds(reader: Reader) -> dict:
    h, t, v, s = (ffi.new("uint64_t *") for _ in range(4))
    check(lib.apl_log_bounds(reader.view, h, t, v, s), "log bounds")
    return {"head": h[0], "tail": t[0], "version": v[0], "serial": s[0]}
