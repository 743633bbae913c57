"""Transactions and their statements on the controller: BEGIN, the
statements (get for update, insert, update, delete, put), CANCEL, the
one-round-trip ATOMIC, bulk LOAD, the outcome of a transaction (TXN_STATUS),
and what keeps them bounded: lock waits, deadlocks, idle transactions.

A statement runs as it arrives: it is validated (:meth:`Transactions.prepare`,
nothing locked or changed), locks its record (waiting if another
transaction holds it: ``WAIT_LOCK``, up to ``controller.lock_timeout``; a
wait that would close a cycle is a deadlock and cancels this transaction),
takes the B image (the committed pre-image, stable from then on because the
record is locked) and computes the A image. Nothing reaches shared memory
before COMMIT (see :mod:`.commit`), so cancelling only drops the changes and
the locks. The loop thread alone runs all of this (see :mod:`.loop`).
"""
from __future__ import annotations

import time

from .. import errors
from ..store import changelog, tlog
from ..wire import messages as m
from .locks import DEADLOCK, GRANTED
from .loop import FAST, WAIT_LOCK, YIELD, plain
from .ops import handler
from .txn import TXN_INSERT, Change, Txn, step

__all__ = ["Transactions", "LATER"]

#: the OP_ATOMIC options its fast path takes (others: the general path)
_FAST_OPTIONS = frozenset({"durability", "commit_timeout", "pipeline"})
LOAD_CHUNK = 2000     # records of an OP_LOAD between turns of the loop
LATER = object()      # statement_now: the statement must wait for a lock (the general path takes it)
#: why a transaction is cancelled (status transactions.cancelled_by_reason, metrics)
CANCEL_REASONS = ("cancelled", "client_gone", "deadlock", "idle_timeout", "lock_timeout", "stale_read",
                  "statement_failed", "pipelined_failed", "load_failed", "commit_failed", "internal_error")


def _reason(e: errors.ApplianceError, otherwise: str) -> str:
    """Why a failed statement cancels its transaction (CANCEL_REASONS)."""
    return "stale_read" if isinstance(e, errors.StaleReadError) else otherwise


class Transactions:
    """The open transactions of every session, and their statements."""

    def __init__(self, ctl) -> None:
        self.ctl = ctl
        self.log = ctl.log
        self.active: dict[int, Txn] = {}
        self.counters = {"committed": 0, "cancelled": 0, "deadlocks": 0, "lock_timeouts": 0, "idle_cancelled": 0,
                         "lock_waits": 0}
        self.cancelled_by = dict.fromkeys(CANCEL_REASONS, 0)   # reason -> transactions cancelled for it
        self.configure(ctl.cfg)
        self.max_key = ctl.schema.max_key
        # a change-log entry may take at most a quarter of the ring (apl_log_append)
        self.max_tlog = ctl.cfg.storage.log_size // 4 - 256

    def configure(self, cfg) -> None:
        self.lock_timeout_ns = int(cfg.controller.lock_timeout * 1e9)
        self.idle_timeout_ns = int(cfg.controller.idle_timeout * 1e9)
        self.max_load = cfg.controller.max_load_records

    # ------------------------------------------------------------------ lifecycle

    def begin(self, sess, program, input_, pipelined: bool = False, version: str | None = None) -> Txn:
        if program is not None and not isinstance(program, str):
            raise errors.WrongTypeError("begin: program must be a string or None")
        if version is not None and (not isinstance(version, str) or program is None or len(version) > 200):
            raise errors.WrongTypeError("begin: version must be a string of at most 200 characters, "
                                        "with a program")
        packed = tlog.encode(program, input_, version)     # the T log, as its BEGIN entry will carry it
        if len(packed) > self.max_tlog:
            raise errors.RecordTooLargeError(
                f"begin: the transaction's input (T log) takes {len(packed)} bytes; at most {self.max_tlog} "
                "fit the change log", size=len(packed), limit=self.max_tlog)
        txn = Txn(self.ctl.writer.next_txn(), program, input_, sess, pipelined, version)
        txn.tlog = packed
        sess.txn = txn
        self.active[txn.number] = txn
        return txn

    def open_txn(self, sess, ending: bool = False) -> Txn:
        """The session's open transaction, for a statement or (`ending`) its commit."""
        txn = sess.txn
        if txn is not None and txn.failure is not None:
            if ending:
                sess.txn = None   # its commit is refused: the transaction is over
            raise errors.TransactionStateError(
                f"transaction {txn.number} was rolled back when a pipelined statement failed ({txn.failure}); "
                "this request was not carried out: cancel the transaction", txn=txn.number)
        if txn is not None and txn.state == "cancelled" and txn.reason == "idle_timeout":
            sess.txn = None   # said once; the next statement needs a new transaction
            raise errors.TransactionCancelledError(
                f"transaction {txn.number} was cancelled: it stayed open with no request for more than "
                f"{self.ctl.cfg.controller.idle_timeout:g} s (controller.idle_timeout); its locks were released",
                txn=txn.number)
        if txn is None or txn.state != "open":
            raise errors.TransactionStateError("no transaction is open on this connection (begin one first)")
        return txn

    def cancel(self, txn: Txn, reason: str) -> None:
        if txn.state not in ("open",):
            return
        txn.state = "cancelled"
        txn.reason = reason
        txn.changes.clear()
        txn.steps = None
        self.active.pop(txn.number, None)
        self.counters["cancelled"] += 1
        self.cancelled_by[reason] = self.cancelled_by.get(reason, 0) + 1
        self.log.debug("txn_cancelled", txn=txn.number, reason=reason)
        self.release(txn)

    def fail(self, txn: Txn, e: errors.ApplianceError) -> None:
        """A write statement of a pipelined transaction failed: roll the transaction
        back now (its changes dropped, its locks released). The statements its client
        sent behind this one assumed it succeeded, so none of them may run: they, and
        the commit, are answered with the failure (open_txn) until the client ends it."""
        self.cancel(txn, _reason(e, "pipelined_failed"))
        txn.failure = e.message

    def release(self, txn: Txn) -> None:
        for grant in self.ctl.locks.release_all(txn):
            grant()

    def finished(self, txn: Txn, state: str) -> None:
        """`txn` committed (or was cancelled while committing): it leaves the active set."""
        txn.state = state
        self.active.pop(txn.number, None)
        self.counters["committed" if state == "committed" else "cancelled"] += 1
        if state != "committed":
            self.cancelled_by["commit_failed"] = self.cancelled_by.get("commit_failed", 0) + 1

    # ------------------------------------------------------------------ locks

    def lock(self, txn: Txn, file: int, pk: bytes):
        key = (file, pk)
        sess = txn.session
        locks = self.ctl.locks
        r = locks.acquire(txn, key, lambda: self._granted(txn))
        if r == GRANTED:
            return
        if r == DEADLOCK:
            self.counters["deadlocks"] += 1
            self.log.info("deadlock_detected", txn=txn.number, holder=locks.holder(key).number)
            self.cancel(txn, "deadlock")
            raise errors.DeadlockError(
                f"transaction {txn.number}: deadlock waiting for a record lock held by transaction "
                f"{locks.holder(key).number if locks.holder(key) else '?'}; "
                "this transaction was cancelled (retry it)", txn=txn.number)
        self.counters["lock_waits"] += 1
        timer = self.ctl.add_timer(self.lock_timeout_ns / 1e9, lambda: self._lock_timed_out(txn))
        try:
            yield WAIT_LOCK
        finally:
            self.ctl.cancel_timer(timer)
        if sess.closed or txn.state != "open":
            raise errors.TransactionCancelledError(f"transaction {txn.number} was cancelled")

    def _granted(self, txn: Txn) -> None:
        sess = txn.session
        if sess is not None and not sess.closed and sess.txn is txn:
            self.ctl.resume(sess)

    def _lock_timed_out(self, txn: Txn) -> None:
        if txn.waiting_for is None or txn.state != "open":
            return
        self.counters["lock_timeouts"] += 1
        self.ctl.locks.cancel_wait(txn)
        self.cancel(txn, "lock_timeout")
        self.ctl.resume(txn.session, exc=errors.LockTimeoutError(
            f"transaction {txn.number}: waited {self.ctl.cfg.controller.lock_timeout:g} s for a record lock; "
            "the transaction was cancelled (retry it)", txn=txn.number))

    def cancel_idle(self) -> None:
        """Cancel the open transactions whose client sent nothing for
        controller.idle_timeout (their locks would otherwise be held for as
        long as the client likes); the client's next statement is told why."""
        if not self.idle_timeout_ns:
            return
        now = time.monotonic_ns()
        for txn in list(self.active.values()):
            sess = txn.session
            if txn.state != "open" or sess is None or sess.gen is not None or sess.inbox:
                continue   # a request of its is running or waiting (a lock wait has its own timeout)
            idle = now - sess.idle_ns
            if idle > self.idle_timeout_ns:
                self.cancel(txn, "idle_timeout")
                self.counters["idle_cancelled"] += 1
                self.ctl.throttled.warning("txn_idle_cancelled", None, txn=txn.number, pid=sess.pid,
                                           uid=sess.uid, idle_s=round(idle / 1e9, 1),
                                           total=self.counters["idle_cancelled"])

    # ------------------------------------------------------------------ statements

    def _committed(self, file: int, pk: bytes) -> bytes | None:
        return self.ctl.reader.get_raw(file, pk, self.ctl.att.sb.sb_version)

    def _change(self, txn: Txn, t, key, pk: bytes) -> Change:
        ch = txn.changes.get((t.file, pk))
        if ch is None:
            before = self._committed(t.file, pk)
            rec = t.decode(before) if before is not None else None
            ch = Change(t, key, pk, before, rec)
            txn.changes[(t.file, pk)] = ch
        return ch

    def prepare(self, op: int, args: list) -> tuple:
        """Validate a statement; no lock taken, nothing changed.
        Returns (op, table, key, encoded key, payload)."""
        schema = self.ctl.schema
        r = m.REQUESTS[op]
        least, most = r.arity
        if not least <= len(args) <= most:
            raise errors.ProtocolError(f"{r.name.lower()[3:]}: expected {least} arguments "
                                       f"({', '.join(r.args)}), got {len(args)}")
        if op == m.OP_PUT:
            t = schema.table(args[0])
            key = args[1]
            rec = t.full(args[2], key)
            pk = t.key(key)
            alt = t.alt_entries(rec, pk)
            t.check_keys(pk, alt, self.max_key)
            return op, t, key, pk, (rec, t.encode(rec, pk), alt)
        if op == m.OP_INSERT:
            t = schema.table(args[0])
            rec = t.full(args[1])
            key = rec[t.pk]
            pk = t.key(key)
            alt = t.alt_entries(rec, pk)
            t.check_keys(pk, alt, self.max_key)
            return op, t, key, pk, (rec, t.encode(rec, pk), alt)
        if op == m.OP_UPDATE:
            t = schema.table(args[0])
            key = args[1]
            if not isinstance(args[2], dict):
                raise errors.WrongTypeError(f"{t.name}.update({key!r}): changes must be a dict", table=t.name)
            return op, t, key, t.key(key), args[2]
        if op == m.OP_DELETE or op == m.OP_GET_FOR_UPDATE:
            t = schema.table(args[0])
            key = args[1]
            return op, t, key, t.key(key), None
        if op == m.OP_LOCK_CHECKED:
            t = schema.table(args[0])
            key, expected = args[1], args[2]
            if expected is not None and type(expected) is not bytes:
                raise errors.WrongTypeError(f"{t.name}[{key!r}]: lock checked: expected must be the record's "
                                            f"stored bytes or nil, not {type(expected).__name__}", table=t.name)
            return op, t, key, t.key(key), expected
        raise errors.ProtocolError(f"op {op} is not a transaction statement")

    def apply(self, txn: Txn, p: tuple):
        """Carry out a prepared statement; the caller holds the record's lock."""
        op, t, key, pk, payload = p
        ch = self._change(txn, t, key, pk)
        if op == m.OP_PUT:
            existed = ch.after_rec is not None
            ch.after_rec, ch.after, ch.after_alt = payload
            return "update" if existed else "insert"
        if op == m.OP_INSERT:
            if ch.after_rec is not None:
                raise errors.DuplicateKeyError(f"{t.name}.insert({key!r}): duplicate primary key",
                                               table=t.name, key=key)
            ch.after_rec, ch.after, ch.after_alt = payload
            return None
        if op == m.OP_GET_FOR_UPDATE:
            return ch.after_rec
        if op == m.OP_LOCK_CHECKED:
            if ch.after != payload:
                raise errors.StaleReadError(
                    f"{t.name}[{key!r}]: changed by another transaction after this one read it "
                    f"({'no record then' if payload is None else 'its bytes differ now'}); the transaction "
                    "was cancelled: nothing it did remains (run it again)", table=t.name, key=key)
            return None
        if ch.after_rec is None:
            what = "update" if op == m.OP_UPDATE else "delete"
            raise errors.NoSuchRecordError(f"{t.name}.{what}({key!r}): no such record", table=t.name, key=key)
        if op == m.OP_DELETE:
            ch.after_rec, ch.after, ch.after_alt = None, None, ()
            return None
        new = t.merge(ch.after_rec, payload, key)
        alt = t.alt_entries(new, pk)
        t.check_keys(pk, alt, self.max_key)
        ch.after = t.encode(new, pk)
        ch.after_rec, ch.after_alt = new, alt
        return None

    def statement(self, txn: Txn, op: int, args: list):
        """One statement of a transaction (a generator: it may wait for a lock)."""
        p = self.prepare(op, args)
        yield from self.lock(txn, p[1].file, p[3])
        return self.apply(txn, p)

    def failed(self, txn: Txn, op: int, e: errors.ApplianceError) -> None:
        """Statement `op` of `txn` raised `e`. In a pipelined transaction a failed
        write rolls it back (see fail); a get for update's client waits for its
        answer, so nothing was sent behind it on trust: it fails as in any
        transaction, and so do the errors that cancelled it already (a lock
        timeout, a deadlock). A stale optimistic read cancels its transaction in
        any case (what the client computed from that read must not commit)."""
        if txn.state == "open" and (txn.pipelined and op != m.OP_GET_FOR_UPDATE
                                    or isinstance(e, errors.StaleReadError)):
            self.fail(txn, e)

    def statement_now(self, sess, op: int, args: list):
        """A statement whose record lock is free or its transaction's already,
        carried out at once (no coroutine: the common case); LATER when the
        lock is another's (the general path takes the request and validates it
        again: prepare changes nothing)."""
        txn = self.open_txn(sess)
        try:
            p = self.prepare(op, args)
            key = (p[1].file, p[3])
            locks = self.ctl.locks
            holder = locks.holder(key)
            if holder is None:
                locks.acquire(txn, key, None)
            elif holder is not txn:
                return LATER
            return self.apply(txn, p)
        except errors.ApplianceError as e:
            self.failed(txn, op, e)
            raise

    def commit_now(self, sess, wait=True, durability=None, commit_timeout=None):
        """COMMIT without a coroutine: its result when it is answered at once
        (nothing to write), else LATER: it waits for the batch like a fast-path
        autocommit (sess.gen is FAST; the batch answers it)."""
        ctl = self.ctl
        txn = self.open_txn(sess, ending=True)
        done = ctl.commits.start(txn, bool(wait), ctl.sync.check_durability(durability),
                                 m.check_commit_timeout(commit_timeout))
        if done is not None:
            return done
        sess.gen = FAST
        ctl.commits.enqueue(sess, txn)
        return LATER

    def fast_atomic(self, sess, req: list) -> bool:
        """An OP_ATOMIC none of whose records is locked — an autocommit
        (``table[k] = v``), a pipelined transaction held to its commit, an
        optimistic transfer — runs straight through, without the coroutine
        machinery: every step validated, then its lock taken and the step
        carried out in order, as the general path does when no lock waits.
        False: the general path must take it (it validates everything again;
        a step that fails to validate goes there too, unless it is the only
        one, so the steps before it run as they would there)."""
        ctl = self.ctl
        durability, bound, pipelined = "quorum", None, False
        if len(req) == 5:   # options: only durability, commit_timeout and pipeline come this way
            opts = req[4]
            if type(opts) is not dict or not opts.keys() <= _FAST_OPTIONS:
                return False
            pipelined = opts.get("pipeline", False)
            if type(pipelined) is not bool:
                return False
            try:
                durability = ctl.sync.check_durability(opts.get("durability"))
                bound = m.check_commit_timeout(opts.get("commit_timeout"))
            except errors.ApplianceError:
                return False
        elif len(req) != 4:
            return False
        if sess.txn is not None and sess.txn.state == "open":
            return False
        steps = req[3]
        if type(steps) is not list or not steps or not (req[1] is None or type(req[1]) is str):
            return False
        holder = ctl.locks.holder
        prepared = []
        for st in steps:
            if type(st) is not list or not st or type(st[0]) is not int or st[0] not in m.STEP_OPS:
                return False
            try:
                p = self.prepare(st[0], st[1:])
            except errors.ApplianceError as e:
                if pipelined or len(steps) > 1:   # the general path: its answers, the steps before it
                    return False
                ctl.send(sess, m.err(e.code, e.message, plain(e.details)))
                return True
            if holder((p[1].file, p[3])) is not None:
                return False
            prepared.append(p)
        try:
            txn = self.begin(sess, req[1], req[2])
        except errors.ApplianceError as e:     # its T log does not fit: the only answer
            ctl.send(sess, m.err(e.code, e.message, plain(e.details)))
            return True
        if pipelined:
            ctl.send(sess, m.ok(txn.number))
        acquire, apply_stmt = ctl.locks.acquire, self.apply
        results = []
        for i, p in enumerate(prepared):
            acquire(txn, (p[1].file, p[3]), None)   # free (checked above), or already this one's
            try:
                results.append(apply_stmt(txn, p))
            except errors.ApplianceError as e:
                self.cancel(txn, _reason(e, "statement_failed"))
                details = plain(e.details)
                if pipelined:
                    details["step"] = i
                ctl.send(sess, m.err(e.code, e.message, details))
                return True
        txn.results = results
        done = ctl.commits.start(txn, True, durability, bound)
        if done is not None:
            done["results"] = txn.results
            ctl.send(sess, m.ok(done))
            return True
        sess.gen = FAST
        ctl.commits.enqueue(sess, txn)
        return True

    def load(self, sess, table, recs, durability, bound):
        """Insert records as one transaction. At most controller.max_load_records
        per request (the client library splits bigger loads); every
        LOAD_CHUNK records the load lets the other sessions run (YIELD).
        Nothing reaches shared memory before its commit, so the records stay
        invisible until then.

        A record given whole, in its stored types (the common case: every
        field, each of its type), goes straight to packed steps (txn.steps):
        encoded and validated in one codec call, its index entries taken from
        its own values, no Change kept. Any other record (fields left to their
        defaults, values to convert) takes the insert statement's path. Both
        lock the key and refuse one that exists, committed or earlier in the
        same load (DuplicateKeyError with the record's index)."""
        if sess.txn is not None and sess.txn.state == "open":
            raise errors.TransactionStateError("load: a transaction is open on this connection")
        t = self.ctl.schema.table(table)
        if not isinstance(recs, list):
            raise errors.ProtocolError("load: records must be a list")
        if len(recs) > self.max_load:
            raise errors.LimitError(
                f"load {t.name}: {len(recs)} records in one request; at most {self.max_load} "
                f"(controller.max_load_records in {self.ctl.cfg.path}): send them in several",
                table=t.name, records=len(recs), limit=self.max_load)
        txn = self.begin(sess, "load", {"table": t.name, "records": len(recs)})
        prepare, apply_stmt, locks, file = self.prepare, self.apply, self.ctl.locks, t.file
        holder, acquire, committed, max_key = locks.holder, locks.acquire, self._committed, self.max_key
        key_of, encode, pk_field, nfields = t.key, t.encode, t.pk, len(t.fields)
        pk_kind, alts = t.pk_stored, t.alt_stored
        steps = txn.steps = bytearray()
        args = [t.name, None]
        i = 0
        try:
            for i, rec in enumerate(recs):
                if i and not i % LOAD_CHUNK:
                    yield YIELD
                    if sess.closed or txn.state != "open":
                        raise errors.TransactionCancelledError(f"load {t.name}: transaction {txn.number} "
                                                               "was cancelled")
                entries = None
                if type(rec) is dict and len(rec) == nfields and type(key := rec.get(pk_field)) is pk_kind:
                    pk = key_of(key)
                    entries = []
                    for f, fid, enc, kind in alts:   # alternate keys of their stored type are canonical
                        v = rec.get(f)
                        if type(v) is not kind:
                            entries = None
                            break
                        entries.append((fid, enc(v) + pk))
                if entries is None:
                    args[1] = rec
                    p = prepare(m.OP_INSERT, args)
                    key, pk = p[2], p[3]
                else:
                    # the insert's checks in the insert's order: the values (the
                    # codec validates before it sizes), the keys' lengths, the size
                    try:
                        img = encode(rec, pk)
                    except errors.RecordTooLargeError:
                        t.check_keys(pk, entries, max_key)
                        raise
                    t.check_keys(pk, entries, max_key)
                lk = (file, pk)
                h = holder(lk)
                if h is None:      # the common case: take it, no coroutine
                    acquire(txn, lk, None)
                elif h is txn:
                    raise errors.DuplicateKeyError(f"{t.name}.insert({key!r}): duplicate primary key "
                                                   "(given twice in this load)", table=t.name, key=key)
                else:
                    yield from self.lock(txn, file, pk)
                if entries is None:
                    apply_stmt(txn, p)
                    continue
                if committed(file, pk) is not None:
                    raise errors.DuplicateKeyError(f"{t.name}.insert({key!r}): duplicate primary key",
                                                   table=t.name, key=key)
                step(steps, TXN_INSERT, file, pk, img)
                for fid, ak in entries:
                    step(steps, TXN_INSERT, fid, ak, b"")
        except errors.ApplianceError as e:
            self.cancel(txn, "load_failed")
            e.details.setdefault("index", i)
            raise
        yield from self.ctl.commits.commit(txn, True, durability, bound)
        return len(recs)


# ---------------------------------------------------------------------- requests

def _statement(ctl, sess, op: int, args: tuple):
    txn = ctl.txns.open_txn(sess)
    try:
        return (yield from ctl.txns.statement(txn, op, list(args)))
    except errors.ApplianceError as e:
        ctl.txns.failed(txn, op, e)
        raise


@handler(m.OP_GET_FOR_UPDATE, writes=True)
def get_for_update(ctl, sess, table, key):
    return (yield from _statement(ctl, sess, m.OP_GET_FOR_UPDATE, (table, key)))


@handler(m.OP_LOCK_CHECKED, writes=True)
def lock_checked(ctl, sess, table, key, expected):
    return (yield from _statement(ctl, sess, m.OP_LOCK_CHECKED, (table, key, expected)))


@handler(m.OP_INSERT, writes=True)
def insert(ctl, sess, table, record):
    return (yield from _statement(ctl, sess, m.OP_INSERT, (table, record)))


@handler(m.OP_UPDATE, writes=True)
def update(ctl, sess, table, key, changes):
    return (yield from _statement(ctl, sess, m.OP_UPDATE, (table, key, changes)))


@handler(m.OP_DELETE, writes=True)
def delete(ctl, sess, table, key):
    return (yield from _statement(ctl, sess, m.OP_DELETE, (table, key)))


@handler(m.OP_PUT, writes=True)
def put(ctl, sess, table, key, record):
    return (yield from _statement(ctl, sess, m.OP_PUT, (table, key, record)))


@handler(m.OP_BEGIN, writes=True, new_txn=True)
def begin(ctl, sess, program, input, options=None):
    if sess.txn is not None and sess.txn.state == "open":
        raise errors.TransactionStateError(f"begin: transaction {sess.txn.number} is still open on this connection")
    pipelined, version = False, None
    if options is not None:
        if type(options) is not dict or not options.keys() <= {"pipeline", "version"} \
                or type(options.get("pipeline", False)) is not bool:
            raise errors.ProtocolError(f'begin: options must be nil or {{"pipeline": true|false, "version": str}}, '
                                       f'not {options!r:.80}')
        pipelined = options.get("pipeline", False)
        version = options.get("version")
    return ctl.txns.begin(sess, program, input, pipelined, version).number


@handler(m.OP_COMMIT, writes=True)
def commit(ctl, sess, wait=True, durability=None, commit_timeout=None):
    txn = ctl.txns.open_txn(sess, ending=True)
    d = ctl.sync.check_durability(durability)
    bound = m.check_commit_timeout(commit_timeout)
    return (yield from ctl.commits.commit(txn, bool(wait), d, bound))


@handler(m.OP_CANCEL)
def cancel(ctl, sess):
    txn = sess.txn
    if txn is not None and txn.state == "open":
        ctl.txns.cancel(txn, "cancelled")
    elif txn is not None and txn.failure is not None:
        sess.txn = None   # rolled back already; its client has ended it
    return None


@handler(m.OP_ATOMIC, writes=True, new_txn=True)
def atomic(ctl, sess, program, input, steps, options=None):
    opts = {} if options is None else options
    if not isinstance(opts, dict):
        raise errors.ProtocolError("atomic: options must be a map")
    durability = ctl.sync.check_durability(opts.get("durability"))
    bound = m.check_commit_timeout(opts.get("commit_timeout"))
    wait = bool(opts.get("wait", True))
    if sess.txn is not None and sess.txn.state == "open":
        raise errors.TransactionStateError(
            f"atomic: transaction {sess.txn.number} is open on this connection; commit or cancel it first")
    if not isinstance(steps, list):
        raise errors.ProtocolError("atomic: steps must be a list")
    pipelined = opts.get("pipeline", False)
    if type(pipelined) is not bool:
        raise errors.ProtocolError("atomic: option pipeline must be true or false")
    txns = ctl.txns
    txn = txns.begin(sess, program, input, version=opts.get("version"))
    if pipelined:        # a pipelined transaction's: its number first, as OP_BEGIN answers
        ctl.send(sess, m.ok(txn.number))
    results = []
    i = 0
    try:
        for i, st in enumerate(steps):
            if type(st) is not list or not st or type(st[0]) is not int or st[0] not in m.STEP_OPS:
                raise errors.ProtocolError("atomic: each step must be [op, args...] with a statement op")
            results.append((yield from txns.statement(txn, st[0], st[1:])))
    except BaseException as e:
        txns.cancel(txn, _reason(e, "statement_failed"))
        if pipelined and isinstance(e, errors.ApplianceError):
            e.details["step"] = i
        raise
    out = yield from ctl.commits.commit(txn, wait, durability, bound)
    out["results"] = results
    return out


@handler(m.OP_LOAD, writes=True, new_txn=True)
def load(ctl, sess, table, records, durability=None, commit_timeout=None):
    d = ctl.sync.check_durability(durability)
    bound = m.check_commit_timeout(commit_timeout)
    return (yield from ctl.txns.load(sess, table, records, d, bound))


@handler(m.OP_TXN_STATUS)
def txn_status(ctl, sess, txn, since_ns):
    """committed / not_committed / unknown (the log no longer covers it) /
    open / committing for a transaction of this controller's life."""
    if not isinstance(txn, int) or not isinstance(since_ns, int):
        raise errors.WrongTypeError("txn_status: expects a transaction number and a start time (ns)")
    t = ctl.txns.active.get(txn)
    if t is not None:
        return t.state
    return changelog.txn_outcome(ctl.reader, txn, since_ns)
