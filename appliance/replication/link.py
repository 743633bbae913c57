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
import mmap
import os
import socket
import ssl
import time
from collections import deque
from functools import partial

from .. import errors
from ..config import Config, parse_address
from ..wire import framing
from ..wire import messages as m
from ..wire import replication as rp

__all__ = ["FrameStream", "open_stream", "tls_context", "connect_peer", "primary_handshake", "secondary_handshake",
           "rewind", "refusal", "ControlLink", "Wakeups", "AuthError"]

HANDSHAKE_TIMEOUT = 10.0
HANDSHAKE_MAX_FRAME = 64 << 10   # 256 files of the longest names in a HELLO take about 25 KiB
MAX_FRAME = 256 << 20


class AuthError(errors.AccessDeniedError):
    """The peer failed authentication or is not the one the config names."""


# Receiving: the transport reads straight into the stream's buffers (an
# asyncio BufferedProtocol): a large frame (a copy's blocks, a batch of log
# entries) into a bytearray of its own, the decoder's (framing.Decoder.buffer),
# anything else into a reused 64 KiB scratch that the decoder takes from. A
# StreamReader would copy each byte twice more (into its buffer, out of it).
# One event loop thread runs the protocol's callbacks and every coroutine of
# the stream, so nothing here is shared across threads.
READ_SCRATCH = 64 << 10
READ_PAUSE = 16      # decoded messages waiting: reading pauses (TCP pushes back) ...
READ_RESUME = 4      # ... until recv() has taken them down to this many


class _Protocol(asyncio.BufferedProtocol):
    def __init__(self, max_frame: int) -> None:
        self.dec = framing.Decoder(max_frame)
        self.ready: deque = deque()
        self.transport = None
        self.error: BaseException | None = None   # a bad frame, or what the connection was lost with
        self.eof = False
        self.paused_reading = False
        self.paused_writing = False
        self._scratch = memoryview(bytearray(READ_SCRATCH))
        self._into_big = False
        self._waiter: asyncio.Future | None = None   # recv() waiting for a message
        self._drained: asyncio.Future | None = None  # drain() waiting for the buffer to go

    def connection_made(self, transport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int):
        big = self.dec.buffer()
        self._into_big = big is not None
        return big if big is not None else self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        try:
            msgs = self.dec.filled(nbytes) if self._into_big else self.dec.feed(self._scratch[:nbytes])
        except errors.ProtocolError as exc:
            self.error = exc
            self.transport.close()
            self._wake()
            return
        if msgs:
            self.ready.extend(msgs)
            if len(self.ready) >= READ_PAUSE and not self.paused_reading:
                self.paused_reading = True
                self.transport.pause_reading()
            self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False   # close the transport

    def connection_lost(self, exc) -> None:
        self.eof = True
        if exc is not None and self.error is None:
            self.error = exc
        self._wake()
        self._release_drain(exc or ConnectionResetError("connection lost"))

    def pause_writing(self) -> None:
        self.paused_writing = True

    def resume_writing(self) -> None:
        self.paused_writing = False
        self._release_drain(None)

    def taken(self) -> None:
        """recv() took a message: reading goes on once few are left."""
        if self.paused_reading and len(self.ready) <= READ_RESUME and not self.eof:
            self.paused_reading = False
            self.transport.resume_reading()

    async def wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def drained(self) -> None:
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._drained)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _release_drain(self, exc) -> None:
        fut, self._drained = self._drained, None
        if fut is not None and not fut.done():
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)
                fut.exception()   # retrieved: nobody may be waiting any more


async def open_stream(connect, max_frame: int = MAX_FRAME) -> "FrameStream":
    """A FrameStream over the transport that ``connect(protocol_factory)``
    makes (loop.create_connection, create_unix_connection,
    connect_accepted_socket, with their arguments bound)."""
    proto = _Protocol(max_frame)
    transport, _ = await connect(lambda: proto)
    return FrameStream(transport, proto)


class FrameStream:
    """Framed msgpack messages over an asyncio transport (see open_stream)."""

    def __init__(self, transport, protocol: _Protocol) -> None:
        self.transport = transport
        self._proto = protocol
        self._dec = protocol.dec
        self._ready = protocol.ready
        self.waiting_since: float | None = None   # while recv() waits for data
        self._expired: str | None = None          # why expire_if_silent ended the stream
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # small ACKs and commits must not wait for Nagle / delayed ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def recv(self, timeout: float | None = None):
        """The next message. `timeout`: seconds to wait for it (a timer per
        call: for the handshake; a stream that waits for every message uses
        expire_if_silent from a periodic task instead)."""
        proto = self._proto
        while not self._ready:
            if proto.error is not None and not isinstance(proto.error, OSError):
                raise proto.error          # a bad frame (ProtocolError): the stream cannot go on
            if proto.eof:
                if self._expired:
                    raise TimeoutError(f"{self.peer}: {self._expired}")
                if isinstance(proto.error, OSError):
                    raise proto.error
                if self._dec.buffered:
                    raise errors.ProtocolError(f"{self.peer}: connection closed mid-frame")
                raise EOFError(f"{self.peer}: connection closed")
            self.waiting_since = time.monotonic()
            try:
                if timeout is None:
                    await proto.wait()
                else:
                    async with asyncio.timeout(timeout):   # a timer, not a task per read (wait_for)
                        await proto.wait()
            finally:
                self.waiting_since = None
        msg = self._ready.popleft()
        proto.taken()
        return msg

    def expire_if_silent(self, seconds: float) -> None:
        """End the stream if recv() has been waiting more than `seconds` for a
        message: it then raises TimeoutError (the peer went silent)."""
        since = self.waiting_since
        if since is not None and not self._expired and time.monotonic() - since > seconds:
            self._expired = f"nothing received for {seconds:g} s"
            self.close()

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
        self._proto.taken()

    def send(self, obj) -> None:
        # asyncio ignores a write to a closed transport, uvloop raises
        # RuntimeError: both become the ConnectionError every caller handles
        if self.transport.is_closing():
            raise ConnectionResetError(f"{self.peer}: connection closed")
        try:
            parts = framing.encode_parts(obj)   # a large batch goes from its own buffer (writev)
            if len(parts) == 1:
                self.transport.write(parts[0])
            else:
                self.transport.writelines(parts)
        except RuntimeError as exc:
            raise ConnectionResetError(f"{self.peer}: {exc}") from None

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water
        mark; ConnectionResetError once the connection is gone."""
        proto = self._proto
        if proto.eof and self.transport.is_closing():
            raise ConnectionResetError(f"{self.peer}: connection lost")
        if proto.paused_writing:
            await proto.drained()
        else:
            await asyncio.sleep(0)   # as StreamWriter.drain: let the loop run (and notice a close)

    def close(self) -> None:
        try:
            self.transport.close()
        except Exception:
            pass

    @property
    def peer_cert_name(self) -> str | None:
        obj = self.transport.get_extra_info("ssl_object")
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
    cfg.check_tls_files()   # a missing or unreadable file: ConfigError naming its key
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cfg.resolve(r.tls_cert)), str(cfg.resolve(r.tls_key)))
    except ssl.SSLError as exc:
        raise errors.ConfigError(f"{cfg.path}: replication.tls_cert, replication.tls_key: cannot load "
                                 f"{cfg.resolve(r.tls_cert)} with its key {cfg.resolve(r.tls_key)}: "
                                 f"{exc.reason or exc}; both must be PEM and the key must match the certificate",
                                 file=str(cfg.path), key="replication.tls_cert", problem=str(exc)) from None
    try:
        ctx.load_verify_locations(str(cfg.resolve(r.tls_ca)))
    except ssl.SSLError as exc:
        raise errors.ConfigError(f"{cfg.path}: replication.tls_ca: cannot load {cfg.resolve(r.tls_ca)}: "
                                 f"{exc.reason or exc}; it must hold PEM certificates",
                                 file=str(cfg.path), key="replication.tls_ca", problem=str(exc)) from None
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not server:
        ctx.check_hostname = False  # peers are checked by certificate name below (and the HMAC)
    return ctx


async def connect_peer(address: str, ctx: ssl.SSLContext | None, timeout: float = HANDSHAKE_TIMEOUT) -> FrameStream:
    host, port = parse_address(address)
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(open_stream(partial(loop.create_connection, host=host, port=port, ssl=ctx),
                                              HANDSHAKE_MAX_FRAME), timeout)


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
        _refuse(fs, epoch_seen, "APL_EGEOMETRY",
                "block size, tables or record format differ from this secondary's")
        raise errors.FormatError(f"{fs.peer}: the primary's block size, tables (fields and their order) or "
                                 f"record format differ from this secondary's configuration ({cfg.path})")
    return epoch, hello


class ControlLink:
    """The agent's connection to its own controller: pipelined requests with
    replies in order (asyncio). With ``wakeups``, the link also holds the
    primary's wake-ups (:class:`Wakeups`, from OP_WAKEUPS)."""

    def __init__(self, path: str, name: str) -> None:
        self.path = path
        self.name = name
        self.fs: FrameStream | None = None
        self._pending: deque = deque()
        self._reader_task: asyncio.Task | None = None
        self.info: dict | None = None
        self.wakeups: Wakeups | None = None

    async def connect(self, role: str, wakeups: bool = False) -> dict:
        """HELLO and OP_AGENT (and OP_WAKEUPS) in one round trip on the bare
        socket, whose reply carries the wake-up descriptors as ancillary data
        (an asyncio stream would drop them); then the stream takes the socket."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        fds: list[int] = []
        try:
            await loop.sock_connect(sock, self.path)
            reqs = [[m.OP_HELLO, m.PROTOCOL_VERSION, self.name], [m.OP_AGENT, role, os.getpid()]]
            if wakeups:
                reqs.append([m.OP_WAKEUPS])
            await loop.sock_sendall(sock, framing.encode_many(reqs))
            replies = await _replies_with_fds(sock, len(reqs), fds)
            results = [_result(r) for r in replies]
            self.info = results[1]
            if wakeups:
                given, fds = fds, []
                self.wakeups = Wakeups(given, results[2])   # owns them from here, on failure too
            fs = await open_stream(partial(loop.create_unix_connection, sock=sock))
        except BaseException:
            for fd in fds:
                os.close(fd)
            if self.wakeups is not None:
                self.wakeups.close()
                self.wakeups = None
            sock.close()
            raise
        self.fs = fs
        self._reader_task = loop.create_task(self._read_replies())
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
        if self.fs is None:
            raise errors.UnavailableError("controller link is down")
        try:
            self.fs.send(req)
        except ConnectionError as exc:
            raise errors.UnavailableError(f"controller link is down: {exc}") from None
        fut = asyncio.get_running_loop().create_future()
        self._pending.append(fut)
        return _result(await fut)

    def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self.fs is not None:
            self.fs.close()
            self.fs = None
        if self.wakeups is not None:
            self.wakeups.close()
            self.wakeups = None


def _result(reply):
    """The result of a controller's reply, or its error raised."""
    if type(reply) is list and len(reply) == 2 and reply[0] == m.OK:
        return reply[1]
    if type(reply) is list and len(reply) == 4 and reply[0] == m.ERR:
        raise errors.error_for(reply[1], reply[2], **(reply[3] or {}))
    raise errors.ProtocolError("malformed reply from the controller")


async def _replies_with_fds(sock: socket.socket, count: int, fds: list) -> list:
    """`count` replies read from the bare non-blocking `sock`, collecting in
    `fds` the descriptors that came with them (close-on-exec)."""
    loop = asyncio.get_running_loop()
    dec = framing.Decoder()
    out: list = []
    deadline = loop.time() + HANDSHAKE_TIMEOUT
    while len(out) < count:
        ready = loop.create_future()
        loop.add_reader(sock.fileno(), lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise errors.UnavailableError("the controller did not answer the agent's attach") from None
        finally:
            loop.remove_reader(sock.fileno())
        try:
            data, got, _, _ = socket.recv_fds(sock, 1 << 16, 3, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            continue
        fds.extend(got)
        if not data:
            raise errors.UnavailableError("the controller closed the agent's link while attaching")
        out.extend(dec.feed(data))
    return out


class Wakeups:
    """The agent's side of a primary's wake-ups (OP_WAKEUPS; the region and
    why no wake-up is lost: cext/apl_layout.h, struct apl_acks): the
    controller signals ``published`` after every publish; :meth:`post` stores
    a secondary's acknowledgement and signals ``acked`` when a waiting commit
    may be released by it."""

    def __init__(self, fds: list[int], info: dict) -> None:
        """Takes `fds` over: on failure they are closed here."""
        from .._native import ffi, lib
        self._ffi, self._lib, self.map, self._buf = ffi, lib, None, None
        try:
            if len(fds) != 3 or not isinstance(info, dict) or not isinstance(info.get("secondaries"), list):
                raise errors.ProtocolError(f"wakeups: expected 3 descriptors and the secondaries, got {len(fds)}")
            self.published, self.acked, memfd = fds
            self.map = mmap.mmap(memfd, ffi.sizeof("struct apl_acks"))
            self._buf = ffi.from_buffer(self.map)
            self.acks = ffi.cast("struct apl_acks *", self._buf)
            if (self.acks.ak_magic != lib.APL_MAGIC_ACKS or self.acks.ak_format != lib.apl_format_number()
                    or self.acks.ak_instance != info.get("instance")):
                raise errors.FormatError("wakeups: the controller's acknowledgement region is of another format")
        except BaseException:
            self._unmap()
            for fd in fds:
                os.close(fd)
            raise
        os.close(memfd)
        self.index = {name: i for i, name in enumerate(info["secondaries"])}

    def post(self, name: str, serial: int) -> None:
        i = self.index.get(name)
        if i is not None and self._lib.apl_acks_post(self.acks, i, serial):
            os.eventfd_write(self.acked, 1)

    def take_published(self) -> bool:
        """Reset the "published" signal; False when none was pending."""
        try:
            os.eventfd_read(self.published)
            return True
        except BlockingIOError:
            return False

    def _unmap(self) -> None:
        if self._buf is not None:
            self._ffi.release(self._buf)
            self._buf = None
        if self.map is not None:
            self.map.close()
            self.map = None

    def close(self) -> None:
        if self.map is None:
            return
        self._unmap()
        for fd in (self.published, self.acked):
            os.close(fd)
