"""Connections of the replication agent: to peers (TCP, optionally TLS) and to
its own controller (Unix socket), with the mutual authentication of
:mod:`appliance.wire.replication`.

A peer that is unknown, misconfigured or fails authentication is refused
with an ERROR message and a log line on both sides, and nothing changes.
Garbage, truncated or oversized frames raise ProtocolError: the caller drops
the connection, never the process. Until the peer has authenticated, a
frame may hold at most HANDSHAKE_MAX_FRAME bytes (a HELLO with the largest
file list fits), so an unknown peer makes an agent hold no more than that
and the stream's read buffer; MAX_FRAME applies from then on.
"""
from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections import deque

from .. import errors
from ..config import Config, parse_address
from ..wire import framing
from ..wire import messages as m
from ..wire import replication as rp

__all__ = ["FrameStream", "tls_context", "connect_peer", "primary_handshake", "secondary_handshake",
           "rewind", "refusal", "ControlLink", "AuthError"]

HANDSHAKE_TIMEOUT = 10.0
HANDSHAKE_MAX_FRAME = 64 << 10   # 256 files of the longest names in a HELLO take about 25 KiB
MAX_FRAME = 256 << 20


class AuthError(errors.AccessDeniedError):
    """The peer failed authentication or is not the one the config names."""


class FrameStream:
    """Framed msgpack messages over an asyncio stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 max_frame: int = MAX_FRAME) -> None:
        self.reader = reader
        self.writer = writer
        self._dec = framing.Decoder(max_frame)
        self._ready: deque = deque()
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # small ACKs and commits must not wait for Nagle / delayed ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def recv(self, timeout: float | None = None):
        while not self._ready:
            if timeout is None:
                data = await self.reader.read(1 << 20)
            else:
                data = await asyncio.wait_for(self.reader.read(1 << 20), timeout)
            if not data:
                if self._dec.buffered:
                    raise errors.ProtocolError(f"{self.peer}: connection closed mid-frame")
                raise EOFError(f"{self.peer}: connection closed")
            self._ready.extend(self._dec.feed(data))
        return self._ready.popleft()

    def allow_frames(self, max_frame: int) -> None:
        """Change the frame limit: HANDSHAKE_MAX_FRAME until the peer has
        authenticated, MAX_FRAME after."""
        self._dec.max_frame = max_frame

    def peek(self):
        """The next message if it has already arrived (None otherwise): lets a
        receiver take several queued messages in one step."""
        return self._ready[0] if self._ready else None

    def pop(self) -> None:
        """Consume the message peek() returned."""
        self._ready.popleft()

    def send(self, obj) -> None:
        # asyncio ignores a write to a closed transport, uvloop raises
        # RuntimeError: both become the ConnectionError every caller handles
        if self.writer.is_closing():
            raise ConnectionResetError(f"{self.peer}: connection closed")
        try:
            self.writer.write(framing.encode(obj))
        except RuntimeError as exc:
            raise ConnectionResetError(f"{self.peer}: {exc}") from None

    async def drain(self) -> None:
        await self.writer.drain()

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:
            pass

    @property
    def peer_cert_name(self) -> str | None:
        obj = self.writer.get_extra_info("ssl_object")
        if obj is None:
            return None
        cert = obj.getpeercert() or {}
        for rdn in cert.get("subject", ()):
            for k, v in rdn:
                if k == "commonName":
                    return v
        return None


def tls_context(cfg: Config, server: bool) -> ssl.SSLContext | None:
    """Mutual TLS from the configured certificate files, or None."""
    r = cfg.replication
    if r is None or r.tls_cert is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cfg.resolve(r.tls_cert)), str(cfg.resolve(r.tls_key)))
    ctx.load_verify_locations(str(cfg.resolve(r.tls_ca)))
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not server:
        ctx.check_hostname = False  # peers are checked by certificate name below (and the HMAC)
    return ctx


async def connect_peer(address: str, ctx: ssl.SSLContext | None, timeout: float = HANDSHAKE_TIMEOUT) -> FrameStream:
    host, port = parse_address(address)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx), timeout)
    return FrameStream(reader, writer, max_frame=HANDSHAKE_MAX_FRAME)


def _refuse(fs: FrameStream, sender_epoch: int, code: str, message: str, **extra) -> None:
    try:
        fs.send(rp.message(rp.ERROR, sender_epoch, 0, {"code": code, "message": message, **extra}))
    except Exception:
        pass


def _check_peer(fs: FrameStream, epoch: int, name, expected, role: str, ours: str) -> str:
    """The peer is a configured one (`expected`: a name, or a tuple of the
    names accepted): by the name it gives and, over TLS, by its
    certificate's common name. Else refuse (ERROR to it) and raise."""
    names = (expected,) if isinstance(expected, str) else tuple(expected)
    shown = " or ".join(repr(n) for n in names)
    if name not in names:
        _refuse(fs, epoch, "APL_EACCESS", f"{ours} {shown}")
        raise AuthError(f"{fs.peer} is {name!r}, not the configured {role} {shown}")
    cert = fs.peer_cert_name
    if cert is not None and cert != name:
        _refuse(fs, epoch, "APL_EACCESS", "certificate name does not match")
        raise AuthError(f"{fs.peer}: its certificate is for {cert!r}, not {name!r}")
    return name


def refusal(body: dict, peer: str, what: str = "refused the link") -> errors.ApplianceError:
    """The error an ERROR message stands for; a stale-epoch refusal carries
    the epoch the peer follows and its primary, when it says them."""
    extra = {k: body[k] for k in ("epoch", "primary") if type(body.get(k)) in (int, str)}
    return errors.error_for(str(body.get("code", "APL_EPROTO")), f"{peer} {what}: {body.get('message', '?')}",
                            **extra)


async def _expect(fs: FrameStream, kind: int, what: str, timeout: float = HANDSHAKE_TIMEOUT):
    while True:
        k, epoch, serial, ts, body = rp.parse(await fs.recv(timeout))
        if k == rp.ERROR and isinstance(body, dict):
            raise refusal(body, fs.peer)
        if k == rp.HEARTBEAT and kind != rp.HEARTBEAT:
            continue     # a peer's heartbeats go on while it works on what was asked
        if k != kind or not isinstance(body, dict):
            raise errors.ProtocolError(f"{fs.peer}: expected {what}, got message type {k}")
        return epoch, serial, body


def files_of(att) -> list:
    sb = att.sb
    from .._native import ffi
    files = ffi.cast("struct apl_file *", att.meta.ptr + sb.sb_files_off)
    return [[ffi.string(files[i].fl_name).decode(), files[i].fl_root, files[i].fl_meta]
            for i in range(sb.sb_nfiles)]


async def rewind(fs: FrameStream, epoch: int, serial: int, timeout: float = 600.0) -> dict:
    """The primary's side of a rewind after a failover: REWIND to the fork
    serial, then the secondary's REWOUND (ok, applied, transactions, blocks)."""
    fs.send(rp.message(rp.REWIND, epoch, serial, {"serial": serial}))
    await fs.drain()
    _, _, body = await _expect(fs, rp.REWOUND, "REWOUND", timeout)
    return body


async def primary_handshake(fs: FrameStream, cfg: Config, secondary, *, instance: int, epoch: int,
                            serial: int, files: list, secret: bytes | None) -> dict:
    """The primary's side; returns the secondary's START body."""
    n_p = rp.nonce()
    fs.send(rp.message(rp.HELLO, epoch, serial, {
        "version": rp.PROTOCOL_VERSION, "name": cfg.name, "instance": instance,
        "fingerprint": cfg.replication_fingerprint(), "files": files, "nonce": n_p, "mode": secondary.mode}))
    await fs.drain()
    _, _, ch = await _expect(fs, rp.CHALLENGE, "CHALLENGE")
    _check_peer(fs, epoch, ch.get("name"), secondary.name, "secondary", "this primary expects")
    mac = b""
    if secret is not None:
        n_s = ch.get("nonce")
        if not isinstance(n_s, bytes) or len(n_s) != 32 or not rp.mac_ok(
                rp.mac(secret, "secondary", n_p, n_s, cfg.name, secondary.name), ch.get("mac")):
            _refuse(fs, epoch, "APL_EACCESS", "authentication failed")
            raise AuthError(f"{fs.peer}: secondary {secondary.name!r} failed authentication (shared secret)")
        mac = rp.mac(secret, "primary", n_s, n_p, cfg.name, secondary.name)
    fs.allow_frames(MAX_FRAME)   # the secondary has proved who it is
    fs.send(rp.message(rp.AUTH, epoch, serial, {"mac": mac}))
    await fs.drain()
    _, _, start = await _expect(fs, rp.START, "START")
    return start


async def secondary_handshake(fs: FrameStream, cfg: Config, *, files: list, secret: bytes | None,
                              epoch_seen: int, current: str | None = None) -> tuple[int, dict]:
    """The secondary's side; returns (the primary's epoch, its HELLO body).
    Refuses (ERROR, then AuthError/StaleEpochError/FormatError) anything else.
    `current`: the primary it follows at `epoch_seen`, named in a stale
    primary's refusal (the deposed primary fences itself on it)."""
    rc = cfg.replication
    epoch, serial, hello = await _expect(fs, rp.HELLO, "HELLO")
    if hello.get("version") != rp.PROTOCOL_VERSION:
        _refuse(fs, epoch_seen, "APL_EPROTO", f"protocol version {hello.get('version')!r} is not supported")
        raise errors.ProtocolError(f"{fs.peer}: protocol version {hello.get('version')!r}")
    primary = _check_peer(fs, epoch_seen, hello.get("name"), rc.primaries, "primary", "this secondary follows")
    n_p = hello.get("nonce")
    if not isinstance(n_p, bytes) or len(n_p) != 32:
        _refuse(fs, epoch_seen, "APL_EPROTO", "bad nonce")
        raise errors.ProtocolError(f"{fs.peer}: bad nonce")
    n_s = rp.nonce()
    mac = rp.mac(secret, "secondary", n_p, n_s, primary, cfg.name) if secret is not None else b""
    fs.send(rp.message(rp.CHALLENGE, epoch_seen, 0, {"name": cfg.name, "nonce": n_s, "mac": mac}))
    await fs.drain()
    _, _, auth = await _expect(fs, rp.AUTH, "AUTH")
    if secret is not None and not rp.mac_ok(rp.mac(secret, "primary", n_s, n_p, primary, cfg.name),
                                            auth.get("mac")):
        _refuse(fs, epoch_seen, "APL_EACCESS", "authentication failed")
        raise AuthError(f"{fs.peer}: primary {primary!r} failed authentication (shared secret)")
    fs.allow_frames(MAX_FRAME)
    # only now, authenticated, do the peer's claims count
    if epoch < epoch_seen:
        who = f" (primary {current!r})" if current and current != primary else ""
        _refuse(fs, epoch_seen, "APL_ESTALE", f"epoch {epoch} is older than {epoch_seen}{who}, already seen",
                epoch=epoch_seen, **({"primary": current} if current else {}))
        raise errors.StaleEpochError(f"{fs.peer}: primary {primary!r} at epoch {epoch} < {epoch_seen}: a deposed "
                                     "primary")
    if hello.get("fingerprint") != cfg.replication_fingerprint() or hello.get("files") != files:
        _refuse(fs, epoch_seen, "APL_EGEOMETRY", "block size or tables differ from this secondary's")
        raise errors.FormatError(f"{fs.peer}: the primary's block size or tables differ from this "
                                 f"secondary's configuration ({cfg.path})")
    return epoch, hello


class ControlLink:
    """The agent's connection to its own controller: pipelined requests with
    replies in order (asyncio)."""

    def __init__(self, path: str, name: str) -> None:
        self.path = path
        self.name = name
        self.fs: FrameStream | None = None
        self._pending: deque = deque()
        self._reader_task: asyncio.Task | None = None
        self.info: dict | None = None

    async def connect(self, role: str) -> dict:
        reader, writer = await asyncio.open_unix_connection(self.path)
        self.fs = FrameStream(reader, writer)
        self._reader_task = asyncio.get_running_loop().create_task(self._read_replies())
        await self.call([m.OP_HELLO, m.PROTOCOL_VERSION, self.name])
        self.info = await self.call([m.OP_AGENT, role, os.getpid()])
        return self.info

    async def _read_replies(self) -> None:
        try:
            while True:
                reply = await self.fs.recv()
                fut = self._pending.popleft()
                if not fut.done():
                    fut.set_result(reply)
        except BaseException as exc:
            err = errors.UnavailableError(f"controller link lost: {exc or type(exc).__name__}")
            while self._pending:
                fut = self._pending.popleft()
                if not fut.done():
                    fut.set_exception(err)
            if self.fs is not None:
                self.fs.close()
            self.fs = None

    @property
    def connected(self) -> bool:
        return self.fs is not None

    async def call(self, req: list):
        self.notify(req)
        fut = asyncio.get_running_loop().create_future()
        self._pending.append(fut)
        reply = await fut
        if type(reply) is list and len(reply) == 2 and reply[0] == m.OK:
            return reply[1]
        if type(reply) is list and len(reply) == 4 and reply[0] == m.ERR:
            raise errors.error_for(reply[1], reply[2], **(reply[3] or {}))
        raise errors.ProtocolError("malformed reply from the controller")

    def notify(self, req: list) -> None:
        """Send a request without waiting: call() awaits its reply; a one-way
        request (messages.ONE_WAY) gets none."""
        if self.fs is None:
            raise errors.UnavailableError("controller link is down")
        try:
            self.fs.send(req)
        except ConnectionError as exc:
            raise errors.UnavailableError(f"controller link is down: {exc}") from None

    def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self.fs is not None:
            self.fs.close()
            self.fs = None
