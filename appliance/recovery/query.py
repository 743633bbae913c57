"""Questions asked of the log history: which transactions changed a table or
a record, with each change's B and A images (``appliance history``); what
undoing one committed transaction changes, and which later transactions
stand in its way (``appliance cancel``).

Both read change-log entries in serial order (appliance.recovery.history)
and group them by transaction (BEGIN … COMMIT). Images stay encoded here
(bytes); the controller decodes them through the table schema. An A image
the history did not keep (``history_a_logs = false``) is the B image of the
record's next change, or — for its last change — the record as it is now;
one sent as a delta (``delta_updates``) is rebuilt from its B image.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .. import errors
from .._native import ffi, lib
from ..store import tlog
from ..store.changelog import (E_ALEN, E_BLEN, E_BLOCK, E_FILE, E_FLAGS, E_KIND, E_KLEN, E_SERIAL, E_TIME, E_TXN,
                               ENTRY, walk)
from .history import GAP

__all__ = ["Change", "TxnRecord", "transactions", "UndoPlan", "undo_plan"]

_H = ENTRY.size
_BEGIN, _COMMIT, _CANCEL = lib.APL_CE_BEGIN, lib.APL_CE_COMMIT, lib.APL_CE_CANCEL
_INSERT, _UPDATE, _DELETE = lib.APL_CE_INSERT, lib.APL_CE_UPDATE, lib.APL_CE_DELETE
_CHANGES = (_INSERT, _UPDATE, _DELETE)
KINDS = {_INSERT: "insert", _UPDATE: "update", _DELETE: "delete"}
_NO_B, _DELTA = lib.APL_CEF_NO_B, lib.APL_CEF_DELTA
_DELTA_HDR = struct.Struct("<II")
UNKNOWN = object()          # an image the history cannot tell


@dataclass
class Change:
    file: int
    kind: str
    key: bytes
    block: int
    b: object               # bytes, None (no record before), or UNKNOWN
    a: object               # bytes, None (no record after), or UNKNOWN until derived


@dataclass
class TxnRecord:
    txn: int
    begin_serial: int
    serial: int = 0         # its COMMIT (or CANCEL) serial
    time_ns: int = 0
    program: str | None = None
    version: str | None = None
    input: object = None
    state: str = "open"     # committed, cancelled (failed while committing)
    changes: list = field(default_factory=list)


def _images(blob: bytes, pos: int, f) -> tuple[bytes, object, object]:
    klen, alen, blen, kind, flags = f[E_KLEN], f[E_ALEN], f[E_BLEN], f[E_KIND], f[E_FLAGS]
    k0 = pos + _H
    key = blob[k0:k0 + klen]
    a_raw = blob[k0 + klen:k0 + klen + alen]
    if kind == _INSERT:
        b = None
    elif flags & _NO_B:
        b = UNKNOWN
    else:
        b = blob[k0 + klen + alen:k0 + klen + alen + blen]
    if kind == _DELETE:
        a = None
    elif not alen:
        a = UNKNOWN                         # not kept: derived later
    elif flags & _DELTA:
        if b is UNKNOWN or b is None or alen < 8:
            a = UNKNOWN
        else:
            off, rep = _DELTA_HDR.unpack_from(a_raw)
            a = b[:off] + a_raw[8:] + b[off + rep:]
    else:
        a = a_raw
    return key, b, a


def _txns(blobs: Iterable[bytes], files: set | None, upto: int | None, after: tuple | None = None):
    """Every whole transaction of the entries, oldest first, with its
    changes to records of `files` (None: every file); a gap marker is
    yielded as None. `after` (serial, time_ns, by_time): only those that
    commit after it are needed, so what comes before is passed over in C
    (apl_entries_start) until the first of them."""
    seen = 0
    cur: TxnRecord | None = None
    last = ffi.new("uint64_t *")
    for blob in blobs:
        start = 0
        if after is not None:
            start = lib.apl_entries_start(ffi.from_buffer(blob), len(blob), after[0], after[1], after[2], last)
            if start:
                cur = None
        for pos, f in walk(blob, start):
            serial = f[E_SERIAL]
            if serial <= seen:
                continue
            if upto is not None and serial > upto:
                return
            seen = serial
            kind = f[E_KIND]
            if kind in _CHANGES:
                if cur is not None and (files is None or f[E_FILE] in files):
                    key, b, a = _images(blob, pos, f)
                    cur.changes.append(Change(f[E_FILE], KINDS[kind], key, f[E_BLOCK], b, a))
            elif kind == _BEGIN:
                t = tlog.decode(blob[pos + _H + f[E_KLEN]:pos + _H + f[E_KLEN] + f[E_ALEN]])
                cur = TxnRecord(f[E_TXN], serial, program=t.program, version=t.version, input=t.input)
            elif kind == _COMMIT or kind == _CANCEL:
                if after is not None and kind == _COMMIT and (f[E_TIME] > after[1] if after[2]
                                                               else serial > after[0]):
                    after = None        # the first one needed: from here on every entry is read
                if cur is not None and cur.txn == f[E_TXN]:
                    cur.serial, cur.time_ns = serial, f[E_TIME]
                    cur.state = "committed" if kind == _COMMIT else "cancelled"
                    yield cur
                cur = None
            elif kind == GAP:
                cur = None
                yield None


def transactions(blobs: Iterable[bytes], *, files: set | None = None, keep: Callable[[TxnRecord], bool],
                 limit: int, current: Callable[[int, bytes], bytes | None] | None = None,
                 upto: int | None = None, after: tuple | None = None) -> tuple[list[TxnRecord], TxnRecord | None]:
    """The committed transactions `keep` accepts, oldest first, at most
    `limit` (and the first one left out, for paging). Every A image is
    filled in: kept, rebuilt from a delta, the B image of the record's next
    change, or `current(file, key)` (its state now) for its last change —
    UNKNOWN when none of those applies (a gap after it). `after` (serial,
    time_ns, by_time): `keep` takes none that commits at or before it, so
    the entries before those are not read one by one."""
    out: list[TxnRecord] = []
    more = None
    pending: dict = {}          # (file, key) -> the change of a kept transaction whose A image is not known
    for t in _txns(blobs, files, upto, after):
        if t is None:
            pending.clear()     # what came after the gap is unknown: A images stay UNKNOWN
            continue
        if t.state != "committed":
            continue
        for ch in t.changes:
            k = (ch.file, ch.key)
            p = pending.pop(k, None)
            if p is not None and ch.b is not UNKNOWN:
                p.a = ch.b
        if more is not None:
            if not pending:
                break
            continue
        if not keep(t):
            continue
        if len(out) >= limit:
            more = t
            continue
        out.append(t)
        for ch in t.changes:
            if ch.a is UNKNOWN:
                pending[(ch.file, ch.key)] = ch
    if current is not None:
        for (file, key), ch in pending.items():
            ch.a = current(file, key)
    return out, more


@dataclass
class UndoPlan:
    txn: TxnRecord
    records: dict            # (file, key) -> the B image to put back (None: delete the record)
    after: dict              # (file, key) -> the A image it left (UNKNOWN when not kept)
    conflicts: list          # (later TxnRecord, [(file, key), ...]) that changed the same records


def undo_plan(blobs: Iterable[bytes], txn: int, *, files: set, upto: int | None = None,
              where: str = "the log history") -> UndoPlan:
    """What cancelling committed transaction `txn` changes (its B images put
    back), and the later committed transactions that changed any of its
    records (then it cannot be cancelled: the caller refuses)."""
    found: TxnRecord | None = None
    keys: set = set()
    conflicts = []
    for t in _txns(blobs, files, upto):
        if t is None:
            if found is not None:
                raise errors.HistoryError(f"cancel transaction {txn}: {where} has a gap after it, so whether "
                                          "later transactions changed its records is unknown")
            continue
        if found is None:
            if t.txn == txn:
                if t.state != "committed":
                    raise errors.TransactionStateError(f"cancel transaction {txn}: it did not commit "
                                                       "(it failed while committing and was undone)", txn=txn)
                found = t
                keys = {(c.file, c.key) for c in t.changes}
            continue
        if t.state != "committed":
            continue
        hit = [(c.file, c.key) for c in t.changes if (c.file, c.key) in keys]
        if hit:
            conflicts.append((t, hit))
    if found is None:
        raise errors.HistoryError(f"cancel transaction {txn}: {where} holds no committed transaction {txn} "
                                  "(it is older than the history reaches back, or has no such number)", txn=txn)
    records, after = {}, {}
    for c in found.changes:
        k = (c.file, c.key)
        if c.b is UNKNOWN:
            raise errors.HistoryError(f"cancel transaction {txn}: {where} holds it without B images "
                                      "(its primary sends none: send_b_logs = false)", txn=txn)
        records.setdefault(k, c.b)
        after[k] = c.a
    return UndoPlan(found, records, after, conflicts)
