"""The controller's event loop: one thread, one epoll, many client sessions.

This module owns the sockets and the scheduling of requests; what a request
does is elsewhere (the op table, :mod:`.ops`, and the modules that register
in it). :class:`Loop` is the base of :class:`~.service.Controller`.

Concurrency model. Everything here runs on the controller's single
event-loop thread; nothing is shared with another thread. Concurrency between
clients comes from interleaving their requests: each request runs as a
generator (a coroutine) that yields when it must wait — for a record lock
(``WAIT_LOCK``), for the group commit (``WAIT_COMMIT``), for a serial to be
published or applied (``WAIT_WATCH``), for the agent's verify result
(``WAIT_VERIFY``), its answer to an operator's request (``WAIT_AGENT``),
for a recovery operation that holds new writes (``WAIT_HOLD``), for reading
work done in a worker thread (``WAIT_WORK``: the log history, see
:mod:`.history`) — and is resumed by the loop when the lock is granted, its
wait times out, or the batch is published. One session runs one request at
a time, in order.

Nothing recurses and no session monopolises the loop. A resumption (a lock
granted, a wait timed out, a batch published) is queued on ``_ready`` and run
by :meth:`Loop._run_ready` from the loop, never from inside another
session's request: requests of one session run in a loop (:meth:`pump`), at
most ``PUMP_BATCH`` per turn, and a long request (a bulk load) yields
``YIELD`` to let the others run; both continue on the next turn
(``_yielded``) after the other sessions were served. A session with
``INBOX_PAUSE`` requests queued is not read from until it catches up, so a
client that pipelines without reading replies holds a bounded backlog. An
exception that escapes a session's handling drops that client
(``session_failed``, logged once per kind of failure) and the loop goes on.

A loop iteration: poll; read every readable socket and run what arrived;
fire due timers (lock timeouts, housekeeping); if transactions are waiting to
commit, apply them all in one batch and publish it (group commit, see
:mod:`.commit`); then flush replies. Replies therefore leave only after the
batch that contains them is published.

Access. The listening socket is world-connectable (mode 0666): the gate is
the peer's credentials (SO_PEERCRED) checked against [access] at accept, with
a clear refusal sent back and one log line per user every few seconds.
"""
from __future__ import annotations

import errno
import heapq
from array import array
import os
import pwd
import select
import socket
import stat
import struct
import time
from collections import deque

from .. import errors
from .._os.logs import LogEvery, LogOnce
from ..config import Config
from ..wire import framing
from ..wire import messages as m

__all__ = ["Loop", "Session", "WAIT_LOCK", "WAIT_COMMIT", "WAIT_WATCH", "WAIT_VERIFY", "WAIT_AGENT", "WAIT_HOLD",
           "WAIT_WORK", "YIELD", "FAST", "check_socket_free", "plain"]

#: what a request coroutine yields while it waits (see the module docstring)
WAIT_LOCK = object()
WAIT_COMMIT = object()
WAIT_WATCH = object()      # a WATCH / WAIT_APPLIED long poll
WAIT_VERIFY = object()     # an operator's verify, resumed by the agent's result
WAIT_AGENT = object()      # an operator's request the agent answers (promote's drain: recovery.py)
WAIT_HOLD = object()       # a new write while a recovery operation holds writes (controller.hold)
WAIT_WORK = object()       # a request whose reading work runs in a worker thread (controller.history)
YIELD = object()           # a long request lets the other sessions run; it goes on next turn
FAST = object()            # sess.gen while a fast-path autocommit waits for its batch

_PEERCRED = struct.Struct("3i")
_READ_SIZE = 256 << 10
PUMP_BATCH = 256           # requests of one session per loop turn
INBOX_PAUSE = m.MAX_PIPELINED + 1   # queued requests at which a session is not read from
_ACCEPT_BACKOFF = (0.05, 1.0)   # seconds without accepting after EMFILE & co: first, longest
REPEAT_LOG_S = 10.0        # client_refused (per user), txn_idle_cancelled: one line per this many seconds


class Session:
    """One client connection (or one of the agent's)."""

    __slots__ = ("sock", "fd", "pid", "uid", "gid", "decoder", "out", "inbox", "txn", "gen",
                 "closed", "name", "want_write", "opened_ns", "agent", "watch", "agent_pid",
                 "waits", "paused", "mask", "idle_ns", "start", "fds", "wakeups")

    def __init__(self, sock: socket.socket, pid: int, uid: int, gid: int, max_frame: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.pid, self.uid, self.gid = pid, uid, gid
        self.decoder = framing.Decoder(max_frame)
        self.out = bytearray()
        self.inbox: deque = deque()
        self.txn = None            # its transaction (controller.txn.Txn), if any
        self.gen = None            # the request in progress, when it waits
        self.closed = False
        self.name = ""
        self.want_write = False
        self.opened_ns = time.monotonic_ns()
        self.agent: str | None = None   # the role the agent serves, once it registered (OP_AGENT)
        self.agent_pid = 0
        self.watch = None               # (kind, value, timer) while a WATCH/WAIT_APPLIED waits
        self.waits = 0                  # +1 each time the request in progress waits (see resume)
        self.paused = False             # not read from: INBOX_PAUSE requests queued
        self.mask = select.EPOLLIN      # what epoll watches for this socket
        self.idle_ns = self.opened_ns   # when its last request finished (controller.idle_timeout)
        self.start = None               # the peer's start time, from HELLO on (owns its reader slots)
        self.fds: list[int] = []        # descriptors to pass with the next bytes sent (SCM_RIGHTS)
        self.wakeups = None             # the agent's wake-ups (agent_ops.Wakeups), after OP_WAKEUPS


class Loop:
    """Sockets, timers and request scheduling. The subclass supplies what a
    request does: :meth:`handle` (a coroutine per request), and the hooks
    :meth:`fast_request`, :meth:`session_dropped` and :meth:`batch_work`
    (the group commit, run once per turn). Descriptors other than sockets
    (an agent's eventfd) are watched with :meth:`watch_fd`."""

    def __init__(self, cfg: Config, log) -> None:
        self.cfg = cfg
        self.log = log
        self.sessions: dict[int, Session] = {}
        self.dirty: set[Session] = set()
        self.timers: list = []
        self._timer_seq = 0
        self.counters = {"clients_refused": 0, "clients_dropped": 0}
        self.queued_peak = 0             # the most requests one session had waiting to start (status)
        self.requests = 0                # requests taken from the sessions' inboxes (status)
        self.max_frame = cfg.controller.max_frame
        self._set_access(cfg)
        self.listener: socket.socket | None = None
        self._ready: deque = deque()     # (session, request, waits, value, exc) to run this turn
        self._yielded: list = []         # the same, for the next turn (a long request's next part)
        self.bugs = LogOnce(log)         # session_failed / request_failed, once per kind
        self.throttled = LogEvery(log, REPEAT_LOG_S)
        self._accept_errors = LogOnce(log)
        self.accept_failures = 0         # accept() failures since the last success (status clients.accept_failures)
        self._accept_paused = False
        self._user_names: dict[int, str] = {}
        self.ep = select.epoll()
        self._rbuf = bytearray(_READ_SIZE)
        self._rview = memoryview(self._rbuf)
        self._fd_handlers: dict = {}     # fd -> what to call when it is readable (watch_fd)

    # ------------------------------------------------------------------ what the subclass supplies

    def handle(self, sess: Session, req: list):
        """The coroutine that carries out one request."""
        raise NotImplementedError

    def fast_request(self, sess: Session, req: list) -> bool:
        """Carry out `req` without a coroutine if it can; True when it did."""
        return False

    def session_dropped(self, sess: Session) -> None:
        """`sess` is gone: cancel what it had open."""

    def batch_work(self) -> bool:
        """Work the turn does once every session was served (the group commit);
        True when it ran."""
        return False

    def batch_pending(self) -> bool:
        return False

    # ------------------------------------------------------------------ setup

    def _set_access(self, cfg: Config) -> None:
        self._uids = cfg.allowed_uids() | {0, os.geteuid()}
        self._gids = cfg.allowed_gids()
        self._cred_cache: dict[tuple[int, int], bool] = {}

    def listen(self) -> None:
        path = self.cfg.socket_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise errors.AccessDeniedError(
                f"{self.cfg.path}: controller.socket: cannot create its directory {path.parent}: "
                f"{exc.strerror}; run as root or as the appliance user (appliance install), or set "
                "controller.socket to a path this user may write", socket=str(path), key="controller.socket",
                cause="permission") from None
        check_socket_free(self.cfg)   # again, just before taking the path over
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(str(path))
        except OSError as exc:
            s.close()
            raise errors.AccessDeniedError(f"{self.cfg.path}: controller.socket: cannot bind {path}: "
                                           f"{exc.strerror}", socket=str(path), key="controller.socket",
                                           cause="permission") from None
        os.chmod(path, 0o666)  # the gate is the SO_PEERCRED check, with a clear refusal
        s.listen(512)
        s.setblocking(False)
        self.listener = s
        self.ep.register(s.fileno(), select.EPOLLIN)

    def close(self) -> None:
        for sess in list(self.sessions.values()):
            self.drop(sess, "controller_stopping", log=False)
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

    # ------------------------------------------------------------------ the loop

    def add_timer(self, delay_s: float, fn) -> list:
        self._timer_seq += 1
        entry = [time.monotonic() + delay_s, self._timer_seq, fn]
        heapq.heappush(self.timers, entry)
        return entry

    @staticmethod
    def cancel_timer(entry) -> None:
        entry[2] = None

    def watch_fd(self, fd: int, fn) -> None:
        """Call `fn()` from the loop whenever `fd` is readable (level-triggered:
        fn reads what made it so)."""
        self._fd_handlers[fd] = fn
        self.ep.register(fd, select.EPOLLIN)

    def unwatch_fd(self, fd: int) -> None:
        if self._fd_handlers.pop(fd, None) is not None:
            try:
                self.ep.unregister(fd)
            except OSError:
                pass

    def run_once(self, max_wait: float = 1.0) -> None:
        wait = max_wait
        if self.timers:
            wait = max(0.0, min(wait, self.timers[0][0] - time.monotonic()))
        if self.dirty or self.batch_pending() or self._yielded or self._ready:
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
                fn = self._fd_handlers.get(fd)
                if fn is not None:
                    try:
                        fn()
                    except Exception as e:
                        self.bugs.error("fd_handler_failed", failure_kind(e), error=describe(e), exc_info=True)
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
                        self.bugs.error("timer_failed", failure_kind(e), error=describe(e), exc_info=True)
            self._run_ready()
        if self.batch_work():
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
                self.pump(sess)
            except Exception as e:
                self._session_failed(sess, e)

    def _session_failed(self, sess: Session, e: Exception) -> None:
        """An exception escaped a session's handling: drop that client, keep serving."""
        self.bugs.error("session_failed", failure_kind(e), error=describe(e), pid=sess.pid,
                        uid=sess.uid, exc_info=True)
        self.drop(sess, "internal_error", log=False)
        self.counters["clients_dropped"] += 1

    def pump_later(self, sess: Session) -> None:
        """Let `sess` start its next queued requests from the loop (a fast-path
        request that finished outside any coroutine)."""
        if sess.inbox:
            self._ready.append((sess, None, 0, None, None))

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
            if self.accept_failures:
                self.log.warning("accept_resumed", failures=self.accept_failures)
                self.accept_failures = 0
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
        self.accept_failures += 1
        first, longest = _ACCEPT_BACKOFF
        delay = min(longest, first * (1 << min(self.accept_failures - 1, 10)))
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
        send, and one client_refused line per user every REPEAT_LOG_S
        seconds (with the count since the last one), not one per connection."""
        self.counters["clients_refused"] += 1
        who = self._user_names.get(uid)
        if who is None:
            who = self._user_names[uid] = _user_name(uid)
        self.throttled.warning("client_refused", uid, pid=pid, uid=uid, user=who)
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
        # cost an mmap/munmap pair per request (above malloc's mmap threshold);
        # the rest of a large frame (a copy's blocks) straight into its own
        big = sess.decoder.buffer()
        try:
            n = sess.sock.recv_into(self._rbuf if big is None else big)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if not n:
            if sess.decoder.buffered:
                self.drop(sess, "hung_up_mid_frame")
            else:
                self.drop(sess, "disconnected", log=False)
            return
        try:
            msgs = sess.decoder.feed(self._rview[:n]) if big is None else sess.decoder.filled(n)
        except errors.ProtocolError as exc:
            self.drop(sess, "bad_frame", error=str(exc))
            return
        if msgs:
            sess.inbox.extend(msgs)
            if len(sess.inbox) > self.queued_peak:
                self.queued_peak = len(sess.inbox)
            self.pump(sess)
            if len(sess.inbox) >= INBOX_PAUSE and not sess.paused and not sess.closed:
                sess.paused = True
                self._watch(sess)

    def send(self, sess: Session, reply: list) -> None:
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
            if sess.fds:
                n = sess.sock.sendmsg([sess.out], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", sess.fds))])
                sess.fds = []   # they went with the first byte sent
            else:
                n = sess.sock.send(sess.out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self.drop(sess, "send_failed", log=False)
            return
        del sess.out[:n]
        if bool(sess.out) != sess.want_write:
            sess.want_write = bool(sess.out)
            self._watch(sess)
        if len(sess.out) > 4 * self.max_frame:
            self.drop(sess, "not_reading_replies")

    def _watch(self, sess: Session) -> None:
        """Tell epoll what this session waits for: input unless paused, output while replies wait."""
        mask = (0 if sess.paused else select.EPOLLIN) | (select.EPOLLOUT if sess.want_write else 0)
        if mask != sess.mask:
            sess.mask = mask
            self.ep.modify(sess.fd, mask)

    def drop(self, sess: Session, reason: str, log: bool = True, **kw) -> None:
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
        if sess.watch is not None:
            self.cancel_timer(sess.watch[2])
            sess.watch = None
        self.session_dropped(sess)
        sess.gen = None
        try:
            sess.sock.close()
        except OSError:
            pass

    # ------------------------------------------------------------------ requests

    def pump(self, sess: Session) -> None:
        """Start the session's queued requests, in order, until one waits; at
        most PUMP_BATCH this turn (the rest go on next turn)."""
        budget = PUMP_BATCH
        inbox = sess.inbox
        while inbox and sess.gen is None and not sess.closed:
            if not budget:
                self._yielded.append((sess, None, 0, None, None))
                return
            budget -= 1
            req = inbox.popleft()
            self.requests += 1
            if type(req) is not list or not req or type(req[0]) is not int:
                self.send(sess, m.err("APL_EPROTO", "request must be [op, args...]"))
                continue
            if self.fast_request(sess, req):
                continue
            self._step(sess, self.handle(sess, req), None, None)
        if sess.paused and len(inbox) < INBOX_PAUSE // 2 and not sess.closed:
            sess.paused = False
            self._watch(sess)

    def request_failed(self, sess: Session, e: Exception) -> None:
        """A bug in a request's handling: log it once per kind, answer, go on."""
        self.bugs.error("request_failed", failure_kind(e), error=describe(e), exc_info=True)
        self.send(sess, m.err("APL_EINVAL", f"internal error: {type(e).__name__}: {e}"))

    def _step(self, sess: Session, gen, value, exc) -> bool:
        """Advance a request coroutine until it finishes (True: the session may
        start its next request) or waits (False)."""
        try:
            cmd = gen.throw(exc) if exc is not None else gen.send(value)
        except StopIteration as stop:
            sess.gen = None
            sess.idle_ns = time.monotonic_ns()
            self.send(sess, m.ok(stop.value))
            return True
        except errors.ApplianceError as e:
            sess.gen = None
            sess.idle_ns = time.monotonic_ns()
            self.send(sess, m.err(e.code, e.message, plain(e.details)))
            return True
        except Exception as e:  # a bug: report it and keep serving
            sess.gen = None
            sess.idle_ns = time.monotonic_ns()
            self.request_aborted(sess)
            self.request_failed(sess, e)
            return True
        sess.gen = gen
        sess.waits += 1
        if cmd is YIELD:
            self._yielded.append((sess, gen, sess.waits, None, None))
        else:
            self.request_waits(sess, cmd)
        return False

    def request_waits(self, sess: Session, cmd) -> None:
        """A request of `sess` yielded `cmd` (one of the WAIT_* tokens)."""

    def request_aborted(self, sess: Session) -> None:
        """A request of `sess` ended in a bug: undo what it had open."""

    def resume(self, sess: Session, value=None, exc=None) -> None:
        """Queue the waiting request of `sess` to go on with `value` (or `exc`
        thrown in); it runs from the loop (_run_ready), not from the caller."""
        gen = sess.gen
        if gen is None or gen is FAST or sess.closed:
            return
        self._ready.append((sess, gen, sess.waits, value, exc))


def plain(details: dict) -> dict:
    """Error details as values msgpack carries (others as their repr)."""
    out = {}
    for k, v in details.items():
        out[k] = v if isinstance(v, (int, float, str, bytes, bool, type(None))) else repr(v)
    return out


def failure_kind(e: BaseException) -> tuple:
    """What makes two failures "the same" for logging once: the exception's
    type and the line it was raised at."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = (tb.tb_frame.f_code.co_filename, tb.tb_lineno) if tb is not None else None
    return (type(e).__name__, where)


def describe(e: BaseException) -> str:
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
