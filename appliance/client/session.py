"""A client's connection to the controller (one per thread).

Blocking Unix-socket requests with pipelining (several requests in one send,
replies read in order). A broken connection is not fatal: the next request
reconnects by itself. While the controller is down, requests raise
:class:`~appliance.errors.UnavailableError`; a request whose reply was lost
because the controller stopped mid-way raises it too (or
:class:`~appliance.errors.CommitUnknownError` for a commit whose outcome the
caller must check).
"""
from __future__ import annotations

import os
import socket

from .. import errors
from ..wire import framing
from ..wire import messages as m

__all__ = ["Session"]

#: this process's pid, kept current across fork() without a syscall per request
_pid = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))
_encode = framing.encode


class Session:
    def __init__(self, path: str, appliance: str, *, name: str = "", timeout: float | None = None,
                 max_frame: int = framing.MAX_FRAME_DEFAULT) -> None:
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

    @property
    def connected(self) -> bool:
        return self.sock is not None and self.pid == _pid[0]

    # -- requests -------------------------------------------------------------------

    def _roundtrip(self, reqs: list, retry: bool = True) -> list:
        try:
            data = framing.encode_many(reqs)
        except (OverflowError, TypeError, ValueError) as exc:
            raise errors.WrongTypeError(f"a value cannot be sent: {exc}") from None
        self._send(data, retry)
        try:
            return [self.reader.read() for _ in reqs]
        except (EOFError, OSError, errors.ProtocolError) as exc:
            self.close()
            raise self._unavailable("connection lost before the reply: " + (str(exc) or type(exc).__name__),
                                    sent=True) from None

    def call_many(self, reqs: list, retry: bool = True) -> list:
        """Send requests pipelined; return their raw replies ([OK, x] / [ERR, ...]).
        retry=False: the requests belong to this connection (an open
        transaction's); never resend them on a new one."""
        if not self.connected:
            if not retry:
                raise self._unavailable("connection lost", sent=False)
            self.connect()
        return self._roundtrip(reqs, retry)

    def _send(self, data: bytes, retry: bool = True) -> None:
        """Send on the current connection; if it went stale (the controller
        restarted since), the bytes never reached anyone: reconnect once and
        send again — unless `retry` is false (a request that belongs to the
        old connection, like a statement of its open transaction). Raises
        UnavailableError(sent=False) when the request could not be sent."""
        try:
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
        try:
            data = _encode(req)
        except (OverflowError, TypeError, ValueError) as exc:
            raise errors.WrongTypeError(f"{what}: a value cannot be sent: {exc}") from None
        self._send(data)
        try:
            reply = self.reader.read()
        except (EOFError, OSError, errors.ProtocolError) as exc:
            self.close()
            raise self._unavailable("connection lost before the reply: " + (str(exc) or type(exc).__name__),
                                    sent=True) from None
        if type(reply) is list and len(reply) == 2 and reply[0] == 0:
            return reply[1]
        return _result(reply, what)


def _result(reply, what: str):
    if type(reply) is list and reply and reply[0] == m.OK:
        return reply[1]
    if type(reply) is list and len(reply) == 4 and reply[0] == m.ERR:
        raise errors.error_for(reply[1], reply[2], **(reply[3] or {}))
    raise errors.ProtocolError(f"{what}: malformed reply from the controller")


result = _result
