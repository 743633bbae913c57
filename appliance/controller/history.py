"""Going back in time on the controller: OP_HISTORY (which transactions
changed what, with B and A images), OP_RESTORE (point-in-time restore,
[0085], [0123]), OP_CANCEL_TXN (undo one committed transaction) and OP_HOLD
(an operator's rerun holds new writes while it works, :mod:`.hold`).

Where the log comes from: the appliance's history directory (kept by its
agent, appliance/replication/history.py) and, on a primary, its own
change-log ring for what the history has not reached yet
(appliance.recovery.history.log_blobs). A secondary reads its history up to
the serial it applied.

A restore or a cancel changes records as logged transactions of their own
(T log program "restore" or "cancel", with the target or the transaction),
through the same statements, locks and group commit as any client's, so
every secondary follows by ordinary replication and the change can itself
be undone. A restore bigger than one transaction should carry (more records
than ``controller.max_load_records``, or more change-log bytes than an
eighth of ``storage.log_size``) commits in consecutive parts, all while new
writes wait.

Concurrency. Reading and planning (the history's files, the ring, the
current records) run in a worker thread, so the loop keeps serving; the
request waits (``WAIT_WORK``) and polls the job every few milliseconds.
Shared with the worker: the Reader (its C reads are safe from any thread;
its buffers are per thread), the schema and config (never changed while a
job runs: a reload replaces ctl.cfg, the job keeps its own), the history
files (only the agent writes them; closed parts are renamed into place and
the current part is only appended to), and the job's progress dict (the
worker writes ints into it, status reads them: single stores under the
GIL). Nothing the worker reads is changed meanwhile for a restore or cancel:
they hold new writes (:mod:`.hold`) before planning, so the records they
plan from are the ones they change. Changing records stays on the loop
thread.
"""
from __future__ import annotations

import threading
import time

from .. import errors
from .._native import lib
from ..recovery import query as q
from ..recovery.history import HistoryDir, log_blobs
from ..recovery.restore import Planner, Target
from ..store import changelog
from ..wire import messages as m
from .loop import WAIT_WORK
from .ops import handler
from .txn import Change

__all__ = ["HistoryOps"]

_POLL_S = 0.003
_SHOW = 1000               # records a dry run lists (the count covers all)


class _Job(threading.Thread):
    def __init__(self, fn, args) -> None:
        super().__init__(daemon=True, name="recovery")
        self.fn, self.args = fn, args
        self.result = self.exc = None

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as e:      # handed to the request, raised there
            self.exc = e


class HistoryOps:
    def __init__(self, ctl) -> None:
        self.ctl = ctl
        self.log = ctl.log
        self.by_file = {t.file: t for t in ctl.schema.tables.values()}
        self.table_files = set(self.by_file)
        self.progress: dict | None = None
        self.last: dict | None = None      # the last operation's outcome (status)
        self.apply_times: dict = {}        # the last _apply's seconds: staging the changes, committing them

    # ------------------------------------------------------------------ where the log is

    def history_dir(self) -> HistoryDir | None:
        rc = self.ctl.cfg.replication
        if rc is None or rc.history_dir is None:
            return None
        return HistoryDir(self.ctl.cfg.resolve(rc.history_dir))

    def where(self) -> str:
        h = self.history_dir()
        own = "its change log" if not self.ctl.role.is_secondary else None
        parts = [f"the log history in {h.dir}" if h is not None else None, own]
        return " and ".join(p for p in parts if p) or "no log history"

    def upto(self) -> int | None:
        return self.ctl.agents.applied_serial()[0] if self.ctl.role.is_secondary else None

    def blobs(self, since: int = 0):
        h = self.history_dir()
        reader = None if self.ctl.role.is_secondary else self.ctl.reader
        if h is None and reader is None:
            raise errors.HistoryError(f"appliance {self.ctl.cfg.name!r} keeps no log history "
                                      f"(set replication.history_dir in {self.ctl.cfg.path})")
        return log_blobs(h, reader, since)

    def since_for(self, target: Target) -> int:
        """Where reading may start for a target: its serial, or the parts
        closed before its time (their entries are older)."""
        if target.serial is not None:
            return target.serial
        h = self.history_dir()
        since = 0
        if h is not None:
            for first, _last, p in h.parts():
                try:
                    if p.stat().st_mtime * 1e9 < target.time_ns - 5e9:
                        since = first
                except FileNotFoundError:
                    continue
        return since

    def window(self) -> dict | None:
        """The earliest point this appliance can restore to (status)."""
        hist = (self.ctl.agents.state.get("history") or {}) if self.ctl.agents.attached() else {}
        if hist.get("window"):
            return dict(hist["window"], source="history")
        if self.ctl.role.is_secondary:
            return None
        reader = self.ctl.reader
        try:   # the first transaction wholly in the ring (headers only: status and metrics ask often)
            found = changelog.find_entry(reader, changelog.bounds(reader)["tail"], lib.APL_CE_BEGIN, 100_000)
        except errors.ApplianceError:
            return None
        return {"serial": found[1] - 1, "time_ns": found[2], "source": "change log"} if found else None

    def status(self) -> dict:
        return {"progress": self.progress, "last": self.last, "writes_held": self.ctl.hold.status(),
                "rewind_window": self.window()}

    # ------------------------------------------------------------------ helpers

    def _work(self, sess, fn, *args):
        """Run fn(*args) in a worker thread; the request waits for it."""
        job = _Job(fn, args)
        job.start()
        ctl = self.ctl
        while job.is_alive():
            timer = ctl.add_timer(_POLL_S, lambda: ctl.resume(sess))
            try:
                yield WAIT_WORK
            finally:
                ctl.cancel_timer(timer)
        if job.exc is not None:
            raise job.exc
        return job.result

    def _hold(self, sess, what: str, timeout: float):
        """Hold new writes for this request unless its session holds them
        already; returns whether it took the hold (and must release it)."""
        if self.ctl.hold.holder is sess:
            return False
        yield from self.ctl.hold.acquire(sess, what, timeout)
        return True

    def _table(self, name) -> set:
        if name is None:
            return set(self.table_files)
        return {self.ctl.schema.table(name).file}

    def record(self, file: int, key: bytes, img) -> dict:
        t = self.by_file[file]
        return t.decode(img) if isinstance(img, bytes) else None

    def _key(self, file: int, key: bytes):
        return self.by_file[file].pk_codec.decode(key)

    def _current(self, version: int):
        reader = self.ctl.reader
        return lambda file, key: reader.get_raw(file, key, version)

    def _differences(self, records: dict, version: int) -> list:
        """(file, key, current image, target image) of the records that differ."""
        cur = self._current(version)
        out = []
        for (file, key), img in records.items():
            now = cur(file, key)
            if now != img:
                out.append((file, key, now, img))
        return out

    def _shown(self, diffs: list) -> list:
        return [{"table": self.by_file[f].name, "key": self._key(f, k), "now": self.record(f, k, now),
                 "then": self.record(f, k, img)} for f, k, now, img in diffs[:_SHOW]]

    def _apply(self, sess, program: str, tinput: dict, diffs: list, bound):
        """Commit `diffs` (file, key, current, target) as logged
        transaction(s) of `program`; returns what the last part committed."""
        ctl, txns = self.ctl, self.ctl.txns
        limit_n = ctl.cfg.controller.max_load_records
        limit_bytes = ctl.cfg.storage.log_size // 8
        parts, part, size = [], [], 0
        for d in diffs:
            est = 160 + 2 * len(d[1]) + len(d[2] or b"") + len(d[3] or b"")
            if part and (len(part) >= limit_n or size + est > limit_bytes):
                parts.append(part)
                part, size = [], 0
            part.append(d)
            size += est
        if part:
            parts.append(part)
        res = None
        txn_numbers = []
        stage = commit = 0.0
        held = ctl.hold.holder is sess
        for i, part in enumerate(parts):
            inp = dict(tinput, part=i + 1, parts=len(parts)) if len(parts) > 1 else tinput
            t0 = time.monotonic()
            txn = txns.begin(sess, program, inp)
            try:
                for file, key, now, img in part:
                    t = self.by_file[file]
                    if held:
                        # nobody else writes: no lock to take, and `now` (read while held) is the committed image
                        ch = txn.changes[(file, key)] = Change(t, t.pk_codec.decode(key), key, now,
                                                               t.decode(now) if now is not None else None)
                    else:
                        yield from txns.lock(txn, file, key)
                        ch = txns._change(txn, t, t.pk_codec.decode(key), key)
                    ch.after = img
                    ch.after_rec = t.decode(img) if img is not None else None
                    ch.after_alt = None
            except BaseException:
                txns.cancel(txn, "statement_failed")
                raise
            if self.progress is not None:
                self.progress.update(phase="committing", part=i + 1, parts=len(parts))
            t1 = time.monotonic()
            res = yield from ctl.commits.commit(txn, True, "quorum", bound)
            stage, commit = stage + t1 - t0, commit + time.monotonic() - t1
            txn_numbers.append(res["txn"])
        self.apply_times = {"stage_s": round(stage, 4), "commit_s": round(commit, 4)}
        return res, txn_numbers, len(parts)

    # ------------------------------------------------------------------ restore

    def restore(self, sess, target, options):
        opts = _options(options, "restore", ("table", "blocks", "dry_run", "timeout", "commit_timeout"))
        tgt = Target.from_wire(target)
        files = self._table(opts.get("table"))
        blocks = opts.get("blocks")
        if blocks is not None:
            if not isinstance(blocks, list) or not all(type(b) is int and b >= 0 for b in blocks) or not blocks:
                raise errors.WrongTypeError("restore: blocks must be a list of block numbers")
            blocks = set(blocks)
        dry = bool(opts.get("dry_run", False))
        timeout = _seconds(opts.get("timeout", 30.0), "restore: timeout")
        bound = m.check_commit_timeout(opts.get("commit_timeout"))
        if sess.txn is not None and sess.txn.state == "open":
            raise errors.TransactionStateError("restore: a transaction is open on this connection")
        held = False if dry else (yield from self._hold(sess, "restore", timeout))
        t0 = time.monotonic()
        self.progress = {"op": "restore", "phase": "reading", "entries": 0, "target": tgt.wire()}
        try:
            version = self.ctl.att.sb.sb_version
            p = yield from self._work(sess, self._plan, tgt, files, blocks, self.progress)
            diffs = yield from self._work(sess, self._differences, p.records, version)
            read_s = time.monotonic() - t0
            out = {"to_serial": p.to_serial, "target": tgt.wire(), "entries": p.entries, "scanned": p.scanned,
                   "transactions": p.transactions, "records": len(diffs), "read_s": round(read_s, 4),
                   "first_txn": list(p.first_txn) if p.first_txn else None,
                   "window": p.window if p.window is not None else (self.window() or {}).get("serial"),
                   "table": opts.get("table"), "blocks": sorted(blocks) if blocks else None}
            if dry:
                out.update(dry_run=True, changes=self._shown(diffs))
                return out
            tinput = {"to_serial": p.to_serial, "target": tgt.wire()}
            if opts.get("table"):
                tinput["table"] = opts["table"]
            if blocks:
                tinput["blocks"] = sorted(blocks)
            if diffs:
                res, numbers, parts = yield from self._apply(sess, "restore", tinput, diffs, bound)
                out.update(txn=res["txn"], serial=res["serial"], txns=numbers, parts=parts, **self.apply_times)
            else:
                out.update(txn=None, serial=None, txns=[], parts=0)
            out["seconds"] = round(time.monotonic() - t0, 4)
            self.log.warning("restored", to_serial=p.to_serial, records=len(diffs), entries=p.entries,
                             transactions=p.transactions, txns=out["txns"], table=opts.get("table"),
                             seconds=out["seconds"])
            self.last = {"op": "restore", "to_serial": p.to_serial, "records": len(diffs), "at": time.time()}
            return out
        finally:
            self.progress = None
            if held:
                self.ctl.hold.release(sess)

    def _plan(self, tgt: Target, files, blocks, progress):
        pl = Planner(tgt, files=files, blocks=blocks, upto=self.upto(), where=self.where())
        for blob in self.blobs(self.since_for(tgt)):
            if not pl.feed(blob):
                break
            progress["entries"] = pl.out.scanned
        return pl.finish()

    # ------------------------------------------------------------------ cancel one transaction

    def cancel_txn(self, sess, txn, options):
        opts = _options(options, "cancel", ("dry_run", "timeout", "commit_timeout"))
        if type(txn) is not int or txn <= 0:
            raise errors.WrongTypeError(f"cancel: a transaction number, not {txn!r}")
        dry = bool(opts.get("dry_run", False))
        timeout = _seconds(opts.get("timeout", 30.0), "cancel: timeout")
        bound = m.check_commit_timeout(opts.get("commit_timeout"))
        if sess.txn is not None and sess.txn.state == "open":
            raise errors.TransactionStateError("cancel: a transaction is open on this connection")
        held = False if dry else (yield from self._hold(sess, f"cancel of transaction {txn}", timeout))
        self.progress = {"op": "cancel", "phase": "reading", "txn": txn}
        try:
            version = self.ctl.att.sb.sb_version
            up = yield from self._work(sess, self._undo_plan, txn)
            if up.conflicts:
                lines = [f"transaction {t.txn} (serial {t.serial}, program {t.program or '-'}) changed "
                         + ", ".join(f"{self.by_file[f].name}[{self._key(f, k)!r}]" for f, k in keys)
                         for t, keys in up.conflicts]
                raise errors.ConflictError(
                    f"cancel transaction {txn}: {len(up.conflicts)} later transaction(s) changed its records; "
                    "nothing was changed: " + "; ".join(lines[:20]) + (" ..." if len(lines) > 20 else ""),
                    txn=txn, conflicts="\n".join(lines),
                    later=",".join(str(t.txn) for t, _ in up.conflicts))
            diffs = yield from self._work(sess, self._differences, up.records, version)
            cur = self._current(version)
            for (file, key), a in up.after.items():
                if a is not q.UNKNOWN and cur(file, key) != a:
                    raise errors.ConflictError(
                        f"cancel transaction {txn}: {self.by_file[file].name}[{self._key(file, key)!r}] is not "
                        f"what it left (changed by something the log history does not show); nothing was changed",
                        txn=txn)
            out = {"txn": txn, "serial": up.txn.serial, "program": up.txn.program, "records": len(diffs)}
            if dry:
                out.update(dry_run=True, changes=self._shown(diffs))
                return out
            res, numbers, _parts = yield from self._apply(sess, "cancel", {"txn": txn, "serial": up.txn.serial},
                                                          diffs, bound)
            out.update(cancel_txn=res["txn"] if res else None, cancel_serial=res["serial"] if res else None)
            self.log.warning("transaction_cancelled_from_b_logs", txn=txn, records=len(diffs),
                             by_txn=out["cancel_txn"])
            self.last = {"op": "cancel", "txn": txn, "records": len(diffs), "at": time.time()}
            return out
        finally:
            self.progress = None
            if held:
                self.ctl.hold.release(sess)

    def _undo_plan(self, txn: int):
        return q.undo_plan(self.blobs(0), txn, files=self.table_files, upto=self.upto(), where=self.where())

    # ------------------------------------------------------------------ history

    def history(self, sess, query):
        qy = _options(query, "history", ("since", "since_ns", "until", "until_ns", "program", "table", "key",
                                         "limit", "images"))
        table = qy.get("table")
        files = self._table(table)
        key = qy.get("key")
        if key is not None:
            if table is None:
                raise errors.WrongTypeError("history: a key needs its table")
            key = self.ctl.schema.table(table).key(key)
        limit = qy.get("limit", 1000)
        if type(limit) is not int or not 1 <= limit <= 100_000:
            raise errors.WrongTypeError("history: limit must be 1..100000")
        for name in ("since", "since_ns", "until", "until_ns"):
            v = qy.get(name)
            if v is not None and (type(v) is not int or v < 0):
                raise errors.WrongTypeError(f"history: {name} must be a non-negative integer")
        program = qy.get("program")
        if program is not None and not isinstance(program, str):
            raise errors.WrongTypeError("history: program must be a string")
        version = self.ctl.att.sb.sb_version
        txns, more = yield from self._work(sess, self._query, qy, files, key, program, limit, version)
        images = qy.get("images", True)
        return {"transactions": [self._txn_out(t, images, key) for t in txns],
                "next": more.begin_serial if more is not None else None,
                "window": self.window(), "where": self.where()}

    def _query(self, qy, files, key, program, limit, version):
        since, since_ns, until, until_ns = (qy.get(n) for n in ("since", "since_ns", "until", "until_ns"))

        def keep(t) -> bool:
            if since is not None and t.serial < since or until is not None and t.serial > until:
                return False
            if since_ns is not None and t.time_ns < since_ns or until_ns is not None and t.time_ns > until_ns:
                return False
            if program is not None and t.program != program:
                return False
            if key is not None:
                return any(c.key == key for c in t.changes)
            return bool(t.changes) or qy.get("table") is None

        start = since or 0
        after = (since - 1, 0, 0) if since else None
        if since_ns is not None and not since:
            start = self.since_for(Target(time_ns=since_ns))
            after = (0, max(0, since_ns - 1), 1)
        return q.transactions(self.blobs(start), files=files, keep=keep, limit=limit,
                              current=self._current(version), upto=self.upto(), after=after)

    def _txn_out(self, t, images: bool, key: bytes | None = None) -> dict:
        out = {"txn": t.txn, "serial": t.serial, "begin_serial": t.begin_serial, "time_ns": t.time_ns,
               "program": t.program, "version": t.version, "input": t.input, "changes": []}
        for c in t.changes:
            if key is not None and c.key != key:
                continue      # asked about one record: its changes only
            ch = {"table": self.by_file[c.file].name, "kind": c.kind, "key": self._key(c.file, c.key),
                  "block": c.block}
            if images:
                for name in ("b", "a"):
                    img = getattr(c, name)
                    if img is q.UNKNOWN:
                        ch[name], ch[name + "_unknown"] = None, True
                    else:
                        ch[name] = self.record(c.file, c.key, img)
            out["changes"].append(ch)
        return out


def _options(v, what: str, allowed: tuple) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise errors.WrongTypeError(f"{what}: options must be a map")
    bad = [k for k in v if k not in allowed]
    if bad:
        raise errors.WrongTypeError(f"{what}: unknown option {bad[0]!r} (options: {', '.join(allowed)})")
    return v


def _seconds(v, what: str) -> float:
    if type(v) not in (int, float) or not 0 < v <= 86400:
        raise errors.WrongTypeError(f"{what} must be seconds in (0, 86400], not {v!r}")
    return float(v)


# ---------------------------------------------------------------------- requests

@handler(m.OP_HISTORY)
def history(ctl, sess, query):
    return (yield from ctl.history.history(sess, query))


@handler(m.OP_RESTORE, writes=True)
def restore(ctl, sess, target, options):
    return (yield from ctl.history.restore(sess, target, options))


@handler(m.OP_CANCEL_TXN, writes=True)
def cancel_txn(ctl, sess, txn, options):
    return (yield from ctl.history.cancel_txn(sess, txn, options))


@handler(m.OP_HOLD, writes=True)
def hold(ctl, sess, action, timeout=30.0):
    if action == "begin":
        if sess.txn is not None and sess.txn.state == "open":
            raise errors.TransactionStateError("hold: a transaction is open on this connection")
        yield from ctl.hold.acquire(sess, f"operator hold (pid {sess.pid})", _seconds(timeout, "hold: timeout"))
        return None
    if action == "end":
        ctl.hold.release(sess)
        return None
    raise errors.WrongTypeError(f"hold: action must be 'begin' or 'end', not {action!r}")
