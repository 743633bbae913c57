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

import msgpack

from .. import errors
from .._native import ffi, lib, raise_for
from ..config import Config, layout_differences, load as load_config
from ..store.reader import Reader
from ..store.records import Schema, TableSchema
from ..store.segment import Attachment
from ..wire import messages as m
from .session import Session, result
from .session import _pid as _session_pid

__all__ = ["connect", "Client", "Table", "Snapshot", "Transaction"]

_unpackb = msgpack.unpackb
_get_i64 = lib.apl_get_i64
_get = lib.apl_get
_NOTFOUND = lib.APL_NOTFOUND
_EBUFSIZE = lib.APL_EBUFSIZE
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
#: how much longer than a commit's wait bound the client waits for its answer
_COMMIT_REPLY_GRACE = 5.0


def connect(config: str | os.PathLike | Config, *, name: str = "", timeout: float | None = 30.0,
            durability=None, wait: float | None = None, commit_timeout: float | None = None) -> "Client":
    """Attach to the running appliance described by a config file.

    `timeout`: seconds one request may take (None: no limit). `wait`:
    seconds to wait for a controller that is not up yet (no socket, or
    nobody listening on it); by default `timeout`, and 0 fails at once.
    `commit_timeout`: how long a commit on a primary waits for its
    synchronous backup (default: `timeout`; None with timeout None: no
    bound); past it the commit raises
    :class:`~appliance.errors.BackupTimeoutError` — committed, its backup
    pending — never UnavailableError.

    Raises :class:`~appliance.errors.UnavailableError` when it is not running
    by then, :class:`~appliance.errors.AccessDeniedError` when this user may
    not attach, :class:`~appliance.errors.FormatError` when the config does
    not describe the appliance that is running.
    """
    cfg = config if isinstance(config, Config) else load_config(config)
    return Client(cfg, name=name, timeout=timeout, durability=durability, wait=wait,
                  commit_timeout=commit_timeout)


class _Buffers(threading.local):
    """Per-thread output buffer for the C read calls (the GIL is released
    during them, so threads must not share one). ``t`` is (C pointer, size,
    memoryview), one attribute lookup on the hot path."""

    def __init__(self) -> None:
        self.grow(1 << 16)

    def grow(self, size: int) -> None:
        self.raw = bytearray(size)
        self.c = ffi.from_buffer("uint8_t[]", self.raw)
        self.mv = memoryview(self.raw)
        self.size = size
        self.t = (self.c, size, self.mv)


class Client:
    """A connection to one appliance. Thread-safe; one controller connection
    per thread. Use as a context manager or call :meth:`close`."""

    def __init__(self, cfg: Config, *, name: str = "", timeout: float | None = 30.0, durability=None,
                 wait: float | None = None, commit_timeout: float | None = None) -> None:
        self.config = cfg
        #: what autocommitted writes wait for on a primary with secondaries (see transaction())
        self.durability = durability
        #: how long a commit waits for that (seconds; None: the connection's timeout)
        self.commit_timeout = m.check_commit_timeout(commit_timeout)
        self._primary = cfg.role == "primary"   # only a primary's commits wait for a backup
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
        if self._att.sb.sb_schema_hash != cfg.schema_hash():
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
        self._bufs = _Buffers()
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
                        max_frame=self.config.controller.max_frame)
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
        self._bufs = _Buffers()
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
                    commit_timeout: float | None = None) -> "Transaction":
        """A transaction (context manager): leaving the block commits it, an
        exception (or :meth:`Transaction.cancel`) cancels it. `program` and
        `input` form its T log: which program ran, with what input.

        `durability` (a primary with secondaries): what commit waits for —
        "quorum" (the configured synchronous secondaries: the default),
        "local" (none), "all" (every secondary) or an int k (any k). The
        records stay locked until it is reached, whatever commit(wait=...).
        `commit_timeout`: how long commit waits for it (default: the
        client's); past it commit raises BackupTimeoutError (committed, the
        backup pending: do not retry)."""
        self._check()
        return Transaction(self, program, input, durability if durability is not None else self.durability,
                           m.check_commit_timeout(commit_timeout))

    def run(self, program: str, input: Any = None, *, durability=None, commit_timeout: float | None = None):
        """Run a transaction by a program: import `program` ("module:function"),
        open a transaction whose T log records the program's name, its version
        (the function's ``__version__``, else a hash of its code) and `input`,
        call ``function(tx, input)`` and commit; an exception cancels (and is
        raised). Returns what the function returned.

        Such a transaction can be run again (``appliance rerun``) when the
        function reads and writes only through `tx` and takes the clock,
        random choices and everything else from `input`. :attr:`last_run`
        (per thread) is then the transaction's ``result`` plus "program" and
        "program_version"."""
        from ..recovery.programs import resolve, version_of
        fn = resolve(program)
        version = version_of(fn)
        tx = self.transaction(program, input, durability=durability, commit_timeout=commit_timeout)
        tx._version = version
        with tx:
            value = fn(tx, input)
        self._local.last_run = dict(tx.result or {}, program=program, program_version=version)
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
        self._view = client._reader.view
        self._schema = schema
        self._snap = snapshot
        self._file = schema.file
        self._int_key = schema.pk_codec.type_name == "int"
        self.name = schema.name

    # -- reads -------------------------------------------------------------------

    def _version(self) -> int:
        c = self._client
        if c is None or c._closed:
            raise errors.ClosedError(f"table {self.name!r}: its client is closed")
        return 0

    def get(self, key, default=None):
        """The record with this primary key, or `default`."""
        # the hot path: one C call (pin, lookup, copy, unpin) and one decode;
        # a closed client's view fails every lookup with APL_ECLOSED
        c = self._client
        cbuf, size, mv = c._bufs.t
        if self._int_key and type(key) is int:
            try:
                n = _get_i64(self._view, self._file, key, 0, cbuf, size)
            except OverflowError:
                n = self._get_slow(key, 0)
        else:
            n = self._get_slow(key, 0)
        if n >= 0:
            return _unpackb(mv[:n])
        return self._miss(n, key, default, 0)

    def _get_slow(self, key, ver: int) -> int:
        k = self._schema.key(key)
        b = self._client._bufs
        return _get(self._view, self._file, k, len(k), ver, b.c, b.size)

    def _miss(self, n: int, key, default, ver: int):
        if n == _NOTFOUND:
            return default
        if n == _EBUFSIZE:
            b = self._client._bufs
            b.grow(max(b.size * 2, int.from_bytes(b.raw[:8], "little")))
            return self._get_version(key, default, ver) if ver else self.get(key, default)
        self._version()
        raise_for(n, f"{self.name}.get({_short(key)})")

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
        return self._client._reader.scan_values(self._file, lob, hib, version=ver)

    def find(self, field: str, value) -> list[dict]:
        """Every record whose alternate key `field` equals `value`, in
        primary-key order."""
        ver = self._version() or None
        s = self._schema
        prefix = s.alt_key(field, value)
        index = s.alt[field][0]
        return list(self._client._reader.find_values(index, self._file, prefix, version=ver))

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
    """A table read at a snapshot's pinned version (read-only)."""

    def _version(self) -> int:
        super()._version()
        snap = self._snap
        if snap._pin is None:
            snap._check()
        return snap.version

    def get(self, key, default=None):
        # the hot path of snapshot reads: the pin check inline, then one C call
        snap = self._snap
        if snap._pin is None:
            self._version()         # raises ClosedError
        return self._get_version(key, default, snap.version)

    def _get_version(self, key, default, ver: int):
        c = self._client
        cbuf, size, mv = c._bufs.t
        if self._int_key and type(key) is int and _I64_MIN <= key <= _I64_MAX:
            n = _get_i64(self._view, self._file, key, ver, cbuf, size)
        else:
            n = self._get_slow(key, ver)
        if n >= 0:
            return _unpackb(mv[:n])
        return self._miss(n, key, default, ver)


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
        client._snapshots.add(self)

    def _check(self) -> None:
        if self._parent:
            raise errors.ClosedError(f"snapshot at version {self.version} belongs to process {self._parent}, "
                                     "which opened it before fork(); it pins nothing here: open a new one")
        if self._pin is None:
            raise errors.ClosedError("snapshot is closed")

    def _orphan(self, parent: int) -> None:
        if self._pin is not None:
            self._pin = None       # never released here: the slot is the parent's
            self._parent = parent

    def table(self, name: str) -> Table:
        if self._pin is None:
            self._check()
        return _SnapshotTable(self._client, self._client.schema.table(name), snapshot=self)

    def close(self) -> None:
        if self._pin is not None:
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


class Transaction:
    """A transaction on the controller; see :meth:`Client.transaction`.

    ``get(table, key, for_update=True)`` locks the record and returns it as
    this transaction sees it. ``insert``, ``update``, ``delete`` and ``put``
    lock their record. Locks are held until the transaction ends. Leaving the
    ``with`` block normally commits; an exception cancels.
    """

    def __init__(self, client: Client, program: str | None, input: Any, durability=None,
                 commit_timeout: float | None = None) -> None:
        self._client = client
        self.durability = durability
        self.commit_timeout = commit_timeout
        self._program = program
        self._input = input
        self._version: str | None = None     # the program callable's version (Client.run)
        self.number: int | None = None
        self.state = "new"       # new, open, committed, cancelled
        self.result: dict | None = None
        self._written: set = set()
        self._session: Session | None = None
        self._generation = 0
        self._began_ns = 0

    def _statement(self, req: list, what: str):
        if self.state not in ("new", "open"):
            raise errors.TransactionStateError(f"{what}: transaction is {self.state}")
        c = self._client
        c._check()
        if self.state == "new":
            s = c._session()
            self._began_ns = time.time_ns()
            begin = [m.OP_BEGIN, self._program, self._input]
            if self._version is not None:
                begin.append(self._version)
            replies = s.call_many([begin, req])
            self.number = result(replies[0], "begin")
            self._session = s
            self._generation = s.generation
            self.state = "open"
            reply = replies[1]
        else:
            s = self._session
            if s is not c._session() or s.generation != self._generation or not s.connected:
                self.state = "cancelled"
                raise errors.UnavailableError(
                    f"{what}: the connection to the controller was lost; transaction {self.number} "
                    "was cancelled")
            try:
                reply = s.call_many([req], retry=False)[0]
            except errors.UnavailableError:
                self.state = "cancelled"
                raise
        try:
            return result(reply, what)
        except errors.TransactionCancelledError:
            self.state = "cancelled"
            raise

    def get(self, table: str, key, *, for_update: bool = False):
        """The record as this transaction sees it (or None). With
        `for_update`, lock it until the transaction ends."""
        if self.state not in ("new", "open"):
            raise errors.TransactionStateError(f"{table}.get({_short(key)}): transaction is {self.state}")
        if for_update or (table, key) in self._written:
            return self._statement([m.OP_GET_FOR_UPDATE, table, key], f"{table}.get({_short(key)})")
        return self._client.table(table).get(key)

    def insert(self, table: str, record: dict) -> None:
        self._statement([m.OP_INSERT, table, record], f"{table}.insert")
        pk = self._client.schema.table(table).pk
        if isinstance(record, dict):
            self._written.add((table, record.get(pk)))

    def update(self, table: str, key, changes: dict) -> None:
        self._statement([m.OP_UPDATE, table, key, changes], f"{table}.update({key!r})")
        self._written.add((table, key))

    def delete(self, table: str, key) -> None:
        self._statement([m.OP_DELETE, table, key], f"{table}.delete({key!r})")
        self._written.add((table, key))

    def put(self, table: str, key, record: dict) -> str:
        r = self._statement([m.OP_PUT, table, key, record], f"{table}.put({key!r})")
        self._written.add((table, key))
        return r

    def commit(self, *, wait: bool = True) -> dict:
        """Commit; returns {"txn", "serial", "version"}. With wait=False a
        primary answers right after the local commit (then "backup":
        "pending") while the records stay locked until the secondaries
        confirm (Figure 6). A commit that waits longer than its
        commit_timeout raises BackupTimeoutError: it is committed (state
        "committed", result with "backup": "pending"), the records stay
        locked until the confirmation; do not retry it."""
        if self.state == "new":
            self.state = "committed"
            self.result = {"txn": None, "serial": None, "version": self._client.committed_version()}
            return self.result
        if self.state != "open":
            raise errors.TransactionStateError(f"commit: transaction {self.number} is {self.state}")
        s = self._session
        if s.generation != self._generation or not s.connected:
            self.state = "cancelled"
            raise errors.UnavailableError(f"commit: connection lost; transaction {self.number} was cancelled")
        bound = self._client._commit_bound(self.commit_timeout)
        req = [m.OP_COMMIT, wait, self.durability] if bound is None else [m.OP_COMMIT, wait, self.durability, bound]
        try:
            with _reply_timeout(s, self._client._reply_timeout(bound)):
                reply = s.call_many([req], retry=False)[0]
        except errors.UnavailableError as e:
            if not e.details.get("sent", True):
                self.state = "cancelled"  # the commit never left: the controller cancelled it
                raise errors.UnavailableError(
                    f"commit of transaction {self.number}: the connection to the controller was lost; "
                    "the transaction was cancelled", txn=self.number, sent=False) from None
            self.state = "unknown"
            self.result = self._resolve()
            return self.result
        try:
            self.result = result(reply, f"commit of transaction {self.number}")
        except errors.BackupTimeoutError as e:
            self.state = "committed"
            self.result = {"txn": self.number, "serial": e.details.get("serial"),
                           "version": e.details.get("version"), "backup": "pending"}
            raise
        except errors.ApplianceError:
            self.state = "cancelled"
            raise
        self.state = "committed"
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
            self.state = "committed"
            return {"txn": self.number, "serial": None, "version": None, "recovered": True}
        if st == "not_committed":
            self.state = "cancelled"
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
                self.state = "cancelled"
                self._session.cancel_dropped(self._generation)
        except Exception:
            pass

    def cancel(self) -> None:
        """Cancel: nothing the transaction did remains. Idempotent."""
        if self.state == "open":
            self.state = "cancelled"
            s = self._session
            if s.generation == self._generation and s.connected:
                try:
                    s.call_many([[m.OP_CANCEL]], retry=False)
                except errors.UnavailableError:
                    pass  # the controller cancels it when the connection goes
        elif self.state == "new":
            self.state = "cancelled"

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if self.state in ("new", "open"):
                self.commit()   # after cancel() leaving the block does nothing
        else:
            self.cancel()

    def __repr__(self) -> str:
        return f"<appliance.Transaction {self.number} {self.state}>"
