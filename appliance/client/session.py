"""A client's connection to the controller (one per thread).

Blocking Unix-socket requests with pipelining (several requests in one send,
replies read in order). A request may also go without waiting for its reply
(:meth:`Session.send_pipelined`, a pipelined transaction's statements): it
is queued and sent with the next request of the session (which then reads
its reply first and hands it to whoever queued it), or as soon as ``depth``
replies are outstanding (flow control: at most that many unread replies, so
neither side's buffers grow with the number of statements sent; then half
of them are read). A broken connection is not fatal: the
next request reconnects by itself. While the controller is down, requests raise
:class:`~appliance.errors.UnavailableError`; a request whose reply was lost
because the controller stopped mid-way raises it too (or
:class:`~appliance.errors.CommitUnknownError` for a commit whose outcome the
caller must check).
"""
from __future__ import annotations

import os
import socket
import threading
from collections import deque
from itertools import repeat

from .. import errors
from ..wire import framing
from ..wire import messages as m

__all__ = ["Session"]

#: this process's pid, kept current across fork() without a syscall per request
_pid = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))
_encode = framing.encode
_CANCEL = framing.encode([m.OP_CANCEL])
#: replies a session leaves unread by default (Session.depth; at most messages.MAX_PIPELINED)
PIPELINE_DEPTH = 1000


def check_depth(depth) -> int:
    """A pipeline depth (how many replies may stay unread): an int in 1..MAX_PIPELINED."""
    if type(depth) is int and 1 <= depth <= m.MAX_PIPELINED:
        return depth
    raise errors.WrongTypeError(f"pipeline_depth must be an int from 1 to {m.MAX_PIPELINED}, not {depth!r}")


class Session:
    def __init__(self, path: str, appliance: str, *, name: str = "", timeout: float | None = None,
                 max_frame: int = framing.MAX_FRAME_DEFAULT, depth: int = PIPELINE_DEPTH) -> None:
        self.path = path
        self.appliance = appliance
        self.name = name or f"pid{os.getpid()}"
        self.timeout = timeout
        self.max_frame = max_frame
        self.sock: socket.socket | None = None
        self.reader: framing.FrameReader | None = None
        self.hello: dict | None = None
        self.pid = os.getpid()
        self.generation = 0   # bumps on every (re)connect
        # Held from a request's send to its reply. Requests come from the
        # session's own thread; the lock is for Transaction.__del__, which may
        # run in any thread or inside a request (a garbage collection): it
        # cancels only if it gets the lock at once, else leaves cancel_pending
        # (a generation) for the next request to send first.
        self._io = threading.Lock()
        self.cancel_pending = 0
        # Replies of requests sent without waiting (send_pipelined), in the order
        # they will come: (sink, tag) each; the reply goes to sink.reply(tag, reply),
        # or sink.lost(tag) if the connection goes first. `queued`: the frames of
        # the last of them, not sent yet (every send puts them first).
        # Shared between the session's thread and Transaction.__del__ (any thread,
        # a garbage collection): both touch them only holding _io (__del__ takes
        # it without blocking or defers to cancel_pending), so sends and reads
        # never interleave and replies are matched to requests in order. Only
        # close() (Client.close from any thread) clears them without _io: the
        # connection is gone then, and every reply with it.
        self.outstanding: deque = deque()
        self.queued: list = []
        self.depth = depth
        self.peak = 0          # the most replies that were outstanding at once
        self.txn = None        # the link of the transaction open on this connection (client.api)

    # -- connection ------------------------------------------------------------

    def _unavailable(self, why: str, sent: bool = False) -> errors.UnavailableError:
        """`sent`: whether the request may have reached the controller."""
        return errors.UnavailableError(
            f"appliance {self.appliance!r} is not running or not reachable ({why}; socket {self.path})",
            appliance=self.appliance, socket=self.path, sent=sent)

    def connect(self) -> dict:
        self.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except FileNotFoundError:
            s.close()
            raise self._unavailable("no controller socket") from None
        except ConnectionRefusedError:
            s.close()
            raise self._unavailable("connection refused") from None
        except OSError as exc:
            s.close()
            raise self._unavailable(exc.strerror or str(exc)) from None
        self.sock = s
        self.reader = framing.FrameReader(s, max_frame=self.max_frame)
        self.pid = _pid[0]
        try:
            try:
                s.sendall(_encode([m.OP_HELLO, m.PROTOCOL_VERSION, self.name, _pid[0]]))
            except OSError:
                pass  # a refusal may already be waiting to be read: read it below
            try:
                hello = self.reader.read()
            except (EOFError, OSError, errors.ProtocolError) as exc:
                raise self._unavailable("connection lost: " + (str(exc) or type(exc).__name__)) from None
        except BaseException:
            self.close()
            raise
        self.hello = _result(hello, "connect")
        self.generation += 1
        return self.hello

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None
        self.reader = None
        self.queued = []       # never sent: they belonged to this connection
        if self.outstanding:   # their replies will never come: tell whoever waits for them
            lost, self.outstanding = self.outstanding, deque()
            for sink, tag in lost:
                sink.lost(tag)

    @property
    def connected(self) -> bool:
        return self.sock is not None and self.pid == _pid[0]

    # -- requests -------------------------------------------------------------------

    def _roundtrip(self, reqs: list, retry: bool = True) -> list:
        try:
            data = framing.encode_many(reqs)
        except (OverflowError, TypeError, ValueError) as exc:
            raise _unsendable(reqs, "", exc) from None
        with self._io:
            return self._exchange(data, len(reqs), retry)

    def _exchange(self, data: bytes, n: int, retry: bool) -> list:
        """Send `data` and read `n` replies (the caller holds self._io): first
        those still outstanding, which come before them."""
        self._send(data, retry)
        if self.outstanding:
            self._read_outstanding(0)
        try:
            return [self.reader.read() for _ in range(n)]
        except (EOFError, OSError, errors.ProtocolError) as exc:
            self.close()
            raise self._unavailable("connection lost before the reply: " + (str(exc) or type(exc).__name__),
                                    sent=True) from None

    def _read_outstanding(self, keep: int) -> None:
        """Read outstanding replies until `keep` are left, handing each to its
        sink (the caller holds self._io)."""
        if self.queued:
            self._send(b"", retry=False)     # their requests first
        out = self.outstanding
        try:
            while len(out) > keep:
                reply = self.reader.read()
                sink, tag = out.popleft()
                sink.reply(tag, reply)
        except (EOFError, OSError, errors.ProtocolError) as exc:
            self.close()     # the sinks of the replies still to come hear of it
            raise self._unavailable("connection lost before the reply: " + (str(exc) or type(exc).__name__),
                                    sent=True) from None

    def send_pipelined(self, reqs: list, sink, tags: list, now: bool = False) -> None:
        """Requests whose replies are not waited for: queued, and sent with the
        next request of this session (`now`: at once, reconnecting first if the
        connection went stale: the first statement of a transaction, with its
        BEGIN). The reply of ``reqs[i]`` goes to ``sink.reply(tags[i], reply)``
        when it is read (by the next request that waits, by :meth:`drain`, or
        here once ``depth`` replies are outstanding: then half of them are read
        first), or to ``sink.lost(tags[i])`` if the connection goes before.
        Nothing is queued when a value cannot be encoded (WrongTypeError) or
        the connection is gone (UnavailableError, sent=False)."""
        self._ready(now)
        try:
            data = framing.encode_many(reqs)
        except (OverflowError, TypeError, ValueError) as exc:
            raise _unsendable(reqs, "", exc) from None
        with self._io:
            out = self.outstanding
            if len(out) + len(reqs) > self.depth:
                self._read_outstanding(self.depth // 2)
            if now:
                self._send(data, True)
            else:
                self.queued.append(data)
            out.extend(zip(repeat(sink), tags))
            if len(out) > self.peak:
                self.peak = len(out)

    def drain(self, sink=None) -> None:
        """Send what is queued, then read the outstanding replies: all of them,
        or up to the first one that goes to `sink` (UnavailableError if the
        connection goes)."""
        if not self.outstanding:
            return
        with self._io:
            if self.sock is None:
                return
            out = self.outstanding
            if sink is None:
                self._read_outstanding(0)
                return
            for i, (s, _) in enumerate(out):
                if s is sink:
                    self._read_outstanding(len(out) - i - 1)
                    return

    def cancel_dropped(self, generation: int) -> None:
        """A transaction of this connection was dropped while open (Transaction.__del__):
        cancel it now if no request of this session is under way, else just
        before its next request (a garbage collection may run anywhere, even
        between one of our requests and its reply)."""
        if generation != self.generation or not self.connected:
            return
        if not self._io.acquire(blocking=False):
            self.cancel_pending = generation
            return
        try:
            self._exchange(_CANCEL, 1, retry=False)
        except errors.ApplianceError:
            pass   # gone: the controller cancels a transaction whose connection goes
        finally:
            self._io.release()

    def _cancel_pending(self) -> None:
        pending, self.cancel_pending = self.cancel_pending, 0
        if pending == self.generation and self.connected:
            try:
                self._roundtrip([[m.OP_CANCEL]], retry=False)
            except errors.UnavailableError:
                pass

    def call_many(self, reqs: list, retry: bool = True) -> list:
        """Send requests pipelined; return their raw replies ([OK, x] / [ERR, ...]).
        retry=False: the requests belong to this connection (an open
        transaction's); never resend them on a new one."""
        self._ready(retry)
        return self._roundtrip(reqs, retry)

    def request(self, req: list, retry: bool = False) -> list:
        """One request of an open transaction (never resent on a new
        connection unless `retry`); its raw reply, read after the replies
        still outstanding."""
        self._ready(retry)
        data = encode_sendable(req)
        with self._io:
            return self._exchange(data, 1, retry)[0]

    def request_numbered(self, req: list, sink) -> list | None:
        """A request answered twice (OP_ATOMIC of a pipelined transaction held
        until its commit: see Transaction): the first reply, the transaction's
        number, goes to ``sink.reply(None, reply)``; the second is returned. A
        first reply that is an error is the only one: it goes to the sink too
        and None is returned. Nothing of the transaction was sent before, so a
        stale connection is replaced and the request sent again on the new one."""
        self._ready(True)
        data = encode_sendable(req)
        with self._io:
            self._send(data, True)
            if self.outstanding:
                self._read_outstanding(0)
            try:
                first = self.reader.read()
                sink.reply(None, first)
                if not (type(first) is list and len(first) == 2 and first[0] == m.OK):
                    return None
                return self.reader.read()
            except (EOFError, OSError, errors.ProtocolError) as exc:
                self.close()
                raise self._unavailable("connection lost before the reply: " + (str(exc) or type(exc).__name__),
                                        sent=True) from None

    def _ready(self, retry: bool) -> None:
        """Before a request: connected (reconnecting only if `retry`), and a
        dropped transaction's cancel sent first."""
        if not self.connected:
            if not retry:
                raise self._unavailable("connection lost", sent=False)
            self.connect()
        if self.cancel_pending:
            self._cancel_pending()

    def _send(self, data: bytes, retry: bool = True) -> None:
        """Send on the current connection; if it went stale (the controller
        restarted since), the bytes never reached anyone: reconnect once and
        send again — unless `retry` is false (a request that belongs to the
        old connection, like a statement of its open transaction). Raises
        UnavailableError(sent=False) when the request could not be sent.
        The queued pipelined requests go first (never on a new connection)."""
        try:
            if self.queued:
                self.queued.append(data)
                first, self.queued = b"".join(self.queued), []
                self.sock.sendall(first)
            else:
                self.sock.sendall(data)
            return
        except OSError as exc:
            self.close()
            if not retry:
                raise self._unavailable(f"connection lost: {exc.strerror or exc}", sent=False) from None
        self.connect()
        try:
            self.sock.sendall(data)
        except OSError as exc:
            self.close()
            raise self._unavailable(f"send failed: {exc.strerror or exc}", sent=False) from None

    def call(self, req: list, what: str):
        """One request, one reply (the common case, kept lean)."""
        if self.sock is None or self.pid != _pid[0]:
            self.connect()
        if self.cancel_pending:
            self._cancel_pending()
        try:
            data = _encode(req)
        except (OverflowError, TypeError, ValueError) as exc:
            raise _unsendable(req, what, exc) from None
        with self._io:
            self._send(data)
            if self.outstanding:
                self._read_outstanding(0)
            try:
                reply = self.reader.read()
            except (EOFError, OSError, errors.ProtocolError) as exc:
                self.close()
                raise self._unavailable("connection lost before the reply: " + (str(exc) or type(exc).__name__),
                                        sent=True) from None
        if type(reply) is list and len(reply) == 2 and reply[0] == 0:
            return reply[1]
        return _result(reply, what)


_I64_MIN, _U64_MAX = -(1 << 63), (1 << 64) - 1
_SENDABLE = (str, bytes, bytearray, memoryview, float, bool, type(None))


def encode_sendable(req: list) -> bytes:
    """The frame of `req`, or the WrongTypeError for a value msgpack cannot
    encode, naming it (also to check a request kept to be sent later)."""
    try:
        return _encode(req)
    except (OverflowError, TypeError, ValueError) as exc:
        raise _unsendable(req, "", exc) from None


def _unsendable(req, what: str, exc: Exception) -> errors.WrongTypeError:
    """The error for a request msgpack cannot encode, naming the field (the
    dict keys on the way to the value) and what is wrong with the value."""
    found = _find_unsendable(req, ())
    prefix = f"{what}: " if what else ""
    if found is None:
        return errors.WrongTypeError(f"{prefix}a value cannot be sent: {exc}")
    path, value = found
    where = ".".join(map(str, path))
    where = f"field {where!r}: " if where else ""
    if isinstance(value, int):
        shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:37]}..."
        return errors.WrongTypeError(f"{prefix}{where}{shown} is out of range for an int (signed 64-bit)",
                                     field=".".join(map(str, path)) or None)
    return errors.WrongTypeError(f"{prefix}{where}a {type(value).__name__} cannot be sent "
                                 "(values are int, float, bool, str, bytes, None, lists and dicts)",
                                 field=".".join(map(str, path)) or None)


def _find_unsendable(v, path: tuple):
    """(dict-key path, value) of the first value msgpack cannot encode, or None."""
    if isinstance(v, int) and not isinstance(v, bool):
        return None if _I64_MIN <= v <= _U64_MAX else (path, v)
    if isinstance(v, _SENDABLE):
        return None
    if isinstance(v, (list, tuple)):
        for x in v:
            found = _find_unsendable(x, path)
            if found:
                return found
        return None
    if isinstance(v, dict):
        for k, x in v.items():
            found = _find_unsendable(k, path) or _find_unsendable(x, path + (k,))
            if found:
                return found
        return None
    return path, v


def _result(reply, what: str):
    if type(reply) is list and reply and reply[0] == m.OK:
        return reply[1]
    if type(reply) is list and len(reply) == 4 and reply[0] == m.ERR:
        raise errors.error_for(reply[1], reply[2], **(reply[3] or {}))
    raise errors.ProtocolError(f"{what}: malformed reply from the controller")


result = _result
