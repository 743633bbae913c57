"""Reading the change log in shared memory (format: cext/apl_layout.h).

The replication agent streams it; the controller searches it to answer
"did transaction N commit?" for a client whose commit was interrupted by a
controller restart; tests check what it holds. Entries outside shared memory
(a received blob, the secondary's history files) are read with walk(),
first_serial() and ENTRY, whose layout comes from the header through cffi.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator

from .. import errors
from .._native import check, ffi, lib

__all__ = ["LogEntry", "read_entries", "bounds", "Bounds", "txn_outcome", "KIND_NAMES", "FIELDS", "ENTRY",
           "walk", "first_serial"]

_HDR = ffi.sizeof("struct apl_centry")
_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}   # struct format of an unsigned integer by size


def _entry_struct() -> tuple[tuple[str, ...], struct.Struct]:
    """struct apl_centry as cffi reads it from cext/apl_layout.h: its field
    names in order, and a struct.Struct with each field at its offset (pad
    bytes where the compiler put them), for code that walks raw entries."""
    fmt, at, names = "=", 0, []
    for name, f in ffi.typeof("struct apl_centry").fields:
        size = ffi.sizeof(f.type)
        if f.type.kind != "primitive" or not f.type.cname.startswith("uint") or size not in _CODES:
            raise ImportError(f"appliance.store.changelog: struct apl_centry.{name} is not an unsigned integer")
        fmt += f"{f.offset - at}x" * (f.offset > at) + _CODES[size]
        at = f.offset + size
        names.append(name)
    fmt += f"{_HDR - at}x" * (_HDR > at)
    return tuple(names), struct.Struct(fmt)


#: the entry header's fields (struct apl_centry, in order) and their struct.Struct
FIELDS, ENTRY = _entry_struct()
#: index of a field in what ENTRY unpacks
E_LEN, E_KIND, E_FLAGS, E_FILE, E_BLOCK, E_SERIAL, E_TXN, E_TIME, E_KLEN, E_ALEN, E_BLEN = (
    FIELDS.index(f"ce_{n}") for n in ("len", "kind", "flags", "file", "block", "serial", "txn", "time_ns", "klen",
                                       "alen", "blen"))
_SERIAL_AT = ffi.offsetof("struct apl_centry", "ce_serial")
_SERIAL = struct.Struct("=Q")


def walk(blob: bytes, pos: int = 0) -> Iterator[tuple[int, tuple[int, ...]]]:
    """(position, header fields as ENTRY unpacks them) of each entry of `blob`
    (entries back to back, as apl_log_export writes them) from byte `pos`
    (an entry's start), up to the first one that is cut short or shorter
    than a header."""
    n = len(blob)
    while pos + _HDR <= n:
        f = ENTRY.unpack_from(blob, pos)
        ln = f[E_LEN]
        if ln < _HDR or pos + ln > n:
            return
        yield pos, f
        pos += ln


def first_serial(blob: bytes) -> int | None:
    """The serial of the first entry of `blob`; None when it is too short to hold one."""
    if len(blob) < _SERIAL_AT + _SERIAL.size:
        return None
    return _SERIAL.unpack_from(blob, _SERIAL_AT)[0]


KIND_NAMES = {lib.APL_CE_BEGIN: "begin", lib.APL_CE_INSERT: "insert", lib.APL_CE_UPDATE: "update",
              lib.APL_CE_DELETE: "delete", lib.APL_CE_COMMIT: "commit", lib.APL_CE_CANCEL: "cancel",
              lib.APL_CE_BLOCK: "block", lib.APL_CE_PAD: "pad"}


@dataclass(frozen=True, slots=True)
class LogEntry:
    pos: int            # log position of the entry
    kind: int
    flags: int
    file: int
    block: int
    serial: int
    txn: int
    epoch: int
    time_ns: int
    version: int
    offset: int
    key: bytes
    a: bytes            # A image; BEGIN: T log; BLOCK: block image
    b: bytes            # B image
    raw: bytes          # the whole entry as stored

    @property
    def kind_name(self) -> str:
        return KIND_NAMES.get(self.kind, str(self.kind))

    @classmethod
    def parse(cls, pos: int, raw: bytes) -> "LogEntry":
        e = ffi.cast("struct apl_centry *", ffi.from_buffer(raw))
        k, a, b = e.ce_klen, e.ce_alen, e.ce_blen
        if _HDR + k + a + b > len(raw):
            raise errors.CorruptionError(f"log entry at {pos}: payload exceeds its length")
        p = _HDR
        return cls(pos, e.ce_kind, e.ce_flags, e.ce_file, e.ce_block, e.ce_serial, e.ce_txn, e.ce_epoch,
                   e.ce_time_ns, e.ce_version, e.ce_offset, raw[p:p + k], raw[p + k:p + k + a],
                   raw[p + k + a:p + k + a + b], raw)


def bounds(reader) -> dict:
    """Published head, tail, version and serial of the change log."""
    h, t, v, s = (ffi.new("uint64_t *") for _ in range(4))
    check(lib.apl_log_bounds(reader.view, h, t, v, s), "log bounds")
    return {"head": h[0], "tail": t[0], "version": v[0], "serial": s[0]}


class Bounds:
    """bounds() for a caller that reads them after every publish (the
    primary's agent): the outputs are allocated once."""

    __slots__ = ("view", "_h", "_t", "_v", "_s")

    def __init__(self, reader) -> None:
        self.view = reader.view
        self._h, self._t, self._v, self._s = (ffi.new("uint64_t *") for _ in range(4))

    def head_serial(self) -> tuple[int, int]:
        """The published head and serial."""
        check(lib.apl_log_bounds(self.view, self._h, self._t, self._v, self._s), "log bounds")
        return self._h[0], self._s[0]


def find_entry(reader, pos: int, kind: int, limit: int) -> tuple[int, int, int] | None:
    """(position, serial, time_ns) of the first entry of `kind` from position
    `pos` on, among at most `limit` entries, or None. Reads headers only, in
    C (apl_log_find): no entry is copied or parsed on the way. Raises
    InternalError(APL_ELOGFULL) when `pos` has been overwritten."""
    p = ffi.new("uint64_t *", pos)
    h = ffi.new("struct apl_centry *")
    rc = lib.apl_log_find(reader.view, p, kind, limit, h)
    check(rc, "search change log")
    return (p[0], h.ce_serial, h.ce_time_ns) if rc == 1 else None


def read_entries(reader, pos: int, limit: int | None = None) -> Iterator[LogEntry]:
    """Entries from position `pos` up to the published head. Raises
    InternalError(APL_ELOGFULL) when `pos` has been overwritten."""
    p = ffi.new("uint64_t *", pos)
    cap = 1 << 16
    buf = ffi.new("uint8_t[]", cap)
    n_read = 0
    while limit is None or n_read < limit:
        start = p[0]
        n = lib.apl_log_read(reader.view, p, buf, cap)
        if n == 0:
            return
        if n == lib.APL_EBUFSIZE:
            cap = max(cap * 2, int.from_bytes(bytes(ffi.buffer(buf, 8)), "little"))
            buf = ffi.new("uint8_t[]", cap)
            p[0] = start
            continue
        check(n, "read change log")
        yield LogEntry.parse(p[0] - n, bytes(ffi.buffer(buf, n)))
        n_read += 1


def txn_outcome(reader, txn: int, since_ns: int) -> str:
    """"committed" when the retained log holds the COMMIT of `txn`;
    "not_committed" when it does not and the log reaches back to `since_ns`
    (the transaction's start), so it would be there; else "unknown"."""
    b = bounds(reader)
    oldest = None
    try:
        for e in read_entries(reader, b["tail"]):
            if oldest is None:
                oldest = e.time_ns
            if e.txn == txn and e.kind == lib.APL_CE_COMMIT:
                return "committed"
    except errors.InternalError:
        return "unknown"
    if b["tail"] == 0 or oldest is None or oldest <= since_ns:
        return "not_committed"
    return "unknown"
