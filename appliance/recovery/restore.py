"""Point-in-time restore plans: B logs applied in reverse ([0085], [0123]).

:func:`plan` reads change-log entries (a history directory's parts, a
primary's ring: :func:`appliance.recovery.history.log_blobs`) and works out,
for every record that transactions committed after a target changed, the
image it had at the target: the B image of the first of those changes (no
image: the record did not exist). Applying that image to each record is the
same as applying every B log in reverse order of acquisition, newest first,
back to the target — but touches each record once, so a restore costs the
entries read plus the records changed.

The target is a serial or a time (:class:`Target`): every transaction whose
COMMIT comes after it is undone (one whose BEGIN is before the target and
its COMMIT after is undone too: it had not committed then). Transactions
that failed while committing (CANCEL) changed nothing and are skipped.

Used by the controller for ``appliance restore`` (it commits the plan as
logged transactions, so secondaries follow), by batch mode's rewind on a
secondary (``batch begin --at``: it applies the plan to its own blocks), and
by anything else that must take records back to an earlier state (a
rewind after failover) — the plan is data, applying it is the caller's.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterable

from .. import errors
from .._native import ffi, lib
from ..store.changelog import (E_ALEN, E_BLEN, E_BLOCK, E_FILE, E_FLAGS, E_KIND, E_KLEN, E_SERIAL, E_TIME, E_TXN,
                               ENTRY, walk)
from .history import GAP

__all__ = ["Target", "Plan", "Planner", "plan", "parse_target"]

_H = ENTRY.size
_BEGIN, _COMMIT, _CANCEL = lib.APL_CE_BEGIN, lib.APL_CE_COMMIT, lib.APL_CE_CANCEL
_INSERT, _UPDATE, _DELETE = lib.APL_CE_INSERT, lib.APL_CE_UPDATE, lib.APL_CE_DELETE
_NO_B = lib.APL_CEF_NO_B
_MISSING_B = object()       # a change whose B image was not kept (send_b_logs = false)
_SKIPPED = 0                # Planner.coverage once older entries were passed over: whole from before any BEGIN
_REL = re.compile(r"^-(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Target:
    """A point to go back to: just after serial `serial`, or at wall-clock
    time `time_ns` (every transaction committed later is undone)."""

    serial: int | None = None
    time_ns: int | None = None

    def __post_init__(self):
        if (self.serial is None) == (self.time_ns is None):
            raise errors.WrongTypeError("a restore target is a serial or a time, one of them")
        v = self.serial if self.serial is not None else self.time_ns
        if type(v) is not int or v < 0:
            raise errors.WrongTypeError(f"a restore target must be a non-negative integer, not {v!r}")

    def after(self, serial: int, time_ns: int) -> bool:
        """Does a COMMIT at (serial, time_ns) come after the target?"""
        return serial > self.serial if self.serial is not None else time_ns > self.time_ns

    def describe(self) -> str:
        if self.serial is not None:
            return f"serial {self.serial}"
        return f"{datetime.fromtimestamp(self.time_ns / 1e9).isoformat(timespec='milliseconds')}"

    def wire(self) -> dict:
        return {"serial": self.serial} if self.serial is not None else {"time_ns": self.time_ns}

    @classmethod
    def from_wire(cls, v) -> "Target":
        if not isinstance(v, dict) or len(v) != 1 or not ({"serial", "time_ns"} & v.keys()):
            raise errors.WrongTypeError(f"a restore target is {{serial: n}} or {{time_ns: n}}, not {v!r}")
        return cls(serial=v.get("serial"), time_ns=v.get("time_ns"))


def parse_target(text: str, now: float | None = None) -> Target:
    """A target as an operator writes it: a serial (an integer), a time
    (ISO 8601, e.g. 2026-11-25T10:30:00 local or with an offset), or a
    time before now (-90s, -5m, -2h, -1d)."""
    s = str(text).strip()
    if s.isdigit():
        return Target(serial=int(s))
    rel = _REL.match(s)
    if rel:
        now = time.time() if now is None else now
        return Target(time_ns=int((now - float(rel.group(1)) * _UNIT[rel.group(2)]) * 1e9))
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        raise errors.WrongTypeError(f"--to {text!r}: expected a serial (an integer), a time (ISO 8601, e.g. "
                                    "2026-11-25T10:30:00) or a time before now (-90s, -5m, -2h, -1d)") from None
    return Target(time_ns=int(dt.timestamp() * 1e9))


@dataclass
class Plan:
    """What restoring to a target changes. `records` maps (file id, encoded
    key) to the image the record had at the target (None: it did not
    exist); the caller compares it with the current state."""

    target: Target
    to_serial: int = 0                  # the last serial whose state is restored (a transaction boundary)
    records: dict = field(default_factory=dict)
    entries: int = 0                    # B-log records (change entries) of the undone transactions
    transactions: int = 0               # transactions undone
    first_txn: tuple | None = None      # (txn, commit serial, time_ns) of the first one undone
    last_txn: tuple | None = None
    scanned: int = 0                    # entries read
    window: int | None = None           # the earliest serial the entries could restore to


def plan(blobs: Iterable[bytes], target: Target, **kw) -> Plan:
    """The restore plan to `target` from change-log entries in serial order
    (repeats are dropped); see :class:`Planner` for the options and errors."""
    p = Planner(target, **kw)
    for blob in blobs:
        if not p.feed(blob):
            break
    return p.finish()


class Planner:
    """:func:`plan` a blob at a time (the controller lets other sessions run
    between two). `files`: only records of these file ids; `blocks`: only
    records changed in these block numbers after the target; `upto`: ignore
    entries past this serial (a secondary: what it applied). HistoryError
    when the entries do not reach back to the target, have a gap after it,
    or lack the B images it needs — nothing is planned then."""

    def __init__(self, target: Target, *, files: set | None = None, blocks: set | None = None,
                 upto: int | None = None, where: str = "the log history") -> None:
        self.out = Plan(target)
        self.target, self.files, self.blocks, self.upto, self.where = target, files, blocks, upto, where
        self.in_blocks: set | None = set() if blocks is not None else None
        self.seen = 0
        self.undoing = False
        self.cur: dict | None = None    # the open transaction: key -> its first B image
        self.cur_n = 0
        self.begin_serial = 0
        self.boundary = 0               # serial of the last transaction boundary passed
        self.coverage = None            # first BEGIN after the last gap: entries are whole from there
        self.gap_at = None              # a gap not followed by a boundary yet
        self.done = False
        self.skipped = False            # entries before the target were passed over (feed)
        self._last = ffi.new("uint64_t *")

    def feed(self, blob: bytes) -> bool:
        """Take the entries of one blob; False once `upto` is passed. Until
        the first transaction to undo is found, what comes before it is
        passed over in C (apl_entries_start): only its last boundary is read."""
        if self.done:
            return False
        out, records, target, files, blocks = self.out, self.out.records, self.target, self.files, self.blocks
        in_blocks, upto, where = self.in_blocks, self.upto, self.where
        seen, undoing, cur, cur_n = self.seen, self.undoing, self.cur, self.cur_n
        begin_serial, boundary, coverage, gap_at = self.begin_serial, self.boundary, self.coverage, self.gap_at
        scanned = 0
        start = 0
        if not undoing:
            t = target
            start = lib.apl_entries_start(ffi.from_buffer(blob), len(blob), t.serial or 0, t.time_ns or 0,
                                          int(t.serial is None), self._last)
            if start > 0:
                # entries older than the target were passed over: whole from before the first to undo
                cur, coverage = None, (coverage if coverage is not None else _SKIPPED)
                self.skipped = True
        try:
            for pos, f in walk(blob, start):
                serial = f[E_SERIAL]
                if serial <= seen:
                    continue
                if upto is not None and serial > upto:
                    self.done = True
                    break
                seen = serial
                scanned += 1
                kind = f[E_KIND]
                if kind == _UPDATE or kind == _INSERT or kind == _DELETE:
                    if cur is None:
                        continue        # the end of a transaction whose beginning is not here
                    file = f[E_FILE]
                    if files is not None and file not in files:
                        continue
                    cur_n += 1
                    klen = f[E_KLEN]
                    key = blob[pos + _H:pos + _H + klen]
                    k = (file, key)
                    if blocks is not None and f[E_BLOCK] in blocks:
                        in_blocks.add(k)
                    if k in cur:
                        continue
                    if kind == _INSERT:
                        cur[k] = None
                    elif f[E_FLAGS] & _NO_B:
                        cur[k] = _MISSING_B
                    else:
                        b0 = pos + _H + klen + f[E_ALEN]
                        cur[k] = blob[b0:b0 + f[E_BLEN]]
                elif kind == _BEGIN:
                    cur, cur_n, begin_serial = {}, 0, serial
                    if coverage is None:
                        coverage = serial
                elif kind == _COMMIT:
                    if not undoing and target.after(serial, f[E_TIME]):
                        undoing = True
                        out.to_serial = boundary
                        _check_reach(target, cur, coverage, begin_serial, gap_at, where)
                    if undoing:
                        if cur is None:
                            raise errors.HistoryError(
                                f"restore to {target.describe()}: {where} begins inside transaction "
                                f"{f[E_TXN]}, which committed after it: its changes cannot be undone",
                                **_reach(coverage))
                        for k, img in cur.items():
                            if k not in records:
                                if img is _MISSING_B:
                                    raise errors.HistoryError(
                                        f"restore to {target.describe()}: {where} holds transaction {f[E_TXN]} "
                                        "without B images (its primary sends none: send_b_logs = false)",
                                        **_reach(coverage))
                                records[k] = img
                        out.entries += cur_n
                        out.transactions += 1
                        t = (f[E_TXN], serial, f[E_TIME])
                        out.first_txn = out.first_txn or t
                        out.last_txn = t
                    boundary = serial
                    cur = None
                    gap_at = None
                elif kind == _CANCEL:
                    boundary = serial
                    cur = None
                elif kind == GAP:
                    if undoing:
                        raise errors.HistoryError(
                            f"restore to {target.describe()}: {where} has a gap after it (serials from "
                            f"{serial} were lost: the log was not retained, or a block copy replaced it)")
                    cur, coverage, gap_at = None, None, serial
                    boundary = serial - 1
        finally:
            self.seen, self.undoing, self.cur, self.cur_n = seen, undoing, cur, cur_n
            self.begin_serial, self.boundary, self.coverage, self.gap_at = begin_serial, boundary, coverage, gap_at
            out.scanned += scanned
        return not self.done

    def finish(self) -> Plan:
        out = self.out
        # (entries passed over: the window is not known here; the history's status has it)
        out.window = (self.coverage - 1) if self.coverage not in (None, _SKIPPED) else None
        if not self.undoing:
            t = self.target
            out.to_serial = self.boundary if t.serial is None else max(self.boundary, t.serial)
        if self.in_blocks is not None:
            for k in [k for k in out.records if k not in self.in_blocks]:
                del out.records[k]
        return out


def _reach(coverage) -> dict:
    return {"earliest_serial": coverage - 1} if coverage else {}   # (0: older entries passed over)


def _check_reach(target, cur, coverage, begin_serial, gap_at, where) -> None:
    """The first transaction to undo: the entries must be whole from before it."""
    if gap_at is not None or coverage is None or cur is None:
        raise errors.HistoryError(f"restore to {target.describe()}: {where} does not reach back that far "
                                  f"(transactions committed after it are missing)", **_reach(coverage))
    if begin_serial == coverage and coverage > 1 and not (target.serial is not None and
                                                           target.serial >= coverage - 1):
        raise errors.HistoryError(f"restore to {target.describe()}: {where} reaches back only to serial "
                                  f"{coverage - 1}", **_reach(coverage))
