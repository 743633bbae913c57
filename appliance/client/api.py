"""The client library: attach to a running appliance and use its tables.

Reads never ask the controller: a :class:`Table` reads the shared-memory
segments (mapped read-only) through the C helpers, and each call sees one
committed state. Writes and transactions go to the controller over its Unix
socket. See the README's API section for the whole surface.

Handles are per process: a :class:`Client` used after ``fork()`` opens a new
connection in the child (its reader slots are the child's own), and a closed
handle raises :class:`~appliance.errors.ClosedError` instead of touching
unmapped memory.
"""
from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import MutableMapping
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from .. import errors
from .._native import raise_for
from ..config import Config, layout_differences, load as load_config
from ..store.reader import Reader
from ..store.records import Schema, TableSchema
from ..store.segment import Attachment
from ..wire import messages as m
from .session import PIPELINE_DEPTH, Session, check_depth, encode_sendable, result
from .session import _pid as _session_pid

__all__ = ["connect", "Client", "Table", "Snapshot", "Transaction"]

#: how much longer than a commit's wait bound the client waits for its answer
_COMMIT_REPLY_GRACE = 5.0


def connect(config: str | os.PathLike | Config, *, name: str = "", timeout: float | None = 30.0,
            durability=None, wait: float | None = None, commit_timeout: float | None = None,
            pipeline: bool = False, pipeline_depth: int = PIPELINE_DEPTH,
            optimistic: bool = False) -> "Client":
    """Attach to the running appliance described by a config file.

    `timeout`: seconds one request may take (None: no limit). `wait`:
    seconds to wait for a controller that is not up yet (no socket, or
    nobody listening on it); by default `timeout`, and 0 fails at once.
    `commit_timeout`: how long a commit on a primary waits for its
    synchronous backup (default: `timeout`; None with timeout None: no
    bound); past it the commit raises
    :class:`~appliance.errors.BackupTimeoutError` — committed, its backup
    pending — never UnavailableError. `pipeline`: whether this client's
    transactions pipeline their writes by default (see
    :meth:`Client.transaction`); `pipeline_depth`: how many replies of
    pipelined statements a connection leaves unread at most (1 to
    MAX_PIPELINED, 4096) before it reads half of them. `optimistic`:
    whether this client's transactions are optimistic by default (see
    :meth:`Client.transaction`).

    Raises :class:`~appliance.errors.UnavailableError` when it is not running
    by then, :class:`~appliance.errors.AccessDeniedError` when this user may
    not attach, :class:`~appliance.errors.FormatError` when the config does
    not describe the appliance that is running.
    """
    cfg = config if isinstance(config, Config) else load_config(config)
    return Client(cfg, name=name, timeout=timeout, durability=durability, wait=wait,
                  commit_timeout=commit_timeout, pipeline=pipeline, pipeline_depth=pipeline_depth,
                  optimistic=optimistic)


def _check_flag(name: str, value) -> bool:
    if type(value) is not bool:
        raise errors.WrongTypeError(f"{name} must be True or False, not {value!r}")
    return value



class Client:
    """A connection to one appliance. Thread-safe; one controller connection
    per thread. Use as a context manager or call :meth:`close`."""

    def __init__(self, cfg: Config, *, name: str = "", timeout: float | None = 30.0, durability=None,
                 wait: float | None = None, commit_timeout: float | None = None, pipeline: bool = False,
                 pipeline_depth: int = PIPELINE_DEPTH, optimistic: bool = False) -> None:
        self.config = cfg
        #: whether transactions pipeline their writes unless transaction(pipeline=...) says otherwise
        self.pipeline = _check_flag("pipeline", pipeline)
        #: whether transactions are optimistic unless transaction(optimistic=...) says otherwise
        self.optimistic = _check_flag("optimistic", optimistic)
        self._depth = check_depth(pipeline_depth)
        #: what autocommitted writes wait for on a primary with secondaries (see transaction())
        self.durability = durability
        #: how long a commit waits for that (seconds; None: the connection's timeout)
        self.commit_timeout = m.check_commit_timeout(commit_timeout)
        # only a primary's commits wait for a backup (a secondary's config may become one: a promote)
        self._primary = cfg.replication is not None
        self.schema = Schema(cfg)
        self._name = name
        self._timeout = timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sessions: list[Session] = []
        self._closed = False
        self._tables: dict[str, Table] = {}
        hello = self._first_session(timeout if wait is None else wait).hello
        self._att = Attachment(cfg.name, writable=False)
        if self._att.compressed:
            self._att.close()
            raise errors.NotServingReadsError(
                f"appliance {cfg.name!r} is a secondary that keeps lz4 backup blocks and serves no reads "
                f"(replication.serve_reads = false in {cfg.path}); read from its primary or a secondary "
                "that serves reads", appliance=cfg.name)
        if self._att.sb.sb_schema_hash != cfg.schema_hash(compressed=self._att.compressed):
            recorded = self._att.layout()
            differ = "; ".join(layout_differences(recorded, cfg.layout())) if recorded else ""
            self._att.close()
            raise errors.FormatError(
                f"{cfg.path}: this configuration does not describe the running appliance {cfg.name!r} "
                f"({differ or 'tables or storage settings differ'})", appliance=cfg.name)
        if hello["instance"] != self._att.instance:
            self._att.close()
            raise errors.UnavailableError(f"appliance {cfg.name!r} was re-created while attaching; retry")
        self._reader = Reader(self._att)
        self._pid = os.getpid()
        self._snapshots: "weakref.WeakSet[Snapshot]" = weakref.WeakSet()
        self._opened_ns = self._att.sb.sb_opened_ns   # which controller our sessions know
        _live_clients.add(self)

    # -- plumbing ---------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise errors.ClosedError(f"client of appliance {self.config.name!r} is closed")

    def _session(self) -> Session:
        s = getattr(self._local, "session", None)
        if s is None or s.pid != _session_pid[0]:
            s = Session(str(self.config.socket_path), self.config.name, name=self._name,
                        timeout=self._reply_timeout(self._commit_bound()),
                        max_frame=self.config.controller.max_frame, depth=self._depth)
            s.connect()
            self._local.session = s
            with self._lock:
                self._sessions.append(s)
        return s

    def _first_session(self, wait: float | None) -> Session:
        """The first connection: a controller not up yet (no socket, or nobody
        listening) is waited for, up to `wait` seconds."""
        deadline = time.monotonic() + (wait or 0)
        pause = 0.02
        while True:
            try:
                return self._session()
            except errors.UnavailableError:
                if time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.25)

    def _call(self, req: list, what: str):
        if self._closed:
            self._check()
        s = getattr(self._local, "session", None)
        if s is None or s.pid != _session_pid[0]:
            s = self._session()
        return s.call(req, what)

    def _commit_bound(self, commit_timeout: float | None = None) -> float | None:
        """What a commit sends as its wait bound: its own, the client's, or
        the connection's timeout (the controller answers BackupTimeoutError
        by then); None where no commit waits for a backup."""
        if not self._primary:
            return None
        if commit_timeout is not None:
            return commit_timeout
        return self.commit_timeout if self.commit_timeout is not None else self._timeout

    def _reply_timeout(self, bound: float | None) -> float | None:
        """The socket timeout for a request whose commit may wait `bound`
        seconds: the controller's answer (BackupTimeoutError at worst) comes
        before it, so a commit waiting for its backup is never "not reachable"."""
        if self._timeout is None or bound is None:
            return self._timeout
        return max(self._timeout, bound + _COMMIT_REPLY_GRACE)

    def _after_fork(self) -> None:
        self._local = threading.local()
        self._sessions = []
        self._lock = threading.Lock()
        parent, self._pid = self._pid, os.getpid()
        for snap in list(self._snapshots):
            snap._orphan(parent)   # the pin is the parent's: this process has none

    # -- public surface ---------------------------------------------------------

    @property
    def name(self) -> str:
        return self.config.name

    def table(self, name: str) -> "Table":
        self._check()
        t = self._tables.get(name)
        if t is None:
            t = self._tables[name] = Table(self, self.schema.table(name))
        return t

    @property
    def tables(self) -> list[str]:
        return list(self.schema.tables)

    def snapshot(self) -> "Snapshot":
        """A consistent read-only view: every read through it sees one
        committed state. Holds old block versions until closed."""
        self._check()
        self._vouch()
        return Snapshot(self)

    def _vouch(self) -> None:
        """The controller clears reader slots that no session of their process
        owns. After a controller restart this process's sessions are gone (a
        reading-only client never notices): say HELLO again before a new
        snapshot takes a slot."""
        opened = self._att.sb.sb_opened_ns
        if opened == self._opened_ns:
            return
        self._opened_ns = opened
        try:
            self._call([m.OP_HELLO, m.PROTOCOL_VERSION, self._name or f"pid{os.getpid()}", os.getpid()], "hello")
        except errors.UnavailableError:
            pass   # no controller now: reads go on, the next snapshot asks again

    def transaction(self, program: str | None = None, input: Any = None, *, durability=None,
                    commit_timeout: float | None = None, pipeline: bool | None = None,
                    optimistic: bool | None = None) -> "Transaction":
        """A transaction (context manager): leaving the block commits it, an
        exception (or :meth:`Transaction.cancel`) cancels it. `program` and
        `input` form its T log: which program ran, with what input.

        `durability` (a primary with secondaries): what commit waits for —
        "quorum" (the configured synchronous secondaries: the default),
        "local" (none), "all" (every secondary) or an int k (any k). The
        records stay locked until it is reached, whatever commit(wait=...).
        `commit_timeout`: how long commit waits for it (default: the
        client's); past it commit raises BackupTimeoutError (committed, the
        backup pending: do not retry).

        `pipeline` (default: the client's, see connect()): send insert,
        update, delete and put without waiting for their replies, and the
        commit right behind them; their errors are raised later, naming the
        statement, and a failed one rolls the transaction back (README,
        "Pipelined statements"). False: every statement waits for its reply,
        raises its own error there and leaves the transaction open.

        `optimistic` (default: the client's, see connect(); implies
        `pipeline`): a get for update reads the record
        where it is, in shared memory, and sends its lock without waiting,
        as a pipelined write, with the bytes it read; if another transaction
        changed the record before the lock was taken, the transaction is
        cancelled with StaleReadError (a TransactionCancelledError: run it
        again), raised by the next statement that waits or by commit. A
        transfer (two gets for update, two updates) is then one round trip
        (README, "Optimistic transactions")."""
        self._check()
        optimistic = self.optimistic if optimistic is None else _check_flag("optimistic", optimistic)
        return Transaction(self, program, input, durability if durability is not None else self.durability,
                           m.check_commit_timeout(commit_timeout),
                           optimistic or (self.pipeline if pipeline is None else _check_flag("pipeline", pipeline)),
                           optimistic)

    def run(self, program: str, input: Any = None, *, durability=None, commit_timeout: float | None = None,
            optimistic: bool | None = None, retries: int = 0):
        """Run a transaction by a program: import `program` ("module:function"),
        open a transaction whose T log records the program's name, its version
        (the function's ``__version__``, else a hash of its code) and `input`,
        call ``function(tx, input)`` and commit; an exception cancels (and is
        raised). Returns what the function returned.

        Such a transaction can be run again (``appliance rerun``) when the
        function reads and writes only through `tx` and takes the clock,
        random choices and everything else from `input`. :attr:`last_run`
        (per thread) is then the transaction's ``result`` plus "program",
        "program_version" and "attempts" (1, or more when it ran again).

        `optimistic`: whether the transaction is optimistic (default: the
        client's; see :meth:`transaction`).
        `retries`: when the controller cancels the transaction (a
        TransactionCancelledError: a stale optimistic read, a deadlock, a lock
        timeout), call the function again in a new transaction, up to this
        many times, then raise; such a function is safe to call again (what
        it did went through `tx`, and nothing of a cancelled transaction
        remains)."""
        from ..recovery.programs import resolve, version_of
        if type(retries) is not int or retries < 0:
            raise errors.WrongTypeError(f"run: retries must be an int >= 0, not {retries!r}")
        fn = resolve(program)
        version = version_of(fn)
        attempt = 0
        while True:
            tx = self.transaction(program, input, durability=durability, commit_timeout=commit_timeout,
                                  optimistic=optimistic)
            tx._version = version
            try:
                with tx:
                    value = fn(tx, input)
            except errors.TransactionCancelledError:
                if attempt >= retries:
                    raise
                attempt += 1
                continue
            break
        self._local.last_run = dict(tx.result or {}, program=program, program_version=version,
                                    attempts=attempt + 1)
        return value

    # -- going back in time (appliance.client.recovery, appliance.recovery) ---------------

    def history(self, **query) -> dict:
        """Which committed transactions changed what: see appliance.client.recovery.history."""
        self._check()
        from . import recovery
        return recovery.history(self, **query)

    def restore(self, to, **options) -> dict:
        """Point-in-time restore: see appliance.client.recovery.restore."""
        self._check()
        from . import recovery
        return recovery.restore(self, to, **options)

    def cancel_txn(self, txn: int, **options) -> dict:
        """Undo one committed transaction everywhere: see appliance.client.recovery.cancel_txn."""
        self._check()
        from . import recovery
        return recovery.cancel_txn(self, txn, **options)

    def rerun(self, program: str, fixed: str, **options):
        """Re-run a faulty program's transactions with a corrected one, and
        every later transaction (appliance.recovery.rerun.rerun); returns its
        RerunReport. `dry_run` is True unless given."""
        self._check()
        from ..recovery.rerun import rerun
        from .recovery import target_of
        since = options.pop("since", None)
        return rerun(self, program, fixed, since=target_of(since) if since is not None else None, **options)

    def batch(self, action: str, at=None) -> dict:
        """Batch mode on a secondary ("begin", "end", "status"): see appliance.client.recovery.batch."""
        self._check()
        from . import recovery
        return recovery.batch(self, action, at)

    @property
    def last_run(self) -> dict | None:
        """What this thread's last :meth:`run` committed: txn, serial, version,
        program, program_version."""
        return getattr(self._local, "last_run", None)

    def wait_applied(self, serial: int, timeout: float = 10.0) -> int:
        """Read-your-writes on a secondary: wait until the primary's change
        `serial` (a commit's ``result["serial"]``) is applied here; returns
        the serial applied. On a primary it returns at once."""
        self._check()
        return self._call([m.OP_WAIT_APPLIED, serial, timeout], "wait_applied")

    def applied_serial(self) -> int:
        """The primary serial this (secondary) appliance has applied, from shared memory."""
        self._check()
        sb = self._att.sb
        return sb.sb_pub[sb.sb_version & 1].pb_source_serial

    def load(self, table: str, records: Iterable[dict], *, batch: int = 5000, progress=None,
             skip_existing: bool = False) -> int:
        """Insert records in batches of `batch`, each batch one transaction;
        returns the number inserted. A batch is at most the controller's
        ``controller.max_load_records`` (bigger ones are sent as several).
        `progress(n)` is called after each batch with the number of records
        of `records` done so far. `skip_existing`: records whose primary key
        is already in the table are left out (to resume a load that stopped)."""
        self._check()
        t = self.schema.table(table)
        batch = max(1, min(batch, self.config.controller.max_load_records))
        present = self.table(table).__contains__ if skip_existing else None
        pk = t.pk
        inserted = done = 0
        chunk: list = []
        extra = [self.durability, self._commit_bound()]

        def send() -> None:
            nonlocal inserted, done, chunk
            todo, keep = chunk, None
            if present:
                keep = [i for i, r in enumerate(chunk) if not (isinstance(r, dict) and pk in r and present(r[pk]))]
                todo = [chunk[i] for i in keep]
            try:
                if todo:
                    inserted += self._call([m.OP_LOAD, t.name, todo, *extra], f"load {t.name}")
            except errors.ApplianceError as e:
                i = e.details.get("index")
                if keep is not None and isinstance(i, int) and 0 <= i < len(keep):
                    e.details["index"] = keep[i]   # where in this batch of `records`
                raise
            done += len(chunk)
            chunk = []
            if progress:
                progress(done)

        for rec in records:
            chunk.append(rec)
            if len(chunk) >= batch:
                send()
        if chunk:
            send()
        return inserted

    def status(self) -> dict:
        return self._call([m.OP_STATUS], "status")

    def committed_version(self) -> int:
        self._check()
        return self._reader.committed()

    def close(self) -> None:
        """Close the connections and unmap the segments. Reads other threads
        are inside finish first (apl_view_close waits for them); reads that
        start later raise ClosedError."""
        if self._closed:
            return
        self._closed = True
        _live_clients.discard(self)
        with self._lock:
            for s in self._sessions:
                s.close()
            self._sessions.clear()
        self._att.close()   # closes the C view first: reads fail with APL_ECLOSED, then unmaps

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<appliance.Client {self.config.name!r} {state}>"


_live_clients: "weakref.WeakSet[Client]" = weakref.WeakSet()


def _reinit_after_fork() -> None:
    for c in list(_live_clients):
        c._after_fork()


os.register_at_fork(after_in_child=_reinit_after_fork)


class Table(MutableMapping):
    """One table as a mapping: primary key -> record (a dict).

    Reads (``get``, ``[]``, ``in``, ``len``, iteration, :meth:`find`,
    :meth:`range`) come straight from shared memory; each call sees one
    committed state. ``table[k] = record`` and ``del table[k]`` are
    one-statement transactions (autocommit) sent to the controller.
    """

    def __init__(self, client: Client, schema: TableSchema, snapshot: "Snapshot | None" = None) -> None:
        self._client = client
        self._schema = schema
        self._snap = snapshot
        self._file = schema.file
        self.name = schema.name
        native = client._reader.table_reader(schema, _read_errors(schema.name, client, snapshot))
        #: the native reader (cext/apl_py.c): a snapshot's reads at its pinned version
        self._native = native if snapshot is None else native.at(snapshot.version)
        # the hot path: the native method itself is the instance's get, so a
        # get is one C call (encode the key, pin, look up, copy, unpin, build
        # the dict) with no Python frame around it
        self.get = self._native.get

    # -- reads -------------------------------------------------------------------

    def _version(self) -> int:
        c = self._client
        if c is None or c._closed:
            raise errors.ClosedError(f"table {self.name!r}: its client is closed")
        return 0

    def get(self, key, default=None):
        """The record with this primary key, or `default` (each instance's get
        is its native reader's method itself: see __init__)."""
        return self._native.get(key, default)

    def __getitem__(self, key):
        rec = self.get(key, _MISSING)
        if rec is _MISSING:
            raise errors.NoSuchRecordError(f"{self.name}[{_short(key)}]: no such record", table=self.name, key=key)
        return rec

    def __contains__(self, key) -> bool:
        try:
            return self.get(key, _MISSING) is not _MISSING
        except (errors.WrongTypeError, errors.KeyTooLongError):
            return False

    def __len__(self) -> int:
        ver = self._version()
        return self._client._reader.count(self._file, ver)

    def __iter__(self) -> Iterator:
        """Primary keys in order (one committed state for the whole iteration)."""
        ver = self._version() or None
        dec = self._schema.pk_codec.decode
        for k in self._client._reader.scan_keys(self._file, None, None, version=ver):
            yield dec(k)

    def keys(self):
        return list(self)

    def values(self):
        return list(self.range())

    def items(self):
        pk = self._schema.pk
        return [(r[pk], r) for r in self.range()]

    def range(self, lo=None, hi=None) -> Iterator[dict]:
        """Records in primary-key order, `lo` inclusive, `hi` exclusive; either
        may be None. The whole iteration sees one committed state."""
        ver = self._version() or None
        s = self._schema
        lob = s.key(lo) if lo is not None else None
        hib = s.key(hi) if hi is not None else None
        return self._client._reader.scan_values(self._native, lob, hib, version=ver)

    def find(self, field: str, value) -> list[dict]:
        """Every record whose alternate key `field` equals `value`, in
        primary-key order (one native call: one committed state)."""
        s = self._schema
        prefix = s.alt_key(field, value)
        return self._native.find(s.alt[field][0], prefix, 0, value)

    # -- autocommitted writes -------------------------------------------------------

    def _write(self, step: list, what: str):
        if self._snap is not None:
            raise errors.TransactionStateError(f"{self.name}: a snapshot is read-only")
        if self._client is None:
            raise errors.ClosedError(f"table {self.name!r}: its client is closed")
        c = self._client
        d, bound = c.durability, c._commit_bound()
        if d is None and bound is None:
            return c._call([m.OP_ATOMIC, None, None, [step]], what)
        return c._call([m.OP_ATOMIC, None, None, [step], {"durability": d, "commit_timeout": bound}], what)

    def __setitem__(self, key, record: dict) -> None:
        self._write([m.OP_PUT, self.name, key, record], f"{self.name}[{key!r}] = ...")

    def __delitem__(self, key) -> None:
        self._write([m.OP_DELETE, self.name, key], f"del {self.name}[{key!r}]")

    def insert(self, record: dict) -> dict:
        """Insert one record (autocommit); DuplicateKeyError if the key exists."""
        return self._write([m.OP_INSERT, self.name, record], f"{self.name}.insert")

    def __repr__(self) -> str:
        return f"<appliance.Table {self.name!r}>"


_MISSING = object()


class _SnapshotTable(Table):
    """A table read at a snapshot's pinned version (read-only): its native
    reader reads that version and is closed with the snapshot."""

    def _version(self) -> int:
        super()._version()
        snap = self._snap
        if snap._pin is None:
            snap._check()
        return snap.version


def _read_errors(name: str, client: Client, snap: "Snapshot | None"):
    """on_error of a table's native reader: the error of a failed read, a
    closed client or snapshot first (it refers to neither table nor reader,
    so a dropped snapshot's tables are freed, and its pin released, at once)."""
    def on_error(rc: int, op: str, arg) -> None:
        if client._closed:
            raise errors.ClosedError(f"table {name!r}: its client is closed")
        if snap is not None and snap._pin is None:
            snap._check()
        raise_for(rc, f"{name}.{op}({'' if arg is None else _short(arg)})", sb=client._att.sb)
    return on_error


@contextmanager
def _reply_timeout(s: Session, timeout: float | None):
    """`s` waits up to `timeout` for the replies of the requests inside."""
    if timeout is None or s.timeout is None or timeout <= s.timeout:
        yield
        return
    old, s.timeout = s.timeout, timeout
    if s.sock is not None:
        s.sock.settimeout(timeout)
    try:
        yield
    finally:
        s.timeout = old
        if s.sock is not None:
            s.sock.settimeout(old)


def _what(op: str, table=None, key=None) -> str:
    """A statement as messages name it: "accounts.update(7)", "accounts.insert", "commit"."""
    if table is None:
        return op
    if op == "insert":
        return f"{table}.insert"
    return f"{table}.{op}({_short(key)})"


def _short(v, limit: int = 60) -> str:
    """repr() for messages, cut short: a 5 MB key must not make a 5 MB message."""
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + "..."


class Snapshot:
    """A pinned committed state. ``snap.table(name)`` gives read-only tables
    that all read that state, however long the snapshot is held."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._pin = client._reader.pin()
        self._parent = 0           # after fork: the pid that holds the pin
        self.version = self._pin.version
        #: its tables while anyone holds them (their native readers are closed with the pin)
        self._tables: "weakref.WeakValueDictionary[str, _SnapshotTable]" = weakref.WeakValueDictionary()
        client._snapshots.add(self)

    def _check(self) -> None:
        if self._parent:
            raise errors.ClosedError(f"snapshot at version {self.version} belongs to process {self._parent}, "
                                     "which opened it before fork(); it pins nothing here: open a new one")
        if self._pin is None:
            raise errors.ClosedError("snapshot is closed")

    def _orphan(self, parent: int) -> None:
        if self._pin is not None:
            self._close_readers()  # this process pins nothing: no read at that version here
            self._pin = None       # never released here: the slot is the parent's
            self._parent = parent

    def table(self, name: str) -> Table:
        if self._pin is None:
            self._check()
        t = self._tables.get(name)
        if t is None:
            t = self._tables[name] = _SnapshotTable(self._client, self._client.schema.table(name), snapshot=self)
        return t

    def _close_readers(self) -> None:
        for t in list(self._tables.values()):
            t._native.close()

    def close(self) -> None:
        if self._pin is not None:
            self._close_readers()  # before the pin goes: no read starts at an unpinned version
            self._pin.close()
            self._pin = None

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


_PIPELINE = {"pipeline": True}        # OP_BEGIN's options of a pipelined transaction
_OK = m.OK


def _pipelined_failure(reply, tag, txn) -> errors.ApplianceError:
    """The error to raise for a pipelined statement's error reply: its own
    class, naming the statement (position, op, table, key) and what became of
    the transaction. `tag`: (position, op, table, key), None for BEGIN."""
    position, op, table, key = tag if tag is not None else (0, "begin", None, None)
    what = _what(op, table, key)
    try:
        result(reply, what)
    except errors.ApplianceError as e:
        err = e
    else:   # not reached: only error replies come here
        err = errors.ProtocolError(f"{what}: an error reply was expected")
    text = err.message
    if text.startswith(what + ": "):
        text = text[len(what) + 2:]
    if tag is None:
        head, tail = "begin of a pipelined transaction", "; none of its statements was carried out"
    else:
        head = f"{what} (statement {position} of transaction {txn}, pipelined)"
        tail = ("" if isinstance(err, errors.TransactionCancelledError) else
                "; the transaction was rolled back: nothing it did remains, the statements sent after "
                "this one were not carried out, and it cannot commit (cancel it)")
    details = {**err.details, "txn": txn, "statement": position, "op": op, "table": table, "key": key}
    return type(err)(f"{head}: {text}{tail}", code=err.code, **details)


class _Link:
    """A transaction as its connection knows it: the replies of its pipelined
    statements land here (Session.outstanding holds this, never the
    Transaction, so a transaction dropped with replies unread is still
    collected, and cancelled). Its owner thread alone uses it, except for
    Session.close() of a client closed from another thread (then every reply
    is lost anyway)."""

    __slots__ = ("number", "begin_pending", "failure", "open", "generation")

    def __init__(self) -> None:
        self.number: int | None = None
        self.begin_pending = False   # its BEGIN was sent pipelined, the reply not read yet
        self.failure: errors.ApplianceError | None = None   # the first pipelined failure read
        self.open = False            # begun on its connection and not ended (Session.txn)
        self.generation = 0          # of the connection it was begun on

    def reply(self, tag, reply) -> None:
        if type(reply) is list and len(reply) == 2 and reply[0] == _OK:
            if tag is None:
                self.begin_pending = False
                self.number = reply[1]
            return
        if tag is None:
            self.begin_pending = False
        if self.failure is None:     # later error replies are the statements not carried out
            self.failure = _pipelined_failure(reply, tag, self.number)

    def lost(self, tag) -> None:
        if tag is None:
            self.begin_pending = False
        if self.failure is None:
            what = "begin" if tag is None else f"{_what(*tag[1:])} (statement {tag[0]})"
            self.failure = errors.UnavailableError(
                f"{what}: the connection to the controller was lost before its reply; transaction "
                f"{self.number if self.number is not None else '(not numbered yet)'} was cancelled",
                txn=self.number, sent=True)


class Transaction:
    """A transaction on the controller; see :meth:`Client.transaction`.

    ``get(table, key, for_update=True)`` locks the record and returns it as
    this transaction sees it. ``insert``, ``update``, ``delete`` and ``put``
    lock their record. Locks are held until the transaction ends. Leaving the
    ``with`` block normally commits; an exception cancels.

    Pipelined (``pipeline=True``): ``insert``, ``update``, ``delete`` and
    ``put`` are sent without waiting for their reply (``put`` returns None);
    a failure among them is raised, naming the statement, by the next
    statement that waits (a get that asks the controller), by a later
    statement once its reply is in, or by commit, which is sent right behind
    them. The failed statement rolled the transaction back: state
    ``"failed"``, statements and commit raise TransactionStateError, cancel()
    ends it. See the README, "Pipelined statements".

    Optimistic (``optimistic=True``, pipelined too): ``get(table, key,
    for_update=True)`` of a record it has not written reads it in shared
    memory and sends its lock like a pipelined write, with the bytes read;
    a record changed in between cancels the transaction with
    StaleReadError, raised where a pipelined failure is. See the README,
    "Optimistic transactions".
    """

    def __init__(self, client: Client, program: str | None, input: Any, durability=None,
                 commit_timeout: float | None = None, pipeline: bool = False, optimistic: bool = False) -> None:
        self._client = client
        self.durability = durability
        self.commit_timeout = commit_timeout
        #: whether writes are sent without waiting for their replies
        self.pipeline = pipeline
        #: whether a get for update reads in shared memory and sends its lock pipelined
        self.optimistic = optimistic
        self._program = program
        self._input = input
        self._version: str | None = None     # the program callable's version (Client.run)
        self.state = "new"       # new, open, failed, committed, cancelled, unknown
        self.result: dict | None = None
        self._written: set = set()
        self._session: Session | None = None
        self._generation = 0
        self._began_ns = 0
        self._link = _Link()
        self._position = 0       # statements called so far (gets, inserts, updates, deletes, puts)
        # A pipelined transaction whose statements so far are all pipelined writes
        # keeps them here, unsent, with its BEGIN: ([begin, statement...], [None,
        # tag...]). At commit they go as one request (OP_ATOMIC, answered with the
        # number, then the outcome); a statement that waits, tx.number or a full
        # pipeline sends them first as pipelined requests (_send_held). None: none held.
        self._held: tuple[list, list] | None = None

    @property
    def number(self) -> int | None:
        """The transaction's number (None before its first statement). A
        pipelined transaction learns it from its BEGIN's reply: asking for it
        reads the replies up to that one (it raises nothing)."""
        link = self._link
        if self._held is not None and self.state == "open":
            try:
                self._send_held()
            except errors.UnavailableError:
                return None
        if link.begin_pending:
            try:
                self._session.drain(link)
            except errors.UnavailableError:
                pass             # recorded by the link (lost): raised at the next statement
        return link.number

    # -- states -------------------------------------------------------------------

    def _check_usable(self, op: str, table=None, key=None) -> None:
        """Raise unless statements may still be sent (state new or open)."""
        state = self.state
        if state == "new" or state == "open":
            return
        what = _what(op, table, key)
        if state == "failed":
            f = self._link.failure
            raise errors.TransactionStateError(
                f"{what}: transaction {self._link.number} failed: {f.message.split('; ')[0]}; it was rolled "
                "back and takes no more statements: cancel it", txn=self._link.number,
                statement=f.details.get("statement"), op=f.details.get("op"), table=f.details.get("table"),
                key=f.details.get("key"))
        raise errors.TransactionStateError(f"{what}: transaction is {state}")

    def _opened(self, s: Session) -> None:
        self._session = s
        self._generation = s.generation
        self.state = "open"
        link = self._link
        link.open = True
        link.generation = s.generation
        s.txn = link

    def _end(self, state: str) -> None:
        self.state = state
        self._link.open = False

    def _raise_failure(self):
        """Raise the failure a pipelined statement's reply brought (once; after
        it the transaction is "failed", or "cancelled" when the controller
        cancelled it: a lock timeout, a deadlock, a lost connection)."""
        f = self._link.failure
        cancelled = isinstance(f, (errors.TransactionCancelledError, errors.UnavailableError))
        self._end("cancelled" if cancelled else "failed")
        raise f

    # -- statements -----------------------------------------------------------------

    def _statement(self, req: list, op: str, table: str, key, pipelined: bool):
        """Send a statement (`op` with `table` and `key` name it in errors):
        pipelined, return None at once; else wait for its reply and return
        its result."""
        if self.state != "open":
            self._check_usable(op, table, key)
            return self._first(req, op, table, key, pipelined)
        c = self._client
        if c._closed:
            c._check()
        held = self._held
        if held is not None:
            if pipelined and len(held[0]) < self._session.depth:
                encode_sendable(req)
                held[0].append(req)
                held[1].append((self._position, op, table, key))
                return None
            self._send_held()    # then this one, as usual
        link = self._link
        s = self._session
        if s is not c._session() or s.generation != self._generation or not s.connected:
            self._end("cancelled")
            raise errors.UnavailableError(
                f"{_what(op, table, key)}: the connection to the controller was lost; transaction "
                f"{link.number} was cancelled")
        if link.failure is not None:
            self._raise_failure()
        try:
            if pipelined:
                s.send_pipelined([req], link, [(self._position, op, table, key)])
                return None
            reply = s.request(req)
        except errors.UnavailableError:
            self._end("cancelled")
            raise
        if link.failure is not None:     # a pipelined statement before this one failed
            self._raise_failure()
        return self._result(reply, op, table, key)

    def _first(self, req: list, op: str, table: str, key, pipelined: bool):
        """The first statement: BEGIN goes with it."""
        c = self._client
        c._check()
        link = self._link
        s = c._session()
        other = s.txn
        if other is not None and other is not link and other.open and other.generation == s.generation:
            raise errors.TransactionStateError(
                f"{_what(op, table, key)}: transaction {other.number} is still open on this thread's "
                "connection; commit or cancel it first", txn=other.number)
        if self._version is not None:
            begin = [m.OP_BEGIN, self._program, self._input, {"pipeline": self.pipeline, "version": self._version}]
        elif self.pipeline:
            begin = [m.OP_BEGIN, self._program, self._input, _PIPELINE]
        else:
            begin = [m.OP_BEGIN, self._program, self._input]
        self._began_ns = time.time_ns()
        if pipelined:
            encode_sendable([begin, req])
            self._held = ([begin, req], [None, (self._position, op, table, key)])
            self._opened(s)
            return None
        replies = s.call_many([begin, req])
        link.number = result(replies[0], "begin")
        self._opened(s)
        return self._result(replies[1], op, table, key)

    def _send_held(self) -> None:
        """Send the held BEGIN and statements as pipelined requests (at once: on a
        new connection if this one went stale, nothing of the transaction having
        been sent)."""
        reqs, tags = self._held
        self._held = None
        s = self._client._session()
        link = self._link
        try:
            s.send_pipelined(reqs, link, tags, now=True)
        except errors.UnavailableError:
            self._end("cancelled")
            raise
        link.begin_pending = True
        self._opened(s)

    def _commit_held(self, wait: bool) -> dict:
        """Commit a transaction whose statements were all held: BEGIN, the
        statements and COMMIT as one OP_ATOMIC request."""
        (begin, *steps), tags = self._held
        self._held = None
        c = self._client
        link = self._link
        bound = c._commit_bound(self.commit_timeout)
        opts = dict(begin[3]) if len(begin) > 3 else {}
        opts["pipeline"] = True
        if self.durability is not None:
            opts["durability"] = self.durability
        if bound is not None:
            opts["commit_timeout"] = bound
        if not wait:
            opts["wait"] = False
        s = c._session()
        self._opened(s)
        req = [m.OP_ATOMIC, begin[1], begin[2], steps, opts]
        try:
            if bound is None:      # nothing waits for a backup: the connection's own timeout
                reply = s.request_numbered(req, link)
            else:
                with _reply_timeout(s, c._reply_timeout(bound)):
                    reply = s.request_numbered(req, link)
        except errors.UnavailableError as e:
            return self._commit_lost(e)
        if reply is None or link.failure is not None:    # refused before it began
            self._raise_failure()
        if type(reply) is list and len(reply) == 4 and reply[0] == m.ERR and isinstance(reply[3], dict) \
                and type(reply[3].get("step")) is int and 0 <= reply[3]["step"] < len(steps):
            details = dict(reply[3])
            link.reply(tags[details.pop("step") + 1], [reply[0], reply[1], reply[2], details])
            self._raise_failure()
        out = self._committed(reply)
        out.pop("results", None)
        return out

    def _result(self, reply, op: str, table: str, key):
        if type(reply) is list and len(reply) == 2 and reply[0] == _OK:
            return reply[1]
        try:
            return result(reply, _what(op, table, key))
        except errors.TransactionCancelledError:
            self._end("cancelled")
            raise

    def get(self, table: str, key, *, for_update: bool = False):
        """The record as this transaction sees it (or None). With
        `for_update`, lock it until the transaction ends. A get that asks the
        controller (for_update, or a record this transaction wrote) waits for
        the pipelined statements before it; a plain get of another record
        reads the committed state where it is, asking nobody. In an
        optimistic transaction a get for update of a record it has not
        written reads it there too and sends its lock pipelined, with the
        bytes read (OP_LOCK_CHECKED)."""
        if self.state != "open":
            self._check_usable("get", table, key)
        self._position += 1
        if (table, key) in self._written or (for_update and not self.optimistic):
            return self._statement([m.OP_GET_FOR_UPDATE, table, key], "get", table, key, False)
        if for_update:
            c = self._client
            t = c.schema.table(table)
            if self._link.failure is not None and self.state == "open":
                self._raise_failure()
            c._check()
            raw = c._reader.get_raw(t.file, t.key(key))
            self._statement([m.OP_LOCK_CHECKED, table, key, raw], "get", table, key, True)
            return None if raw is None else t.decode(raw)
        if self._link.failure is not None and self.state == "open":
            self._raise_failure()
        return self._client.table(table).get(key)

    def insert(self, table: str, record: dict) -> None:
        pk = self._client.schema.table(table).pk      # an unknown table: raised here, nothing sent
        key = record.get(pk) if isinstance(record, dict) else None
        if self.state != "open":
            self._check_usable("insert", table, key)
        self._position += 1
        self._statement([m.OP_INSERT, table, record], "insert", table, key, self.pipeline)
        if isinstance(record, dict):
            self._written.add((table, key))

    def update(self, table: str, key, changes: dict) -> None:
        self._write([m.OP_UPDATE, table, key, changes], "update", table, key)

    def delete(self, table: str, key) -> None:
        self._write([m.OP_DELETE, table, key], "delete", table, key)

    def put(self, table: str, key, record: dict) -> str | None:
        """Insert or replace; returns "insert" or "update" — or None in a
        pipelined transaction, which does not wait to know."""
        return self._write([m.OP_PUT, table, key, record], "put", table, key)

    def _write(self, req: list, op: str, table: str, key):
        self._client.schema.table(table)              # an unknown table: raised here, nothing sent
        if self.state != "open":
            self._check_usable(op, table, key)
        self._position += 1
        r = self._statement(req, op, table, key, self.pipeline)
        self._written.add((table, key))
        return r

    def commit(self, *, wait: bool = True) -> dict:
        """Commit; returns {"txn", "serial", "version"}. With wait=False a
        primary answers right after the local commit (then "backup":
        "pending") while the records stay locked until the secondaries
        confirm (Figure 6). A commit that waits longer than its
        commit_timeout raises BackupTimeoutError: it is committed (state
        "committed", result with "backup": "pending"), the records stay
        locked until the confirmation; do not retry it. In a pipelined
        transaction the commit goes right behind the statements, and a
        failure among them is raised here instead: nothing is committed."""
        if self.state == "new":
            self.state = "committed"
            self.result = {"txn": None, "serial": None, "version": self._client.committed_version()}
            return self.result
        self._check_usable("commit")
        if self._held is not None:
            self.result = self._commit_held(wait)
            return self.result
        link = self._link
        s = self._session
        if s.generation != self._generation or not s.connected:
            self._end("cancelled")
            raise errors.UnavailableError(f"commit: connection lost; transaction {link.number} was cancelled")
        if link.failure is not None:
            self._raise_failure()
        c = self._client
        bound = c._commit_bound(self.commit_timeout)
        req = [m.OP_COMMIT, wait, self.durability] if bound is None else [m.OP_COMMIT, wait, self.durability, bound]
        try:
            if bound is None:
                reply = s.request(req)
            else:
                with _reply_timeout(s, c._reply_timeout(bound)):
                    reply = s.request(req)
        except errors.UnavailableError as e:
            self.result = self._commit_lost(e)
            return self.result
        if link.failure is not None:    # a pipelined statement failed: the controller refused the commit
            self._raise_failure()
        self.result = self._committed(reply)
        return self.result

    def _commit_lost(self, e: errors.UnavailableError) -> dict:
        """The connection went while committing: cancelled if the commit never
        left, else the outcome asked of the controller when it is back."""
        link = self._link
        if not e.details.get("sent", True):
            self._end("cancelled")  # the commit never left: the controller cancelled it
            raise errors.UnavailableError(
                f"commit of transaction {link.number}: the connection to the controller was lost; "
                "the transaction was cancelled", txn=link.number, sent=False) from None
        self._end("unknown")
        if link.number is None:     # a pipelined BEGIN whose reply never came: nothing to ask about
            raise errors.CommitUnknownError(
                "commit of a pipelined transaction: the controller stopped before answering even its "
                "begin, so its number is unknown and its outcome cannot be asked; check the data") from None
        self.result = self._resolve()
        return self.result

    def _committed(self, reply) -> dict:
        """The commit's reply: its result, or its error raised (BackupTimeoutError:
        committed, the backup pending)."""
        link = self._link
        if type(reply) is list and len(reply) == 2 and reply[0] == _OK and type(reply[1]) is dict:
            self.result = reply[1]      # the common case, kept lean
            self._end("committed")
            return self.result
        try:
            self.result = result(reply, f"commit of transaction {link.number}")
        except errors.BackupTimeoutError as e:
            self._end("committed")
            self.result = {"txn": link.number, "serial": e.details.get("serial"),
                           "version": e.details.get("version"), "backup": "pending"}
            raise
        except errors.ApplianceError:
            self._end("cancelled")
            raise
        self._end("committed")
        return self.result

    def _resolve(self) -> dict:
        """The controller went away between commit and reply: ask the next one."""
        deadline = time.monotonic() + 10.0
        while True:
            try:
                st = self._client._session().call([m.OP_TXN_STATUS, self.number, self._began_ns],
                                                  "txn_status")
                break
            except errors.UnavailableError:
                if time.monotonic() > deadline:
                    raise errors.CommitUnknownError(
                        f"commit of transaction {self.number}: the controller stopped before answering "
                        "and did not come back within 10 s; check the outcome later",
                        txn=self.number) from None
                time.sleep(0.05)
        if st == "committed":
            self._end("committed")
            return {"txn": self.number, "serial": None, "version": None, "recovered": True}
        if st == "not_committed":
            self._end("cancelled")
            raise errors.TransactionCancelledError(
                f"commit of transaction {self.number}: the controller stopped before publishing it; "
                "it did not commit (retry it)", txn=self.number)
        raise errors.CommitUnknownError(
            f"commit of transaction {self.number}: the controller stopped before answering and its "
            "change log no longer reaches back to the transaction's start; check the outcome",
            txn=self.number)

    def __del__(self):
        # dropped while open: cancel it, or its connection (and its locks) stay taken
        try:
            if self.state == "open" and self._session is not None:
                self._end("cancelled")
                if self._held is None:     # held statements never left: nothing to cancel
                    self._session.cancel_dropped(self._generation)
        except Exception:
            pass

    def cancel(self) -> None:
        """Cancel: nothing the transaction did remains, its locks are released
        when this returns. Idempotent. A pipelined transaction's failure not
        raised yet is not raised: cancelling discards it with the rest."""
        if self.state == "open":
            self._end("cancelled")
            s = self._session
            if self._held is not None:    # nothing of it was sent
                self._held = None
            elif s.generation == self._generation and s.connected:
                try:
                    s.call_many([[m.OP_CANCEL]], retry=False)   # after the replies still outstanding
                except errors.UnavailableError:
                    pass  # the controller cancels it when the connection goes
        elif self.state in ("new", "failed"):
            self._end("cancelled")   # failed: the controller rolled it back already

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if self.state in ("new", "open", "failed"):   # after cancel() leaving the block does nothing
                try:
                    self.commit()
                finally:
                    if self.state == "failed":   # a pipelined statement failed: raised, and it ends here
                        self._end("cancelled")
        else:
            self.cancel()

    def __repr__(self) -> str:
        return f"<appliance.Transaction {self._link.number} {self.state}>"
