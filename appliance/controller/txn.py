"""Transactions on the controller, and how a commit reaches shared memory.

A transaction's statements run as they arrive: each one locks its record,
takes the B log (the committed pre-image: stable, because the record is
locked from then on) and computes the A log (post-image). Nothing reaches
shared memory before COMMIT, so readers never see part of a transaction and
cancelling one (by the client, by a lock timeout, as a deadlock victim, or
because its client went away) only has to drop its changes and locks.

At COMMIT the transaction joins the current group-commit batch
(:class:`Committer`): its changes are applied to the blocks, and the change
log receives, in order, BEGIN (the T log: program and input), one entry per
record change (file, kind, block number, record offset, key, A and B images),
BLOCK images for blocks whose structure changed, the alternate-key index
changes, and COMMIT. If applying fails part-way (memory full), the changes
already applied are undone from their B images — and logged, so a secondary
mirrors exactly what happened — followed by a CANCEL entry ([0122]).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .. import errors
from .._native import lib
from ..store.records import TableSchema
from ..store.writer import KIND_DELETE, Writer

__all__ = ["Txn", "Change", "Committer"]

CE_BEGIN = lib.APL_CE_BEGIN
CE_COMMIT = lib.APL_CE_COMMIT
CE_CANCEL = lib.APL_CE_CANCEL
STRUCT = lib.APL_CEF_STRUCT
PUT_INSERT = lib.APL_PUT_INSERT
PUT_UPDATE = lib.APL_PUT_UPDATE

_packb = msgpack.Packer(use_bin_type=True).pack


@dataclass(slots=True)
class Change:
    """The net effect of a transaction on one record."""

    table: TableSchema
    key: Any                   # primary-key value
    pk: bytes                  # encoded primary key
    before: bytes | None       # committed value (B log), None when absent
    before_rec: dict | None
    after_rec: dict | None     # None = deleted / absent
    after: bytes | None = None  # encoded after_rec (A log)


@dataclass(eq=False)
class Txn:
    number: int
    program: str | None
    input: Any
    session: Any = None
    started_ns: int = field(default_factory=time.monotonic_ns)
    locks: set = field(default_factory=set)
    waiting_for: Any = None
    changes: dict = field(default_factory=dict)   # (file, pk) -> Change, first-touch order
    state: str = "open"                           # open, committing, committed, cancelled

    def current(self, file: int, pk: bytes) -> Change | None:
        return self.changes.get((file, pk))


class Committer:
    """Applies committing transactions to the store inside one batch."""

    def __init__(self, writer: Writer) -> None:
        self.w = writer

    def _logged(self, kind: int, file: int, key: bytes, a: bytes, b: bytes, txn: int, now: int) -> None:
        info = self.w.op_info()
        flags = STRUCT if info.structs else 0
        self.w.log(kind, txn=txn, time_ns=now, file=file, block=info.block, offset=info.offset,
                   flags=flags, key=key, a=a, b=b)
        for number, removed in info.structs:
            self.w.log_block(number, txn=txn, time_ns=now, removed=removed)

    def _put(self, file, key, value, mode, txn, now, before: bytes | None) -> None:
        kind, old = self.w.put(file, key, value, mode)
        self._logged(kind, file, key, value, old or b"", txn, now)

    def _delete(self, file, key, txn, now) -> None:
        old = self.w.delete(file, key)
        self._logged(KIND_DELETE, file, key, b"", old, txn, now)

    def apply(self, txn: Txn, now: int) -> int:
        """Apply and log one transaction; returns the serial of its COMMIT
        entry. On failure undo it (logged) and raise."""
        w = self.w
        n = txn.number
        w.log(CE_BEGIN, txn=n, time_ns=now, a=_packb([txn.program, txn.input]))
        undo: list[tuple] = []  # (op, file, key, value) that reverses each applied change
        try:
            for ch in txn.changes.values():
                if ch.after_rec is None and ch.before is None:
                    continue
                if ch.after is not None and ch.after == ch.before:
                    continue
                t = ch.table
                f = t.file
                if ch.after_rec is None:  # delete
                    self._delete(f, ch.pk, n, now)
                    undo.append(("insert", f, ch.pk, ch.before))
                    for fid, ak in t.alt_entries(ch.before_rec, ch.pk):
                        self._delete(fid, ak, n, now)
                        undo.append(("insert", fid, ak, b""))
                    continue
                if ch.before is None:  # insert
                    self._put(f, ch.pk, ch.after, PUT_INSERT, n, now, None)
                    undo.append(("delete", f, ch.pk, None))
                    for fid, ak in t.alt_entries(ch.after_rec, ch.pk):
                        self._put(fid, ak, b"", PUT_INSERT, n, now, None)
                        undo.append(("delete", fid, ak, None))
                    continue
                self._put(f, ch.pk, ch.after, PUT_UPDATE, n, now, ch.before)
                undo.append(("update", f, ch.pk, ch.before))
                old_alt = dict(t.alt_entries(ch.before_rec, ch.pk))
                new_alt = dict(t.alt_entries(ch.after_rec, ch.pk))
                for fid in t.alt.values():
                    fid = fid[0]
                    o, nw = old_alt.get(fid), new_alt.get(fid)
                    if o == nw:
                        continue
                    if o is not None:
                        self._delete(fid, o, n, now)
                        undo.append(("insert", fid, o, b""))
                    if nw is not None:
                        self._put(fid, nw, b"", PUT_INSERT, n, now, None)
                        undo.append(("delete", fid, nw, None))
        except errors.MemoryFullError:
            self._undo(undo, n, now)
            raise
        return w.log(CE_COMMIT, txn=n, time_ns=now)

    def _undo(self, undo: list[tuple], n: int, now: int) -> None:
        """Reverse the applied changes from their B images, using the reserve.
        Each reversal is logged like any change, then CANCEL ([0122])."""
        self.w.use_reserve(True)
        try:
            for op, f, key, value in reversed(undo):
                if op == "delete":
                    self._delete(f, key, n, now)
                elif op == "insert":
                    self._put(f, key, value, PUT_INSERT, n, now, None)
                else:
                    self._put(f, key, value, PUT_UPDATE, n, now, None)
        finally:
            self.w.use_reserve(False)
        self.w.log(CE_CANCEL, txn=n, time_ns=now)
