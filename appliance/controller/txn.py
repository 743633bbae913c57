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
mirrors exactly what happened — followed by a CANCEL entry ([0122]). All of
that is one C call per transaction (apl_commit_txn in cext/apl_txn.c).
"""
from __future__ import annotations

import struct
import time
from typing import Any

from .._native import lib
from ..store import tlog
from ..store.records import TableSchema
from ..store.writer import Writer

__all__ = ["Txn", "Change", "Committer"]

TXN_INSERT = lib.APL_TXN_INSERT
TXN_UPDATE = lib.APL_TXN_UPDATE
TXN_DELETE = lib.APL_TXN_DELETE


class Change:
    """The net effect of a transaction on one record."""

    __slots__ = ("table", "key", "pk", "before", "before_rec", "after_rec", "after", "after_alt")

    def __init__(self, table: TableSchema, key: Any, pk: bytes, before: bytes | None,
                 before_rec: dict | None) -> None:
        self.table = table
        self.key = key                  # primary-key value
        self.pk = pk                    # encoded primary key
        self.before = before            # committed value (B log); None when absent
        self.before_rec = before_rec
        self.after_rec = before_rec     # None = deleted / absent
        self.after = before             # encoded after_rec (A log)
        self.after_alt = None           # index entries of after_rec, when known

    def alt_after(self) -> list:
        if self.after_alt is None:
            self.after_alt = self.table.alt_entries(self.after_rec, self.pk) if self.after_rec else []
        return self.after_alt


class Txn:
    """A transaction of one session, from BEGIN to commit or cancel."""

    __slots__ = ("number", "program", "input", "version", "session", "started_ns", "locks", "waiting_for",
                 "changes", "state", "results", "durability", "wait", "reason", "commit_timeout", "queued_ns",
                 "pipelined", "failure", "tlog", "steps")

    def __init__(self, number: int, program: str | None, input: Any, session=None, pipelined: bool = False,
                 version: str | None = None) -> None:
        self.number = number
        self.program = program
        self.input = input
        self.version = version       # the program callable's version (db.run), or None
        self.session = session
        self.started_ns = time.monotonic_ns()
        self.locks: set = set()
        self.waiting_for = None
        self.changes: dict = {}      # (file, pk) -> Change, first-touch order
        self.state = "open"          # open, committing, committed, cancelled
        self.results = None
        self.durability = "quorum"   # what the commit waits for (controller.sync)
        self.wait = True             # reply only once that durability is reached
        self.reason = None           # why it was cancelled (Controller._cancel)
        self.commit_timeout = None   # seconds commit waits for that durability (BackupTimeoutError)
        self.queued_ns = 0           # when it joined the group-commit queue (commit latency)
        self.pipelined = pipelined   # its client sends statements without waiting: a failed write rolls it back
        self.failure = None          # why a pipelined statement rolled it back (Transactions.fail)
        self.tlog = None             # the T log (store.tlog), packed once at BEGIN
        self.steps = None            # inserts of new records as packed steps (step), kept without a
        #                              Change each: a bulk load's (Transactions.load); None when none

    def changed(self) -> bool:
        """Whether committing it changes anything."""
        return bool(self.steps) or any(c.after != c.before for c in self.changes.values())

    def current(self, file: int, pk: bytes) -> Change | None:
        return self.changes.get((file, pk))


class Committer:
    """Applies committing transactions to the store inside one batch: one C
    call per transaction (apl_commit_txn) applies and logs every step."""

    def __init__(self, writer: Writer) -> None:
        self.w = writer

    def apply(self, txn: Txn, now: int) -> int:
        """Apply and log one transaction; returns the serial of its COMMIT
        entry. On failure it has been undone (and the undo logged) and the
        step's error is raised."""
        ops = bytearray()
        for ch in txn.changes.values():
            if ch.after == ch.before:
                continue
            t = ch.table
            if ch.after_rec is None:  # delete
                step(ops, TXN_DELETE, t.file, ch.pk, b"")
                for fid, ak in t.alt_entries(ch.before_rec, ch.pk):
                    step(ops, TXN_DELETE, fid, ak, b"")
            elif ch.before is None:  # insert
                step(ops, TXN_INSERT, t.file, ch.pk, ch.after)
                for fid, ak in ch.alt_after():
                    step(ops, TXN_INSERT, fid, ak, b"")
            else:
                step(ops, TXN_UPDATE, t.file, ch.pk, ch.after)
                if t.alt:
                    old_alt = t.alt_entries(ch.before_rec, ch.pk)
                    new_alt = ch.alt_after()
                    if old_alt != new_alt:
                        for fid, ak in old_alt:
                            if (fid, ak) not in new_alt:
                                step(ops, TXN_DELETE, fid, ak, b"")
                        for fid, ak in new_alt:
                            if (fid, ak) not in old_alt:
                                step(ops, TXN_INSERT, fid, ak, b"")
        if txn.steps:
            ops += txn.steps
        packed = txn.tlog if txn.tlog is not None else tlog.encode(txn.program, txn.input, txn.version)
        return self.w.commit_txn(txn.number, now, packed, ops)


_OP = struct.Struct("<B3xIII")
_PAD = b"\0" * 8


def step(buf: bytearray, op: int, file: int, key: bytes, value: bytes) -> None:
    buf += _OP.pack(op, file, len(key), len(value))
    buf += key
    buf += value
    pad = -(len(key) + len(value)) & 7
    if pad:
        buf += _PAD[:pad]
