"""Re-running transactions with a corrected program ([0014], [0086]).

The patent's example: 10,000 is withdrawn from an account holding 100,000
but a faulty program records 110,000, and later transactions read that
balance. :func:`rerun` restores the data to just before the faulty
program's first transaction (after `since`), then runs every later
transaction again from its T log, in the original order:

- the faulty program's with the corrected one (`fixed`), on the same input;
- every other program's with the callable its T log names, when that is
  still the version it recorded (else it refuses, saying which);
- a transaction without a callable (``db.transaction(program="x")``, a
  load, an earlier restore) by re-applying its A images — when its B images
  are the state it meets now; else it refuses and lists the conflicts.

Everything is worked out first, against a private copy of the records
concerned (the state now with the restore's B images over it), while new
writes are held (OP_HOLD): nothing changes unless every transaction can be
re-run. Then, still holding writes, the restore commits (T log program
"restore") and each re-run transaction commits as its own logged
transaction — the program that ran now, its version, the same input — so
every secondary follows and the repair itself can be undone. A transaction
that the corrected program (or a later one meeting the corrected data)
now refuses with an exception is re-run as cancelled: it changes nothing,
and the report says why.

If the rerun is cut short after the restore committed (the operator's
process killed), ``appliance restore --to <serial>`` with the serial it
printed first (the state before it began) undoes what was done.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import errors
from ..client.session import Session, result
from ..wire import messages as m
from .programs import resolve, version_of
from .restore import Target

__all__ = ["rerun", "RerunReport", "SimTx"]

_PIPELINE = 256


@dataclass
class Rerun:
    """One transaction as re-run: what ran and what it wrote."""
    txn: int                          # the original transaction
    serial: int
    program: str | None               # what runs now (the fixed program for the faulty one's)
    version: str | None
    input: Any
    how: str                          # "fixed", "program", "a_images"
    writes: dict = field(default_factory=dict)   # (table, key) -> record or None (deleted)
    cancelled: str | None = None      # why the re-run was cancelled (its exception)


@dataclass
class RerunReport:
    program: str
    fixed: str
    fixed_version: str
    to_serial: int | None = None      # restored to (just before the faulty program's first transaction)
    before_serial: int | None = None  # the state before the rerun began (restore --to it undoes the rerun)
    transactions: list = field(default_factory=list)
    differences: list = field(default_factory=list)   # {table, key, now, after, fields}
    committed: list = field(default_factory=list)     # transaction numbers committed by the rerun
    dry_run: bool = True
    seconds: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"program": self.program, "fixed": self.fixed, "fixed_version": self.fixed_version,
                "to_serial": self.to_serial, "before_serial": self.before_serial, "dry_run": self.dry_run,
                "transactions": [{"txn": r.txn, "serial": r.serial, "program": r.program, "version": r.version,
                                  "how": r.how, "input": r.input, "cancelled": r.cancelled,
                                  "writes": len(r.writes)} for r in self.transactions],
                "differences": self.differences, "committed": self.committed, "seconds": self.seconds}


class SimTx:
    """What a program sees while its transaction is re-run: the Transaction
    statements (get, insert, update, delete, put), on a private copy of the
    records. Validation is the table schema's, as on the controller."""

    def __init__(self, state: "_State") -> None:
        self._state = state
        self.writes: dict = {}
        self.state = "open"
        self.number = None
        self.result = None

    def _schema(self, table: str):
        return self._state.schema.table(table)

    def get(self, table: str, key, *, for_update: bool = False):
        t = self._schema(table)
        t.key(key)
        return _copy(self._get(table, key))

    def _get(self, table, key):
        k = (table, key)
        if k in self.writes:
            return self.writes[k]
        return self._state.get(table, key)

    def insert(self, table: str, record: dict) -> None:
        t = self._schema(table)
        rec = t.full(record)
        key = rec[t.pk]
        t.encode(rec, t.key(key))
        if self._get(table, key) is not None:
            raise errors.DuplicateKeyError(f"{table}.insert({key!r}): duplicate primary key", table=table, key=key)
        self.writes[(table, key)] = rec

    def update(self, table: str, key, changes: dict) -> None:
        t = self._schema(table)
        old = self._get(table, key)
        if old is None:
            raise errors.NoSuchRecordError(f"{table}.update({key!r}): no such record", table=table, key=key)
        new = t.merge(old, changes, key)
        t.encode(new, t.key(key))
        self.writes[(table, key)] = new

    def delete(self, table: str, key) -> None:
        self._schema(table).key(key)
        if self._get(table, key) is None:
            raise errors.NoSuchRecordError(f"{table}.delete({key!r}): no such record", table=table, key=key)
        self.writes[(table, key)] = None

    def put(self, table: str, key, record: dict) -> str:
        t = self._schema(table)
        rec = t.full(record, key)
        t.encode(rec, t.key(key))
        existed = self._get(table, key) is not None
        self.writes[(table, key)] = rec
        return "update" if existed else "insert"

    def cancel(self) -> None:
        raise _Cancelled("the program cancelled its transaction")


class _Cancelled(Exception):
    pass


class _State:
    """The records as the re-run sees them: the database now, with the
    restore's images and the re-run transactions' writes over it."""

    def __init__(self, db) -> None:
        self.db = db
        self.schema = db.schema
        self.over: dict = {}

    def get(self, table, key):
        k = (table, key)
        if k in self.over:
            return self.over[k]
        return self.db.table(table).get(key)

    def now(self, table, key):
        return self.db.table(table).get(key)


def _copy(rec):
    return dict(rec) if rec is not None else None


def _history(s: Session, query: dict) -> list:
    """Every transaction the history query answers, following `next`."""
    out = []
    q = dict(query)
    while True:
        r = s.call([m.OP_HISTORY, q], "history")
        out.extend(r["transactions"])
        if r["next"] is None:
            return out
        q["since"] = r["next"]


def _call(s: Session, req: list, what: str):
    return result(s.call_many([req], retry=False)[0], what)


def rerun(db, program: str, fixed: str, *, since: Target | None = None, dry_run: bool = True,
          path: tuple[str, ...] = (), timeout: float = 60.0, progress: Callable[[str, int, int], None] | None = None,
          commit_timeout: float | None = None) -> RerunReport:
    """Re-run `program`'s transactions (after `since`) with `fixed`, and
    every later transaction after them (see the module docstring). With
    `dry_run` nothing changes: the report says what would. Raises
    ProgramError (a program that cannot be imported or whose version
    differs from the one recorded), ConflictError (a transaction without a
    callable whose B images no longer match), HistoryError (the history
    does not reach back), and changes nothing then."""
    t0 = time.monotonic()
    fixed_fn = resolve(fixed, path)
    rep = RerunReport(program, fixed, version_of(fixed_fn), dry_run=dry_run)
    cfg = db.config
    s = Session(str(cfg.socket_path), cfg.name, name="appliance-rerun", timeout=timeout + 30,
                max_frame=cfg.controller.max_frame)
    s.connect()
    held = False
    try:
        if not dry_run:
            _call(s, [m.OP_HOLD, "begin", timeout], "hold writes")
            held = True
        rep.before_serial = s.call([m.OP_STATUS], "status")["log"]["serial"]
        q = {"program": program, "limit": 1, "images": False}
        if since is not None:
            q.update({"since": since.serial} if since.serial is not None else {"since_ns": since.time_ns})
        first = s.call([m.OP_HISTORY, q], "history")["transactions"]
        if not first:
            rep.seconds["plan"] = round(time.monotonic() - t0, 4)
            return rep
        target = first[0]["begin_serial"] - 1
        rep.to_serial = target
        txns = _history(s, {"since": target + 1, "limit": 10_000, "images": True})
        t1 = time.monotonic()
        plan = _simulate(db, txns, program, fixed, fixed_fn, rep.fixed_version, path, progress)
        rep.transactions = plan.reruns
        rep.differences = plan.differences()
        rep.seconds["plan"] = round(time.monotonic() - t0, 4)
        rep.seconds["simulate"] = round(time.monotonic() - t1, 4)
        if dry_run:
            return rep
        t2 = time.monotonic()
        r = _call(s, [m.OP_RESTORE, {"serial": target}, {"timeout": timeout, "commit_timeout": commit_timeout}],
                  "restore")
        rep.committed.extend(r.get("txns") or [])
        reqs = []
        for i, rr in enumerate(plan.reruns):
            if rr.cancelled is not None or not rr.writes:
                continue
            steps = [[m.OP_DELETE, t, k] if rec is None else [m.OP_PUT, t, k, rec]
                     for (t, k), rec in rr.writes.items()]
            opts = {"commit_timeout": commit_timeout}
            if rr.version is not None:
                opts["version"] = rr.version
            reqs.append([m.OP_ATOMIC, rr.program, rr.input, steps, opts])
        done = 0
        for i in range(0, len(reqs), _PIPELINE):
            group = reqs[i:i + _PIPELINE]
            for reply in s.call_many(group, retry=False):
                rep.committed.append(result(reply, "re-run transaction")["txn"])
            done += len(group)
            if progress:
                progress("commit", done, len(reqs))
        rep.seconds["commit"] = round(time.monotonic() - t2, 4)
        rep.dry_run = False
        wrong = plan.check(db)
        if wrong:
            raise errors.InternalError(f"rerun: after committing, {len(wrong)} record(s) differ from what the "
                                       f"re-run computed, e.g. {wrong[0]}")
        return rep
    finally:
        if held:
            try:
                _call(s, [m.OP_HOLD, "end"], "release writes")
            except errors.ApplianceError:
                pass   # the session's end releases them too
        s.close()
        rep.seconds["total"] = round(time.monotonic() - t0, 4)


class _Plan:
    def __init__(self, state: _State) -> None:
        self.state = state
        self.reruns: list[Rerun] = []
        self.touched: dict = {}     # (table, key) -> the record now (before the rerun)

    def differences(self) -> list:
        out = []
        for (t, k), now in self.touched.items():
            after = self.state.over.get((t, k), now)
            if after != now:
                fields = sorted(set(now or {}) | set(after or {}))
                changed = {f: [(now or {}).get(f), (after or {}).get(f)] for f in fields
                           if (now or {}).get(f) != (after or {}).get(f)}
                out.append({"table": t, "key": k, "now": now, "after": after, "fields": changed})
        return out

    def check(self, db) -> list:
        return [(t, k) for (t, k) in self.touched
                if db.table(t).get(k) != self.state.over.get((t, k), self.touched[(t, k)])]


def _simulate(db, txns: list, program: str, fixed: str, fixed_fn, fixed_version: str, path, progress) -> _Plan:
    state = _State(db)
    plan = _Plan(state)
    conflicts, refused = [], []
    callables: dict = {}
    # the restore: each record as the first transaction undone found it
    for t in txns:
        for c in t["changes"]:
            k = (c["table"], c["key"])
            if k not in plan.touched:
                plan.touched[k] = state.now(*k)
                if c.get("b_unknown"):
                    refused.append(f"transaction {t['txn']}: the history holds no B image of "
                                   f"{c['table']}[{c['key']!r}]")
                state.over[k] = c["b"]
    for i, t in enumerate(txns):
        rr = Rerun(t["txn"], t["serial"], t["program"], t["version"], t["input"], "program")
        if t["program"] == program:
            fn, rr.program, rr.version, rr.how = fixed_fn, fixed, fixed_version, "fixed"
        elif t["version"] is not None:
            fn = callables.get(t["program"])
            if fn is None:
                try:
                    fn = callables[t["program"]] = resolve(t["program"], path)
                except errors.ProgramError as e:
                    refused.append(f"transaction {t['txn']}: {e}")
                    continue
            now = version_of(fn)
            if now != t["version"]:
                refused.append(f"transaction {t['txn']}: program {t['program']!r} is version {now} now; the "
                               f"transaction ran version {t['version']}")
                continue
        else:
            fn = None
            rr.how = "a_images"
        if fn is None:
            for c in t["changes"]:
                k = (c["table"], c["key"])
                meets = state.get(*k)
                if c.get("a_unknown"):
                    conflicts.append(f"transaction {t['txn']} ({t['program'] or 'no program'}): the A image "
                                     f"of {c['table']}[{c['key']!r}] is not known")
                elif meets != c["b"]:
                    conflicts.append(f"transaction {t['txn']} ({t['program'] or 'no program'}) changed "
                                     f"{c['table']}[{c['key']!r}] from {c['b']!r}, but the re-run meets "
                                     f"{meets!r}")
                rr.writes[k] = c["a"]
        else:
            tx = SimTx(state)
            try:
                fn(tx, t["input"])
            except Exception as e:   # the program refuses now: its re-run is cancelled
                rr.cancelled = f"{type(e).__name__}: {e}"
                tx.writes = {}
            rr.writes = {k: v for k, v in tx.writes.items() if v != state.get(*k)}
        for k, v in rr.writes.items():
            if k not in plan.touched:
                plan.touched[k] = state.now(*k)
            state.over[k] = v
        plan.reruns.append(rr)
        if progress and i % 1000 == 0:
            progress("simulate", i, len(txns))
    if refused:
        raise errors.ProgramError(f"rerun of {program!r}: {len(refused)} transaction(s) cannot be re-run; nothing "
                                  "was changed: " + "; ".join(refused[:20]) + (" ..." if len(refused) > 20 else ""),
                                  program=program, refused="\n".join(refused))
    if conflicts:
        raise errors.ConflictError(f"rerun of {program!r}: {len(conflicts)} conflict(s); nothing was changed: "
                                   + "; ".join(conflicts[:20]) + (" ..." if len(conflicts) > 20 else ""),
                                   conflicts="\n".join(conflicts))
    return plan
