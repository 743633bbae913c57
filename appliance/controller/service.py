"""The controller's service: one thread, one epoll loop, many client sessions.

Concurrency model. Everything in this module runs on the controller's single
event-loop thread; nothing here is shared with another thread. Concurrency
between clients comes from interleaving their requests: each request runs as
a generator (a coroutine) that yields when it must wait — for a record lock
(``_WAIT_LOCK``) or for the group commit (``_WAIT_COMMIT``) — and is resumed
by the loop when the lock is granted, its wait times out, or the batch is
published. One session runs one request at a time, in order.

Nothing recurses and no session monopolises the loop. A resumption (a lock
granted, a wait timed out, a batch published) is queued on ``_ready`` and run
by :meth:`Controller._run_ready` from the loop, never from inside another
session's request: requests of one session run in a loop (``_pump``), at
most ``_PUMP_BATCH`` per turn, and a long request (a bulk load) yields every
``_LOAD_CHUNK`` records; both continue on the next turn (``_yielded``) after
the other sessions were served. A session with ``_INBOX_PAUSE`` requests
queued is not read from until it catches up, so a client that pipelines
without reading replies holds a bounded backlog. An exception that escapes a
session's handling drops that client (``session_failed``, logged once per
kind of failure) and the loop goes on.

A loop iteration: poll; read every readable socket and run what arrived;
fire due timers (lock timeouts, housekeeping); if transactions are waiting to
commit, apply them all in one batch and publish it (group commit: one
version, one location-table publication, for everything that arrived
together); then flush replies. Replies therefore leave only after the batch
that contains them is published.

Integrity first: an unexpected exception while a batch is open ends the
process without publishing; the restarted controller rolls the batch back.
"""
from __future__ import annotations

import errno
import heapq
import os
import pwd
import select
import socket
import stat
import struct
import time
from collections import deque
import msgpack

from .. import errors
from .._os.logs import LogEvery, LogOnce
from .._native import lib
from ..config import Config
from ..store import changelog
from ..store.reader import Reader
from ..store.records import Schema
from ..wire import framing
from ..wire import messages as m
from .locks import DEADLOCK, GRANTED, LockManager
from .readers import ReaderSlots
from .sync import SyncTracker, Waiter
from .txn import Change, Committer, Txn

__all__ = ["Controller"]

_WAIT_LOCK = object()
_WAIT_COMMIT = object()
_FAST = object()  # sess.gen while a fast-path autocommit waits for its batch
_WAIT_WATCH = object()  # a WATCH / WAIT_APPLIED long poll
_WAIT_WATCH_VERIFY = object()  # an operator's verify, resumed by the agent's result
_YIELD = object()  # a long request lets the other sessions run; it goes on next turn
_WRITE_OPS = frozenset({m.OP_BEGIN, m.OP_COMMIT, m.OP_ATOMIC, m.OP_LOAD}) | m.STEP_OPS
_unpackb = msgpack.unpackb
_packb = msgpack.Packer(use_bin_type=True).pack
_PEERCRED = struct.Struct("3i")
_READ_SIZE = 256 << 10
_PUMP_BATCH = 256      # requests of one session per loop turn
_INBOX_PAUSE = 4096    # queued requests at which a session is not read from
_LOAD_CHUNK = 2000     # records of an OP_LOAD between turns of the loop
_ACCEPT_BACKOFF = (0.05, 1.0)   # seconds without accepting after EMFILE & co: first, longest
_REPEAT_LOG_S = 10.0   # client_refused (per user), txn_idle_cancelled: one line per this many seconds


class Session:
    __slots__ = ("sock", "fd", "pid", "uid", "gid", "decoder", "out", "inbox", "txn", "gen",
                 "closed", "name", "want_write", "opened_ns", "requests", "agent", "watch", "agent_pid",
                 "waits", "paused", "mask", "idle_ns", "start")

    def __init__(self, sock: socket.socket, pid: int, uid: int, gid: int, max_frame: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.pid, self.uid, self.gid = pid, uid, gid
        self.decoder = framing.Decoder(max_frame)
        self.out = bytearray()
        self.inbox: deque = deque()
        self.txn: Txn | None = None
        self.gen = None            # the request in progress, when it waits
        self.closed = False
        self.name = ""
        self.want_write = False
        self.opened_ns = time.monotonic_ns()
        self.requests = 0
        self.agent: str | None = None   # "primary"/"secondary" once the agent registered
        self.agent_pid = 0
        self.watch = None               # (kind, value, timer) while a WATCH/WAIT_APPLIED waits
        self.waits = 0                  # +1 each time the request in progress waits (see _resume)
        self.paused = False             # not read from: _INBOX_PAUSE requests queued
        self.mask = select.EPOLLIN      # what epoll watches for this socket
        self.idle_ns = self.opened_ns   # when its last request finished (controller.idle_timeout)
        self.start = None               # the peer's start time, from HELLO on (owns its reader slots)


class Controller:
    def __init__(self, cfg: Config, writer, log, *, recovery: dict | None = None, created: bool = False) -> None:
        self.cfg = cfg
        self.log = log
        self.schema = Schema(cfg)
        self.writer = writer
        self.att = writer.att
        self.reader = Reader(self.att)
        self.readers = ReaderSlots(writer, log, self.att.sb.sb_block_size, self.att.compressed)
        self.committer = Committer(writer)
        self.locks = LockManager()
        self.sessions: dict[int, Session] = {}
        self.commit_queue: list[tuple[Session, Txn]] = []
        self.dirty: set[Session] = set()
        self.timers: list = []
        self._timer_seq = 0
        self.started_ns = time.time_ns()
        self.recovery = recovery or {}
        self.created = created
        self.counters = {"committed": 0, "cancelled": 0, "deadlocks": 0, "lock_timeouts": 0,
                         "clients_refused": 0, "clients_dropped": 0, "batches": 0, "idle_cancelled": 0}
        self.active: dict[int, Txn] = {}
        self._uids = cfg.allowed_uids() | {0, os.geteuid()}
        self._gids = cfg.allowed_gids()
        self._cred_cache: dict[tuple[int, int], bool] = {}
        self.lock_timeout_ns = int(cfg.controller.lock_timeout * 1e9)
        self.idle_timeout_ns = int(cfg.controller.idle_timeout * 1e9)
        self.max_load = cfg.controller.max_load_records
        self.max_frame = cfg.controller.max_frame
        self.max_key = self.schema.max_key
        # a change-log entry may take at most a quarter of the ring (apl_log_append)
        self.max_tlog = cfg.storage.log_size // 4 - 256
        self.role = cfg.role
        self.sync = SyncTracker(cfg.replication if self.role == "primary" else None, log)
        self.agent_state: dict = {}      # what the agent last reported (secondary: its link)
        self.copied: bytearray | None = None   # secondary: blocks copied so far while a copy runs
        self.needs_copy: str | None = None     # secondary: why the primary's stream was refused
        self.watchers: set = set()
        self.verify_new: list[int] = []
        self.resync_new: list[str] = []
        self.verify_waiting: dict[int, Session] = {}
        self._verify_seq = 0
        self._last_consumed = 0
        self.listener: socket.socket | None = None
        self._ready: deque = deque()     # (session, request, waits, value, exc) to run this turn
        self._yielded: list = []         # the same, for the next turn (a long request's next part)
        self._bugs = LogOnce(log)        # session_failed / request_failed, once per kind
        self._throttled = LogEvery(log, _REPEAT_LOG_S)
        self._accept_errors = LogOnce(log)
        self._accept_failures = 0        # accept() failures since the last success
        self._accept_paused = False
        self._user_names: dict[int, str] = {}
        self.ep = select.epoll()
        self.stopping = False
        self._rbuf = bytearray(_READ_SIZE)
        self._rview = memoryview(self._rbuf)

    # ------------------------------------------------------------------ setup

    def listen(self) -> None:
        path = self.cfg.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        check_socket_free(self.cfg)   # again, just before taking the path over
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        os.chmod(path, 0o666)  # the gate is the SO_PEERCRED check, with a clear refusal
        s.listen(512)
        s.setblocking(False)
        self.listener = s
        self.ep.register(s.fileno(), select.EPOLLIN)

    def reconfigure(self, cfg: Config) -> None:
        """Run with a reloaded config (SIGHUP: config.reload_logged gives it,
        with only the keys config.RELOADABLE lets the controller take)."""
        self.cfg = cfg
        self.lock_timeout_ns = int(cfg.controller.lock_timeout * 1e9)
        self._uids = cfg.allowed_uids() | {0, os.geteuid()}
        self._gids = cfg.allowed_gids()
        self._cred_cache.clear()
        if self.role == "primary":
            self.sync.reconfigure(cfg.replication)
            self._release_backed_up()

    def close(self) -> None:
        for sess in list(self.sessions.values()):
            self._drop(sess, "controller_stopping", log=False)
        if self.listener is not None:
            try:
                self.ep.unregister(self.listener.fileno())
            except OSError:
                pass
            self.listener.close()
            try:
                self.cfg.socket_path.unlink()
            except FileNotFoundError:
                pass
            self.listener = None
        self.ep.close()

    # ------------------------------------------------------------------ loop

    def add_timer(self, delay_s: float, fn) -> list:
        self._timer_seq += 1
        entry = [time.monotonic() + delay_s, self._timer_seq, fn]
        heapq.heappush(self.timers, entry)
        return entry

    @staticmethod
    def cancel_timer(entry) -> None:
        entry[2] = None

    def run_once(self, max_wait: float = 1.0) -> None:
        wait = max_wait
        if self.timers:
            wait = max(0.0, min(wait, self.timers[0][0] - time.monotonic()))
        if self.dirty or self.commit_queue or self._yielded or self._ready:
            wait = 0.0
        try:
            events = self.ep.poll(wait, 512)
        except InterruptedError:
            events = []
        if self._yielded:   # the long requests' next parts, after this turn's reads
            self._ready.extend(self._yielded)
            self._yielded = []
        lfd = self.listener.fileno() if self.listener else -1
        for fd, ev in events:
            if fd == lfd:
                self._accept()
                continue
            sess = self.sessions.get(fd)
            if sess is None:
                continue
            try:
                if ev & (select.EPOLLHUP | select.EPOLLERR) or (ev & select.EPOLLIN and not sess.paused):
                    self._read(sess)
                if ev & select.EPOLLOUT and not sess.closed:
                    self._flush(sess)
            except Exception as e:
                self._session_failed(sess, e)
        self._run_ready()
        if self.timers:
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, fn = heapq.heappop(self.timers)
                if fn is not None:
                    try:
                        fn()
                    except Exception as e:
                        self._bugs.error("timer_failed", _failure_kind(e), error=_describe(e), exc_info=True)
            self._run_ready()
        if self.commit_queue:
            self._commit_batch()
            self._run_ready()
        if self.dirty:
            dirty, self.dirty = self.dirty, set()
            for sess in dirty:
                if not sess.closed:
                    try:
                        self._flush(sess)
                    except Exception as e:
                        self._session_failed(sess, e)

    def _run_ready(self) -> None:
        """Run the queued resumptions and the sessions whose next requests may
        start: one flat loop, so no session's handling runs inside another's."""
        ready = self._ready
        while ready:
            sess, gen, waits, value, exc = ready.popleft()
            if sess.closed:
                continue
            try:
                if gen is not None:
                    if sess.gen is not gen or sess.waits != waits:
                        continue        # resumed already (a grant and a timeout both queued it)
                    if not self._step(sess, gen, value, exc):
                        continue
                self._pump(sess)
            except Exception as e:
                self._session_failed(sess, e)

    def _session_failed(self, sess: Session, e: Exception) -> None:
        """An exception escaped a session's handling: drop that client, keep serving."""
        self._bugs.error("session_failed", _failure_kind(e), error=_describe(e), pid=sess.pid,
                         uid=sess.uid, exc_info=True)
        self._drop(sess, "internal_error", log=False)
        self.counters["clients_dropped"] += 1

    # ------------------------------------------------------------------ sockets

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._accept_back_off(exc.errno)
                    return
                raise
            if self._accept_failures:
                self.log.warning("accept_resumed", failures=self._accept_failures)
                self._accept_failures = 0
                self._accept_errors.clear()
            try:
                pid, uid, gid = _PEERCRED.unpack(
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            except OSError:
                sock.close()
                continue
            if not self._allowed(uid, gid):
                self._refuse(sock, pid, uid)
                continue
            sock.setblocking(False)
            sess = Session(sock, pid, uid, gid, self.max_frame)
            self.sessions[sess.fd] = sess
            self.ep.register(sess.fd, select.EPOLLIN)
            self.log.debug("client_connected", pid=pid, uid=uid)

    def _accept_back_off(self, err: int) -> None:
        """accept() failed for want of descriptors or memory. The listener
        stays readable (level-triggered epoll), so retrying at once would spin:
        stop watching it for a while, doubling the pause up to a second, and
        log the first failure (accept_failed) and the recovery (accept_resumed,
        with the count), not every retry."""
        self._accept_failures += 1
        first, longest = _ACCEPT_BACKOFF
        delay = min(longest, first * (1 << min(self._accept_failures - 1, 10)))
        self._accept_errors.error("accept_failed", errno.errorcode.get(err, str(err)), error=os.strerror(err),
                                  clients=len(self.sessions), retry_in_s=delay)
        if not self._accept_paused:
            self._accept_paused = True
            self.ep.modify(self.listener.fileno(), 0)
            self.add_timer(delay, self._accept_again)

    def _accept_again(self) -> None:
        self._accept_paused = False
        if self.listener is not None:
            self.ep.modify(self.listener.fileno(), select.EPOLLIN)

    def _refuse(self, sock: socket.socket, pid: int, uid: int) -> None:
        """A user not in [access]: one short reply, then close. The socket is
        world-connectable, so refusals cost as little as they can: no blocking
        send, and one client_refused line per user every _REPEAT_LOG_S
        seconds (with the count since the last one), not one per connection."""
        self.counters["clients_refused"] += 1
        who = self._user_names.get(uid)
        if who is None:
            who = self._user_names[uid] = _user_name(uid)
        self._throttled.warning("client_refused", uid, pid=pid, uid=uid, user=who)
        msg = (f"connect to appliance {self.cfg.name!r}: user {who} (uid {uid}) is not allowed "
               f"(see [access] in {self.cfg.path})")
        try:
            sock.setblocking(False)
            sock.send(framing.encode(m.err("APL_EACCESS", msg, {"uid": uid})))  # fits an empty buffer
        except OSError:
            pass
        sock.close()

    def _allowed(self, uid: int, gid: int) -> bool:
        key = (uid, gid)
        ok = self._cred_cache.get(key)
        if ok is None:
            ok = uid in self._uids or gid in self._gids
            if not ok and self._gids:
                try:
                    name = pwd.getpwuid(uid).pw_name
                    ok = bool(self._gids.intersection(os.getgrouplist(name, gid)))
                except KeyError:
                    ok = False
            self._cred_cache[key] = ok
        return ok

    def _read(self, sess: Session) -> None:
        # recv_into one reused buffer: a fresh 256 KiB bytes per recv() would
        # cost an mmap/munmap pair per request (above malloc's mmap threshold)
        try:
            n = sess.sock.recv_into(self._rbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if not n:
            if sess.decoder.buffered:
                self._drop(sess, "hung_up_mid_frame")
            else:
                self._drop(sess, "disconnected", log=False)
            return
        try:
            msgs = sess.decoder.feed(self._rview[:n])
        except errors.ProtocolError as exc:
            self._drop(sess, "bad_frame", error=str(exc))
            return
        if msgs:
            sess.inbox.extend(msgs)
            self._pump(sess)
            if len(sess.inbox) >= _INBOX_PAUSE and not sess.paused and not sess.closed:
                sess.paused = True
                self._watch(sess)

    def _send(self, sess: Session, reply: list) -> None:
        if sess.closed:
            return
        sess.out += framing.encode(reply)
        self.dirty.add(sess)

    def _flush(self, sess: Session) -> None:
        if not sess.out:
            if sess.want_write:
                sess.want_write = False
                self._watch(sess)
            return
        try:
            n = sess.sock.send(sess.out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._drop(sess, "send_failed", log=False)
            return
        del sess.out[:n]
        if bool(sess.out) != sess.want_write:
            sess.want_write = bool(sess.out)
            self._watch(sess)
        if len(sess.out) > 4 * self.max_frame:
            self._drop(sess, "not_reading_replies")

    def _watch(self, sess: Session) -> None:
        """Tell epoll what this session waits for: input unless paused, output while replies wait."""
        mask = (0 if sess.paused else select.EPOLLIN) | (select.EPOLLOUT if sess.want_write else 0)
        if mask != sess.mask:
            sess.mask = mask
            self.ep.modify(sess.fd, mask)

    def _drop(self, sess: Session, reason: str, log: bool = True, **kw) -> None:
        if sess.closed:
            return
        sess.closed = True
        if log:
            self.counters["clients_dropped"] += 1
            self.log.warning("client_dropped", reason=reason, pid=sess.pid, uid=sess.uid, **kw)
        try:
            self.ep.unregister(sess.fd)
        except OSError:
            pass
        self.sessions.pop(sess.fd, None)
        self.dirty.discard(sess)
        self.watchers.discard(sess)
        if sess.watch is not None:
            self.cancel_timer(sess.watch[2])
            sess.watch = None
        if sess.agent and not any(x.agent for x in self.sessions.values()):
            self.log.warning("agent_detached", pid=sess.pid)
            if self.role == "primary":
                self.sync.update({n: {"connected": False, "state": "agent down"} for n in self.sync.secondaries})
        txn = sess.txn
        if txn is not None and txn.state == "open":
            self._cancel(txn, "client_gone")
        sess.gen = None
        try:
            sess.sock.close()
        except OSError:
            pass

    # ------------------------------------------------------------------ requests

    def _pump(self, sess: Session) -> None:
        """Start the session's queued requests, in order, until one waits; at
        most _PUMP_BATCH this turn (the rest go on next turn)."""
        budget = _PUMP_BATCH
        inbox = sess.inbox
        while inbox and sess.gen is None and not sess.closed:
            if not budget:
                self._yielded.append((sess, None, 0, None, None))
                return
            budget -= 1
            req = inbox.popleft()
            sess.requests += 1
            if type(req) is not list or not req or type(req[0]) is not int:
                self._send(sess, m.err("APL_EPROTO", "request must be [op, args...]"))
                continue
            if req[0] in m.ONE_WAY and sess.agent:
                self._one_way(sess, req)     # from anyone else: an ordinary request, refused
                continue
            if req[0] == m.OP_ATOMIC and self.role != "secondary":
                try:
                    if self._fast_atomic(sess, req):
                        continue
                except Exception as e:  # a bug: report it, undo, keep serving
                    self._bugs.error("request_failed", _failure_kind(e), error=_describe(e), exc_info=True)
                    sess.gen = None
                    if sess.txn is not None and sess.txn.state in ("open", "committing"):
                        sess.txn.state = "open"
                        self._cancel(sess.txn, "internal_error")
                    self._send(sess, m.err("APL_EINVAL", f"internal error: {type(e).__name__}: {e}"))
                    continue
            self._step(sess, self._handle(sess, req), None, None)
        if sess.paused and len(inbox) < _INBOX_PAUSE // 2 and not sess.closed:
            sess.paused = False
            self._watch(sess)

    def _one_way(self, sess: Session, req: list) -> None:
        """A request with no reply (OP_ACKED) from an agent's session: refused
        ones are logged, not answered (the agent reads no reply to it)."""
        if (sess.agent != "primary" or self.role != "primary" or len(req) != 3 or type(req[2]) is not int
                or req[1] not in self.sync.secondaries):
            self.log.warning("one_way_request_refused", op=req[0], agent=sess.agent, pid=sess.pid,
                             request=repr(req)[:200])
            return
        self.sync.ack(req[1], req[2])
        if self.sync.waiting:
            self._release_backed_up()

    def _step(self, sess: Session, gen, value, exc) -> bool:
        """Advance a request coroutine until it finishes (True: the session may
        start its next request) or waits (False)."""
        try:
            cmd = gen.throw(exc) if exc is not None else gen.send(value)
        except StopIteration as stop:
            sess.gen = None
            sess.idle_ns = time.monotonic_ns()
            self._send(sess, m.ok(stop.value))
            return True
        except errors.ApplianceError as e:
            sess.gen = None
            sess.idle_ns = time.monotonic_ns()
            self._send(sess, m.err(e.code, e.message, _plain(e.details)))
            return True
        except Exception as e:  # a bug: report it and keep serving
            sess.gen = None
            sess.idle_ns = time.monotonic_ns()
            self._bugs.error("request_failed", _failure_kind(e), error=_describe(e), exc_info=True)
            if sess.txn is not None and sess.txn.state == "open":
                self._cancel(sess.txn, "internal_error")
            self._send(sess, m.err("APL_EINVAL", f"internal error: {type(e).__name__}: {e}"))
            return True
        sess.gen = gen
        sess.waits += 1
        if cmd is _WAIT_COMMIT:
            self.commit_queue.append((sess, sess.txn))
        elif cmd is _WAIT_WATCH:
            self.watchers.add(sess)
        elif cmd is _YIELD:
            self._yielded.append((sess, gen, sess.waits, None, None))
        return False

    def _resume(self, sess: Session, value=None, exc=None) -> None:
        """Queue the waiting request of `sess` to go on with `value` (or `exc`
        thrown in); it runs from the loop (_run_ready), not from the caller."""
        gen = sess.gen
        if gen is None or gen is _FAST or sess.closed:
            return
        self._ready.append((sess, gen, sess.waits, value, exc))

    def _handle(self, sess: Session, req: list):
        op = req[0]
        args = req[1:]
        if self.role == "secondary" and op in _WRITE_OPS:
            raise errors.ReadOnlyError(
                f"appliance {self.cfg.name!r} is a secondary: it takes changes only from its primary "
                f"{self.cfg.replication.primary!r}; write there")
        if op not in m.NAMES:
            raise errors.ProtocolError(f"unknown request op {op}")
        if op >= m.OP_AGENT:
            return (yield from self._agent_op(sess, op, args))
        if op == m.OP_WAIT_APPLIED:
            _arity(args, 2, "wait_applied")
            return (yield from self._wait_applied(sess, args[0], args[1]))
        if op == m.OP_VERIFY:
            _arity(args, 1, "verify")
            return (yield from self._verify(sess, args[0]))
        if op == m.OP_RESYNC:
            _arity(args, 1, "resync")
            if self.role != "primary" or args[0] not in self.sync.secondaries:
                raise errors.NoSuchTableError(f"resync: {args[0]!r} is not a secondary of {self.cfg.name!r}",
                                              secondary=str(args[0]))
            if not any(x.agent for x in self.sessions.values()):
                raise errors.UnavailableError(f"resync: the replication agent of {self.cfg.name!r} is not running")
            self.resync_new.append(args[0])
            self.log.info("resync_requested", secondary=args[0])
            for w in list(self.watchers):
                self._wake_watcher(w)
            return None
        if op in m.STEP_OPS:
            txn = self._open_txn(sess)
            return (yield from self._statement(txn, op, args))
        if op == m.OP_ATOMIC:
            return (yield from self._atomic(sess, args))
        if op == m.OP_BEGIN:
            _arity(args, 2, "begin")
            if sess.txn is not None and sess.txn.state == "open":
                raise errors.TransactionStateError(
                    f"begin: transaction {sess.txn.number} is still open on this connection")
            return self._begin(sess, args[0], args[1]).number
        if op == m.OP_COMMIT:
            txn = self._open_txn(sess)
            wait = bool(args[0]) if args else True
            durability = self.sync.check_durability(args[1] if len(args) > 1 else None)
            bound = m.check_commit_timeout(args[2] if len(args) > 2 else None)
            return (yield from self._commit(txn, wait, durability, bound))
        if op == m.OP_CANCEL:
            txn = sess.txn
            if txn is not None and txn.state == "open":
                self._cancel(txn, "cancelled")
            return None
        if op == m.OP_LOAD:
            return (yield from self._load(sess, args))
        if op == m.OP_HELLO:
            if len(args) not in (2, 3):
                _arity(args, 3, "hello")
            if args[0] != m.PROTOCOL_VERSION:
                raise errors.ProtocolError(f"hello: protocol version {args[0]!r} is not supported "
                                           f"(controller speaks {m.PROTOCOL_VERSION})")
            if len(args) == 3 and args[2] != sess.pid:
                # its reader slots carry the pid it sees; the controller knows readers by SO_PEERCRED
                self.log.warning("client_refused", pid=sess.pid, uid=sess.uid, claimed_pid=args[2],
                                 reason="pid_namespace")
                raise errors.AccessDeniedError(
                    f"connect to appliance {self.cfg.name!r}: this process is pid {args[2]!r} in its pid "
                    f"namespace but pid {sess.pid} in the controller's: clients must share the controller's "
                    "pid namespace (reader slots are tied to pids)", pid=sess.pid, claimed_pid=str(args[2]))
            sess.name = str(args[1])[:64]
            sess.start = lib.apl_pid_start(sess.pid)
            sb = self.att.sb
            return {"name": self.cfg.name, "instance": sb.sb_instance, "epoch": sb.sb_epoch,
                    "schema_hash": sb.sb_schema_hash, "pid": os.getpid(), "version": sb.sb_version}
        if op == m.OP_STATUS:
            return self.status()
        if op == m.OP_TXN_STATUS:
            _arity(args, 2, "txn_status")
            return self._txn_status(args[0], args[1])
        raise errors.ProtocolError(f"unknown request op {op}")

    # ------------------------------------------------------------------ transactions

    def _begin(self, sess: Session, program, input_) -> Txn:
        if program is not None and not isinstance(program, str):
            raise errors.WrongTypeError("begin: program must be a string or None")
        if input_ is not None and not isinstance(input_, (int, float, bool, str)):
            size = len(_packb([program, input_]))
            if size > self.max_tlog:
                raise errors.RecordTooLargeError(
                    f"begin: the transaction's input (T log) takes {size} bytes; at most {self.max_tlog} "
                    "fit the change log", size=size, limit=self.max_tlog)
        txn = Txn(self.writer.next_txn(), program, input_, sess)
        sess.txn = txn
        self.active[txn.number] = txn
        return txn

    def _open_txn(self, sess: Session) -> Txn:
        txn = sess.txn
        if txn is not None and txn.state == "cancelled" and txn.reason == "idle_timeout":
            sess.txn = None   # said once; the next statement needs a new transaction
            raise errors.TransactionCancelledError(
                f"transaction {txn.number} was cancelled: it stayed open with no request for more than "
                f"{self.cfg.controller.idle_timeout:g} s (controller.idle_timeout); its locks were released",
                txn=txn.number)
        if txn is None or txn.state != "open":
            raise errors.TransactionStateError("no transaction is open on this connection (begin one first)")
        return txn

    def _cancel(self, txn: Txn, reason: str) -> None:
        if txn.state not in ("open",):
            return
        txn.state = "cancelled"
        txn.reason = reason
        txn.changes.clear()
        self.active.pop(txn.number, None)
        self.counters["cancelled"] += 1
        self.log.debug("txn_cancelled", txn=txn.number, reason=reason)
        self._release(txn)

    def _release(self, txn: Txn) -> None:
        for grant in self.locks.release_all(txn):
            grant()

    def _lock(self, txn: Txn, file: int, pk: bytes):
        key = (file, pk)
        sess = txn.session
        r = self.locks.acquire(txn, key, lambda: self._granted(txn))
        if r == GRANTED:
            return
        if r == DEADLOCK:
            self.counters["deadlocks"] += 1
            self.log.info("deadlock_detected", txn=txn.number, holder=self.locks.holder(key).number)
            self._cancel(txn, "deadlock")
            raise errors.DeadlockError(
                f"transaction {txn.number}: deadlock waiting for a record lock held by transaction "
                f"{self.locks.holder(key).number if self.locks.holder(key) else '?'}; "
                "this transaction was cancelled (retry it)", txn=txn.number)
        timer = self.add_timer(self.lock_timeout_ns / 1e9, lambda: self._lock_timed_out(txn))
        try:
            yield _WAIT_LOCK
        finally:
            self.cancel_timer(timer)
        if sess.closed or txn.state != "open":
            raise errors.TransactionCancelledError(f"transaction {txn.number} was cancelled")

    def _granted(self, txn: Txn) -> None:
        sess = txn.session
        if sess is not None and not sess.closed and sess.txn is txn:
            self._resume(sess)

    def _lock_timed_out(self, txn: Txn) -> None:
        if txn.waiting_for is None or txn.state != "open":
            return
        self.counters["lock_timeouts"] += 1
        self.locks.cancel_wait(txn)
        self._cancel(txn, "lock_timeout")
        self._resume(txn.session, exc=errors.LockTimeoutError(
            f"transaction {txn.number}: waited {self.cfg.controller.lock_timeout:g} s for a record lock; "
            "the transaction was cancelled (retry it)", txn=txn.number))

    def _committed(self, file: int, pk: bytes) -> bytes | None:
        return self.reader.get_raw(file, pk, self.att.sb.sb_version)

    def _change(self, txn: Txn, t, key, pk: bytes) -> Change:
        ch = txn.changes.get((t.file, pk))
        if ch is None:
            before = self._committed(t.file, pk)
            rec = _unpackb(before) if before is not None else None
            ch = Change(t, key, pk, before, rec)
            txn.changes[(t.file, pk)] = ch
        return ch

    def _prepare(self, op: int, args: list) -> tuple:
        """Validate a statement; no lock taken, nothing changed.
        Returns (op, table, key, encoded key, payload)."""
        if op == m.OP_PUT:
            _arity(args, 3, "put")
            t = self.schema.table(args[0])
            key = args[1]
            rec = t.full(args[2], key)
            pk = t.key(key)
            alt = t.alt_entries(rec, pk)
            t.check_keys(pk, alt, self.max_key)
            return op, t, key, pk, (rec, t.encode(rec, pk), alt)
        if op == m.OP_INSERT:
            _arity(args, 2, "insert")
            t = self.schema.table(args[0])
            rec = t.full(args[1])
            key = rec[t.pk]
            pk = t.key(key)
            alt = t.alt_entries(rec, pk)
            t.check_keys(pk, alt, self.max_key)
            return op, t, key, pk, (rec, t.encode(rec, pk), alt)
        if op == m.OP_UPDATE:
            _arity(args, 3, "update")
            t = self.schema.table(args[0])
            key = args[1]
            if not isinstance(args[2], dict):
                raise errors.WrongTypeError(f"{t.name}.update({key!r}): changes must be a dict", table=t.name)
            return op, t, key, t.key(key), args[2]
        if op == m.OP_DELETE or op == m.OP_GET_FOR_UPDATE:
            _arity(args, 2, "delete" if op == m.OP_DELETE else "get_for_update")
            t = self.schema.table(args[0])
            key = args[1]
            return op, t, key, t.key(key), None
        raise errors.ProtocolError(f"op {op} is not a transaction statement")

    def _apply_stmt(self, txn: Txn, p: tuple):
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

    def _statement(self, txn: Txn, op: int, args: list):
        """One statement of a transaction (a generator: it may wait for a lock)."""
        p = self._prepare(op, args)
        yield from self._lock(txn, p[1].file, p[3])
        return self._apply_stmt(txn, p)

    def _fast_atomic(self, sess: Session, req: list) -> bool:
        """A one-statement autocommit (``table[k] = v``) whose record is not
        locked runs straight through, without the coroutine machinery.
        False: the general path must take it (it validates everything again)."""
        durability, bound = "quorum", None
        if len(req) == 5:   # options: only durability and commit_timeout come this way
            opts = req[4]
            if type(opts) is not dict or not opts.keys() <= {"durability", "commit_timeout"}:
                return False
            try:
                durability = self.sync.check_durability(opts.get("durability"))
                bound = m.check_commit_timeout(opts.get("commit_timeout"))
            except errors.ApplianceError:
                return False
        elif len(req) != 4:
            return False
        if sess.txn is not None and sess.txn.state == "open":
            return False
        steps = req[3]
        if type(steps) is not list or len(steps) != 1:
            return False
        st = steps[0]
        if type(st) is not list or not st or type(st[0]) is not int or st[0] not in m.STEP_OPS \
                or not (req[1] is None or type(req[1]) is str):
            return False
        try:
            p = self._prepare(st[0], st[1:])
        except errors.ApplianceError as e:
            self._send(sess, m.err(e.code, e.message, _plain(e.details)))
            return True
        lk = (p[1].file, p[3])
        if self.locks.holder(lk) is not None:
            return False
        txn = self._begin(sess, req[1], req[2])
        self.locks.acquire(txn, lk, None)
        try:
            res = self._apply_stmt(txn, p)
        except errors.ApplianceError as e:
            self._cancel(txn, "statement_failed")
            self._send(sess, m.err(e.code, e.message, _plain(e.details)))
            return True
        txn.results = [res]
        if not any(c.after != c.before for c in txn.changes.values()):
            txn.state = "committed"
            self.active.pop(txn.number, None)
            self._release(txn)
            self._send(sess, m.ok({"txn": txn.number, "serial": None, "version": self.att.sb.sb_version,
                                   "results": txn.results}))
            return True
        txn.state = "committing"
        txn.durability = durability
        txn.commit_timeout = bound
        txn.wait = True
        sess.gen = _FAST
        self.commit_queue.append((sess, txn))
        return True

    def _commit(self, txn: Txn, wait: bool = True, durability="quorum", bound: float | None = None):
        txn.durability = durability
        txn.wait = wait
        txn.commit_timeout = bound
        effective = any(c.after != c.before for c in txn.changes.values())
        if not effective:
            txn.state = "committed"
            self.active.pop(txn.number, None)
            self._release(txn)
            sb = self.att.sb
            return {"txn": txn.number, "serial": None, "version": sb.sb_version}
        txn.state = "committing"
        result = yield _WAIT_COMMIT
        return result

    def _atomic(self, sess: Session, args: list):
        opts = args[3] if len(args) == 4 else {}
        if len(args) == 4:
            args = args[:3]
        if not isinstance(opts, dict):
            raise errors.ProtocolError("atomic: options must be a map")
        durability = self.sync.check_durability(opts.get("durability"))
        bound = m.check_commit_timeout(opts.get("commit_timeout"))
        wait = bool(opts.get("wait", True))
        _arity(args, 3, "atomic")
        if sess.txn is not None and sess.txn.state == "open":
            raise errors.TransactionStateError(
                f"atomic: transaction {sess.txn.number} is open on this connection; commit or cancel it first")
        steps = args[2]
        if not isinstance(steps, list):
            raise errors.ProtocolError("atomic: steps must be a list")
        txn = self._begin(sess, args[0], args[1])
        results = []
        try:
            for st in steps:
                if type(st) is not list or not st or type(st[0]) is not int or st[0] not in m.STEP_OPS:
                    raise errors.ProtocolError("atomic: each step must be [op, args...] with a statement op")
                results.append((yield from self._statement(txn, st[0], st[1:])))
        except BaseException:
            self._cancel(txn, "statement_failed")
            raise
        out = yield from self._commit(txn, wait, durability, bound)
        out["results"] = results
        return out

    def _load(self, sess: Session, args: list):
        """Insert records as one transaction. At most controller.max_load_records
        per request (the client library splits bigger loads); every
        _LOAD_CHUNK records the load lets the other sessions run (_YIELD).
        Nothing reaches shared memory before its commit, so the records stay
        invisible until then."""
        durability = self.sync.check_durability(args[2] if len(args) >= 3 else None)
        bound = m.check_commit_timeout(args[3] if len(args) == 4 else None)
        args = args[:2]
        _arity(args, 2, "load")
        if sess.txn is not None and sess.txn.state == "open":
            raise errors.TransactionStateError("load: a transaction is open on this connection")
        t = self.schema.table(args[0])
        recs = args[1]
        if not isinstance(recs, list):
            raise errors.ProtocolError("load: records must be a list")
        if len(recs) > self.max_load:
            raise errors.LimitError(
                f"load {t.name}: {len(recs)} records in one request; at most {self.max_load} "
                f"(controller.max_load_records in {self.cfg.path}): send them in several",
                table=t.name, records=len(recs), limit=self.max_load)
        txn = self._begin(sess, "load", {"table": t.name, "records": len(recs)})
        prepare, apply_stmt, locks, file = self._prepare, self._apply_stmt, self.locks, t.file
        args = [t.name, None]
        i = 0
        try:
            for i, rec in enumerate(recs):
                if i and not i % _LOAD_CHUNK:
                    yield _YIELD
                    if sess.closed or txn.state != "open":
                        raise errors.TransactionCancelledError(f"load {t.name}: transaction {txn.number} "
                                                               "was cancelled")
                args[1] = rec
                p = prepare(m.OP_INSERT, args)
                lk = (file, p[3])
                if locks.holder(lk) is None:      # the common case: take it, no coroutine
                    locks.acquire(txn, lk, None)
                else:
                    yield from self._lock(txn, file, p[3])
                apply_stmt(txn, p)
        except errors.ApplianceError as e:
            self._cancel(txn, "load_failed")
            e.details.setdefault("index", i)
            raise
        yield from self._commit(txn, True, durability, bound)
        return len(recs)

    def _txn_status(self, number, since_ns) -> str:
        """committed / not_committed / unknown (the log no longer covers it) /
        open / committing for a transaction of this controller's life."""
        if not isinstance(number, int) or not isinstance(since_ns, int):
            raise errors.WrongTypeError("txn_status: expects a transaction number and a start time (ns)")
        t = self.active.get(number)
        if t is not None:
            return t.state
        return changelog.txn_outcome(self.reader, number, since_ns)

    # ------------------------------------------------------------------ group commit

    def _commit_batch(self) -> None:
        queue, self.commit_queue = self.commit_queue, []
        wr = self.writer
        now = time.time_ns()
        outcomes = []
        last = 0
        wr.begin()
        try:
            for sess, txn in queue:
                try:
                    serial = self.committer.apply(txn, now)
                    outcomes.append((sess, txn, serial, None))
                    last = max(last, txn.number)
                except (errors.MemoryFullError, errors.RecordTooLargeError, errors.KeyTooLongError) as e:
                    outcomes.append((sess, txn, None, e))
                except errors.InternalError as e:
                    if e.code != "APL_ELOGFULL":
                        raise  # APL_EUNDO and the like: do not publish (below)
                    outcomes.append((sess, txn, None, e))
            version = wr.publish(now, last)
        except BaseException:
            self.log.critical("commit_batch_failed_exiting", exc_info=True)
            os._exit(70)  # the restarted controller rolls the unpublished batch back
        self.counters["batches"] += 1
        for sess, txn, serial, exc in outcomes:
            self.active.pop(txn.number, None)
            if exc is not None:
                exc = errors.error_for(exc.code, f"commit of transaction {txn.number}: "
                                       f"{exc.message.split(': ', 1)[-1]}; the transaction was cancelled",
                                       txn=txn.number)
                txn.state = "cancelled"
                self.counters["cancelled"] += 1
                self._release(txn)
                self._reply_commit(sess, txn, None, exc)
                continue
            txn.state = "committed"
            self.counters["committed"] += 1
            result = {"txn": txn.number, "serial": serial, "version": version}
            if self.sync.enabled:
                self.sync.committed(serial)
            d = txn.durability
            if self.sync.needs_wait(d):
                # backup first: the records stay locked until the secondaries confirm ([0104])
                w = Waiter(serial, txn, d, session=sess, result=result)
                self.sync.waiting.append(w)
                if not txn.wait:
                    w.replied = True
                    self._reply_commit(sess, txn, dict(result, backup="pending"), None)
                elif txn.commit_timeout is not None:
                    w.timer = self.add_timer(txn.commit_timeout, lambda w=w: self._backup_timed_out(w))
                continue
            self._release(txn)
            self._reply_commit(sess, txn, result, None)
        if self.sync.waiting:
            self._release_backed_up()
        for sess in list(self.watchers):
            self._wake_watcher(sess)
        wr.reclaim()

    def _reply_commit(self, sess: Session, txn: Txn, result, exc) -> None:
        if sess.gen is _FAST:
            sess.gen = None
            if exc is None:
                result["results"] = txn.results
                self._send(sess, m.ok(result))
            else:
                self._send(sess, m.err(exc.code, exc.message, _plain({**exc.details, "txn": txn.number})))
            if sess.inbox:
                self._ready.append((sess, None, 0, None, None))
        elif exc is None:
            self._resume(sess, result)
        else:
            self._resume(sess, exc=exc)

    def _release_backed_up(self) -> None:
        for w in self.sync.ready():
            if w.timer is not None:
                self.cancel_timer(w.timer)
            self._release(w.txn)
            if not w.replied:
                w.replied = True
                self._reply_commit(w.session, w.txn, w.result, None)

    def _backup_timed_out(self, w: Waiter) -> None:
        """A commit's bound (commit_timeout) passed before its backup was
        confirmed: answer BackupTimeoutError (committed here, the backup
        pending); it stays in sync.waiting, its records locked, until the
        confirmation or the policy releases it (_release_backed_up)."""
        w.timer = None
        if w.replied or w not in self.sync.waiting:
            return
        w.replied = True
        self._reply_commit(w.session, w.txn, None, self.sync.timed_out(w, w.txn.commit_timeout))

    # ------------------------------------------------------------------ replication

    def _published_serial(self) -> int:
        sb = self.att.sb
        return sb.sb_pub[sb.sb_version & 1].pb_serial

    def _applied_serial(self) -> tuple[int, int]:
        """(primary serial applied, primary instance) — on a secondary."""
        sb = self.att.sb
        pb = sb.sb_pub[sb.sb_version & 1]
        return pb.pb_source_serial, pb.pb_source_instance

    def _park(self, sess: Session, kind: str, value: int, timeout):
        """Long poll: wait until the watched serial passes `value`, or the timeout."""
        if not isinstance(timeout, (int, float)) or not 0 <= timeout <= 3600:
            raise errors.WrongTypeError("timeout must be a number of seconds (0..3600)")
        timer = self.add_timer(float(timeout), lambda: self._wake_watcher(sess, timed_out=True))
        sess.watch = (kind, value, timer)
        try:
            result = yield _WAIT_WATCH
        finally:
            self.cancel_timer(timer)
            sess.watch = None
            self.watchers.discard(sess)
        return result

    def _wake_watcher(self, sess: Session, timed_out: bool = False) -> None:
        if sess.watch is None or sess.closed:
            return
        kind, value, _ = sess.watch
        if kind == "serial":
            if timed_out or self._published_serial() > value or self.verify_new or self.resync_new:
                self.watchers.discard(sess)
                self._resume(sess, self._watch_reply())
        elif kind == "applied":
            applied = self._applied_serial()[0] if self.role == "secondary" else self._published_serial()
            if applied >= value:
                self.watchers.discard(sess)
                self._resume(sess, applied)
            elif timed_out:
                self.watchers.discard(sess)
                self._resume(sess, exc=errors.UnavailableError(
                    f"wait_applied: serial {value} not applied here yet (applied {applied})",
                    applied=applied))

    def _watch_reply(self) -> dict:
        b = changelog.bounds(self.reader)
        if self.verify_new:
            b["verify"], self.verify_new = self.verify_new, []
        if self.resync_new:
            b["resync"], self.resync_new = self.resync_new, []
        return b

    def _verify(self, sess: Session, timeout):
        """An operator's `appliance verify`: the agent compares every secondary
        block by block at one serial; the reply is its per-secondary result."""
        if self.role != "primary":
            raise errors.ProtocolError(f"verify: appliance {self.cfg.name!r} is not a primary")
        if not any(x.agent for x in self.sessions.values()):
            raise errors.UnavailableError(f"verify: the replication agent of {self.cfg.name!r} is not running")
        if not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
            raise errors.WrongTypeError("verify: timeout must be seconds (0..3600]")
        self._verify_seq += 1
        vid = self._verify_seq
        self.verify_new.append(vid)
        self.verify_waiting[vid] = sess
        for w in list(self.watchers):
            self._wake_watcher(w)
        timer = self.add_timer(float(timeout), lambda: self.verify_waiting.pop(vid, None) and self._resume(
            sess, exc=errors.UnavailableError(f"verify: no result within {timeout} s")))
        try:
            return (yield _WAIT_WATCH_VERIFY)
        finally:
            self.cancel_timer(timer)
            self.verify_waiting.pop(vid, None)

    def _wait_applied(self, sess: Session, serial, timeout):
        if type(serial) is not int:
            raise errors.WrongTypeError("wait_applied: the serial must be an int")
        applied = self._applied_serial()[0] if self.role == "secondary" else self._published_serial()
        if applied >= serial:
            return applied
        return (yield from self._park(sess, "applied", serial, timeout))

    def _agent_op(self, sess: Session, op: int, args: list):
        if op == m.OP_AGENT:
            _arity(args, 2, "agent")
            if sess.uid not in (0, os.geteuid()):
                raise errors.AccessDeniedError("agent: only the controller's own user or root may attach "
                                               "an agent", uid=sess.uid)
            if args[0] != self.role:
                raise errors.ProtocolError(f"agent: appliance {self.cfg.name!r} is {self.role}, not {args[0]!r}")
            if type(args[1]) is not int:
                raise errors.WrongTypeError("agent: expects (role, agent pid)")
            other = {x.agent_pid for x in self.sessions.values() if x.agent and not x.closed and x is not sess}
            if other and other != {args[1]}:
                raise errors.BusyError(f"agent: another agent (pid {other.pop()}) is attached to {self.cfg.name!r}")
            sess.agent = args[0]
            sess.agent_pid = args[1]   # an agent may hold several sessions (long poll + commands)
            self.log.info("agent_attached", pid=sess.pid, agent_pid=args[1])
            sb = self.att.sb
            applied, source = self._applied_serial()
            return {"name": self.cfg.name, "instance": sb.sb_instance, "epoch": sb.sb_epoch,
                    "role": self.role, "serial": self._published_serial(), "applied": applied,
                    "source": source, "copying": self.copied is not None,
                    "needs_copy": self.needs_copy is not None}
        if sess.agent is None:
            raise errors.AccessDeniedError(f"op {op}: only the appliance's replication agent may use it")
        if op == m.OP_WATCH:
            _arity(args, 2, "watch")
            if self._published_serial() > args[0] or self.verify_new or self.resync_new:
                return self._watch_reply()
            return (yield from self._park(sess, "serial", args[0], args[1]))
        if op == m.OP_REPL_STATE:
            _arity(args, 1, "repl_state")
            if not isinstance(args[0], dict):
                raise errors.WrongTypeError("repl_state: expects a map")
            if "verify" in args[0]:
                for vid, res in args[0]["verify"].items():
                    waiter = self.verify_waiting.pop(int(vid), None)
                    if waiter is not None:
                        self._resume(waiter, res)
                return None
            self.agent_state = args[0]
            if self.role == "primary":
                self.sync.update(args[0].get("secondaries", {}))
                self._release_backed_up()
            return None
        if op == m.OP_BLOCK_SUMS:
            _arity(args, 0, "block_sums")
            return self._block_sums()
        if self.role != "secondary":
            raise errors.ProtocolError(f"op {op} is for a secondary's agent")
        if op == m.OP_APPLY:
            _arity(args, 3, "apply")
            return self._apply(*args)
        if op == m.OP_COPY:
            _arity(args, 3, "copy")
            return self._copy(*args)
        raise errors.ProtocolError(f"unknown agent op {op}")

    def _block_sums(self) -> dict:
        pin = self.reader.pin()
        try:
            v = pin.version
            sb = self.att.sb
            pb = sb.sb_pub[v & 1]
            serial = (pb.pb_source_serial if self.role == "secondary" else pb.pb_serial) \
                if pb.pb_version == v else None
            return {"version": v, "serial": serial, "limit": self.reader.block_limit(),
                    "sums": self.reader.block_sums(v)}
        finally:
            pin.close()

    def _apply(self, source, after, blob) -> dict:
        """Apply whole transactions of the primary's entries (secondary)."""
        if type(source) is not int or type(after) is not int or not isinstance(blob, bytes):
            raise errors.WrongTypeError("apply: expects (source instance, after serial, entries)")
        applied, have = self._applied_serial()
        if self.needs_copy is not None:
            raise errors.ProtocolError(f"apply: this secondary refused its primary's stream earlier "
                                       f"({self.needs_copy}) and waits for a block copy", need_copy=True)
        if have and source != have and self.copied is None:
            raise errors.ProtocolError(f"apply: these changes come from primary instance {source}, "
                                       f"this secondary follows {have}: copy first", need_copy=True)
        if len(blob) >= 24:
            first = int.from_bytes(blob[16:24], "little")
            if first > applied + 1:
                raise errors.ProtocolError(f"apply: gap: serial {first} follows {applied}",
                                           gap=True, expected=applied + 1)
        self._apply_batch(lambda wr: wr.apply_entries(blob, applied, self.copied), source)
        return {"applied": self._applied_serial()[0], "consumed": self._last_consumed}

    def _apply_batch(self, fn, source: int) -> None:
        wr = self.writer
        wr.begin()
        try:
            consumed, last, _ = fn(wr)
            self._last_consumed = consumed
            if consumed:
                wr.set_source(last, source)
        except errors.ApplianceError as e:
            self._refuse_batch(e)
        wr.publish(time.time_ns(), 0)
        for sess in list(self.watchers):
            self._wake_watcher(sess)
        wr.reclaim()

    def _refuse_batch(self, e: errors.ApplianceError):
        """The primary's changes failed to apply part-way. The batch may hold
        part of a transaction, so it is rolled back in-process, never
        published (Writer.abort: the start-up recovery over the same memory,
        sound while readers read; see apl_batch_abort). Reads go on at the
        last published version; this secondary takes no more of the stream
        until a block copy begins. Raises the refusal for the agent, which
        asks its primary for that copy."""
        try:
            facts = self.writer.abort()
        except errors.ApplianceError:
            self.log.critical("apply_rollback_failed_exiting", error=str(e), exc_info=True)
            os._exit(70)  # the restarted controller rolls the unpublished batch back
        applied = self._applied_serial()[0]
        self.copied = None
        self.needs_copy = f"{e.code}: {e.message}"
        self.log.error("apply_refused", error=e.message, code=e.code, rolled_back=facts["rolled_back"],
                       applied=applied)
        raise errors.error_for(e.code, f"apply refused ({e.message}): nothing of it was applied, serial "
                                       f"{applied} stays the last applied; this secondary needs a block copy",
                               need_copy=True, applied=applied)

    def _copy(self, phase, source, payload) -> dict:
        """A block copy from the primary ([0079], [0127]): begin, blocks, end."""
        if type(source) is not int:
            raise errors.WrongTypeError("copy: the source instance must be an int")
        if phase == "begin":
            limit = payload.get("limit") if isinstance(payload, dict) else None
            if type(limit) is not int or not 0 <= limit <= self.att.sb.sb_max_blocks:
                raise errors.WrongTypeError("copy begin: needs the primary's block limit")
            serial = payload.get("serial")
            if type(serial) is not int:
                raise errors.WrongTypeError("copy begin: needs the stream serial it starts at")
            self.copied = bytearray((self.att.sb.sb_max_blocks + 7) // 8)
            self.needs_copy = None
            # the stream continues after `serial`: record it, so entries that follow are not a gap
            self._apply_batch(lambda wr: (1, serial, serial), source)
            self.log.info("copy_started", source=source, blocks=limit, serial=serial)
            return {"copied": 0}
        if self.copied is None:
            raise errors.ProtocolError("copy: no copy in progress", need_copy=True)
        if phase == "blocks":
            if not isinstance(payload, bytes):
                raise errors.WrongTypeError("copy blocks: expects block images (apl_block_images format)")
            copied = self.copied

            def run(wr):
                wr.apply_images(payload, copied)
                return 0, 0, 0
            applied, _ = self._applied_serial()
            self._apply_batch(run, source)
            return {"applied": applied}
        if phase == "end":
            serial = payload.get("serial") if isinstance(payload, dict) else None
            if type(serial) is not int:
                raise errors.WrongTypeError("copy end: needs the stream serial")
            copied = self.copied

            def finish(wr):
                wr.drop_uncopied(copied)   # numbers in use here that the primary does not have
                return 1, serial, serial
            self.copied = None
            self._apply_batch(finish, source)
            self.log.info("copy_finished", source=source, serial=serial)
            return {"applied": serial}
        raise errors.ProtocolError(f"copy: unknown phase {phase!r}")

    # ------------------------------------------------------------------ housekeeping

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
                self._cancel(txn, "idle_timeout")
                self.counters["idle_cancelled"] += 1
                self._throttled.warning("txn_idle_cancelled", None, txn=txn.number, pid=sess.pid,
                                       uid=sess.uid, idle_s=round(idle / 1e9, 1),
                                       total=self.counters["idle_cancelled"])

    def housekeeping(self) -> None:
        self.cancel_idle()
        if self.sync.waiting:
            self.sync.tick()
            self._release_backed_up()
        self.readers.sweep({x.pid: x.start for x in self.sessions.values() if x.start is not None})
        self.writer.reclaim()

    def status(self) -> dict:
        st = self.writer.stats()
        sb = self.att.sb
        seg_size = self.cfg.storage.segment_size
        per_seg = sb.sb_segment_slots
        segments = [{"name": d.name, "size": seg_size, "slots": per_seg,
                     "used": per_seg - st["segment_free"][i], "free": st["segment_free"][i]}
                     for i, d in enumerate(self.att.devices)]
        tables = []
        for name, t in self.schema.tables.items():
            tables.append({"name": name, "records": self.reader.count(t.file, sb.sb_version),
                           "primary_key": t.pk, "alternate_keys": list(t.alt)})
        pub = sb.sb_pub[sb.sb_version & 1]
        return {
            "name": self.cfg.name,
            "pid": os.getpid(),
            "instance": sb.sb_instance,
            "epoch": sb.sb_epoch,
            "version": sb.sb_version,
            "started_ns": self.started_ns,
            "uptime_s": (time.time_ns() - self.started_ns) / 1e9,
            "block_size": sb.sb_block_size,
            "memory": {"bytes_used": st["bytes_used"], "compressed": self.att.compressed,
                       "bytes_live": st["bytes_live"] if self.att.compressed else st["bytes_used"]},
            "segments": segments,
            "blocks": {"used": st["blocks_used"], "max": st["max_blocks"],
                       "slots_total": st["slots_total"], "slots_free": st["slots_free"],
                       "old_versions_pending": st["retire_pending"]},
            "tables": tables,
            "transactions": {"active": len(self.active), "committed": self.counters["committed"],
                             "cancelled": self.counters["cancelled"], "deadlocks": self.counters["deadlocks"],
                             "lock_timeouts": self.counters["lock_timeouts"], "last_txn": pub.pb_txn,
                             "next_txn": sb.sb_txn_next, "locks_held": len(self.locks),
                             "idle_cancelled": self.counters["idle_cancelled"],
                             "batches": self.counters["batches"]},
            "readers": self.readers.status(st, sb.sb_nreaders),
            "log": {"head": st["log_head"], "tail": st["log_tail"], "size": st["log_size"],
                    "serial": st["serial"]},
            "clients": {"connected": len(self.sessions), "refused": self.counters["clients_refused"],
                        "dropped": self.counters["clients_dropped"]},
            "recovery": self.recovery,
            "replication": self._replication_status(),
        }

    def _replication_status(self) -> dict | None:
        if self.role == "primary":
            st = self.sync.status()
            st["agent"] = {k: v for k, v in self.agent_state.items() if k != "secondaries"}
            st["agent"]["attached"] = any(x.agent for x in self.sessions.values())
            return st
        if self.role == "secondary":
            applied, source = self._applied_serial()
            return {"role": "secondary", "primary": self.cfg.replication.primary, "applied_serial": applied,
                    "source_instance": source, "copying": self.copied is not None,
                    "needs_copy": self.needs_copy,
                    "agent": dict(self.agent_state,
                                  attached=any(x.agent for x in self.sessions.values()))}
        return None


def _arity(args: list, n: int, what: str) -> None:
    if len(args) != n:
        raise errors.ProtocolError(f"{what}: expected {n} arguments, got {len(args)}")


def _plain(details: dict) -> dict:
    out = {}
    for k, v in details.items():
        out[k] = v if isinstance(v, (int, float, str, bytes, bool, type(None))) else repr(v)
    return out


def _failure_kind(e: BaseException) -> tuple:
    """What makes two failures "the same" for logging once: the exception's
    type and the line it was raised at."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = (tb.tb_frame.f_code.co_filename, tb.tb_lineno) if tb is not None else None
    return (type(e).__name__, where)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:200]}"


def check_socket_free(cfg: Config) -> None:
    """Refuse to take over controller.socket while a live controller listens
    there (the ControllerLock keeps two controllers of one appliance apart, so
    it is another appliance's, configured with the same path). A socket
    nobody listens on (left by a killed controller) is stale and may be
    replaced; a path that is not a socket is never removed."""
    path = cfg.socket_path
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise errors.BusyError(f"{cfg.path}: controller.socket {path} exists and is not a socket; "
                               "refusing to replace it", socket=str(path))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    other: dict = {}
    try:
        try:
            s.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return   # stale: nobody listens
        except OSError:
            pass     # connect timed out (a full backlog) or was denied: someone holds it
        else:
            other = _hello(s)
        who = f"appliance {other['name']!r}, controller pid {other.get('pid', '?')}" if other.get("name") \
            else "another appliance"
        raise errors.BusyError(
            f"{cfg.path}: controller.socket {path} is the socket of a running controller ({who}); "
            f"give each appliance its own socket", socket=str(path), other=str(other.get("name", "")))
    finally:
        s.close()


def _hello(s: socket.socket) -> dict:
    """The HELLO reply of whoever listens on `s` ({} if it says nothing usable)."""
    try:
        s.sendall(framing.encode([m.OP_HELLO, m.PROTOCOL_VERSION, "appliance-controller-start"]))
        reply = framing.FrameReader(s).read()
    except (OSError, EOFError, errors.ApplianceError):
        return {}
    if type(reply) is list and len(reply) == 2 and reply[0] == m.OK and isinstance(reply[1], dict):
        return reply[1]
    return {}


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
