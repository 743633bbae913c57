"""How messages are framed on every stream socket of the appliance.

This module is the one place that defines it, for the Unix-socket protocol
between clients and the controller and for the TCP replication links alike.
It only encodes and decodes; whoever owns a socket owns its lifetime.

Frame format
============

::

    +----------------+---------+--------------------------+
    | L: uint32, LE  | version | payload: one msgpack     |
    | (4 bytes)      | 1 byte  | object (L - 1 bytes)     |
    +----------------+---------+--------------------------+
                     |<------------- body: L bytes ------>|

- ``L`` is the length of the body, not counting the 4 bytes of ``L``
  itself; ``1 <= L <= max_frame`` (:data:`MAX_FRAME_DEFAULT`, 64 MiB, unless
  the receiver chose another limit). ``L = 0`` is invalid: a body always
  holds the version byte.
- ``version`` is :data:`VERSION` (1). Any other value is refused; a future
  incompatible framing gets a new number.
- ``payload`` is exactly one msgpack object, packed with ``use_bin_type=True``
  (``str`` travels as msgpack str, ``bytes`` as bin) and unpacked with
  ``raw=False, strict_map_key=False`` (map keys may be ints, bytes ...).
  Tuples arrive as lists. Bytes after the object are invalid.

A receiver that meets an invalid frame raises :class:`FrameError` (an
:class:`~appliance.errors.ProtocolError`, code ``APL_EPROTO``) whose
``details["reason"]`` says which rule broke: ``too_large``, ``empty``,
``bad_version``, ``bad_payload``, ``trailing_data``, ``closed_mid_frame``;
``unusable`` for a :class:`Decoder` that already failed. The stream cannot be
resynchronised after that: close the connection.

Which piece to use
==================

- :func:`encode` / :func:`encode_many` build frames (thread-safe; each thread
  packs with a msgpack ``Packer`` of its own); :func:`send_frames` sends
  them with one ``sendall``; :func:`encode_parts` builds one frame as
  buffers for a vectored write, a large last ``bytes`` item uncopied.
- :class:`Decoder` turns bytes from a non-blocking socket into payloads.
- :class:`FrameReader` reads payloads from a blocking socket, buffering
  ahead, so pipelined replies cost one ``recv`` between them.
- :func:`recv_frame` reads exactly one frame from a blocking socket and
  never reads past its end (slower; do not mix it with a FrameReader on the
  same socket, which may already hold the next frames).

A Decoder or FrameReader belongs to one connection and one thread at a time.
"""
from __future__ import annotations

import struct
import threading
from collections import deque
from typing import Any, Iterable

import msgpack

from ..errors import ProtocolError

__all__ = [
    "VERSION",
    "MAX_FRAME_DEFAULT",
    "FrameError",
    "encode",
    "encode_many",
    "encode_parts",
    "send_frames",
    "Decoder",
    "FrameReader",
    "recv_frame",
]

VERSION = 1
MAX_FRAME_DEFAULT = 64 * 1024 * 1024

_PREFIX = struct.Struct("<I")
_HEADER = struct.Struct("<IB")  # length prefix and version byte, packed at once
_PREFIX_SIZE = _PREFIX.size
_LENGTH_MAX = 0xFFFFFFFF
_COPY_MAX = 64 << 10  # bodies up to this size are copied out to unpack (cheaper than a view)
_BIG_MIN = 256 << 10  # a frame this large, once started, is received into a buffer of its own
_SPARE_MAX = 16 << 20 # ... which is kept for the next one up to this size
_READ_CHUNK = 64 << 10

_unpackb = msgpack.unpackb
_unpack_prefix = _PREFIX.unpack_from
_local = threading.local()


class FrameError(ProtocolError):
    """Bytes on a stream socket that are not a valid frame (see the module doc).

    ``details["reason"]`` names the broken rule; the connection must be closed.
    """


# -- encoding ----------------------------------------------------------------


def _thread_pack():
    pack = _local.pack = msgpack.Packer(use_bin_type=True).pack
    return pack


def encode(obj: Any) -> bytes:
    """One whole frame (length prefix, version byte, msgpack payload) for ``obj``.

    Raises ``TypeError`` for an object msgpack cannot pack, FrameError for a
    payload too large for the 32-bit length prefix.
    """
    try:
        pack = _local.pack
    except AttributeError:
        pack = _thread_pack()
    body = pack(obj)
    try:
        return _HEADER.pack(len(body) + 1, VERSION) + body
    except struct.error:
        raise FrameError(
            f"payload of {len(body)} bytes does not fit a frame (limit {_LENGTH_MAX - 1})",
            reason="too_large",
            size=len(body) + 1,
            limit=_LENGTH_MAX,
        ) from None


_TAG32 = struct.Struct(">BI")   # a msgpack tag and its 32-bit big-endian length: bin 32 (0xc6), array 32 (0xdd)
_TAIL_MIN = 64 << 10            # a last item this large is sent from its own buffer, not copied


def encode_parts(obj: Any) -> list:
    """The frame of ``obj`` as buffers to send back to back (``writelines``,
    ``sendmsg``): the same bytes as :func:`encode`, except that a list whose
    last item is ``bytes`` of at least 64 KiB (a replication batch, a block
    copy) ends with that item itself, uncopied, after the frame up to its
    data (its msgpack header is the 5-byte bin 32 form, which every msgpack
    reader takes). Anything else: one buffer, :func:`encode`'s."""
    if type(obj) is not list or not obj or type(obj[-1]) is not bytes or len(obj[-1]) < _TAIL_MIN:
        return [encode(obj)]
    try:
        pack = _local.pack
    except AttributeError:
        pack = _thread_pack()
    tail = obj[-1]
    n = len(obj)
    array = bytes([0x90 | n]) if n < 16 else _TAG32.pack(0xdd, n)
    head = b"".join([array, *[pack(x) for x in obj[:-1]], _TAG32.pack(0xc6, len(tail))])
    size = len(head) + len(tail) + 1
    if size > _LENGTH_MAX:
        raise FrameError(f"payload of {size - 1} bytes does not fit a frame (limit {_LENGTH_MAX - 1})",
                         reason="too_large", size=size, limit=_LENGTH_MAX)
    return [_HEADER.pack(size, VERSION) + head, tail]


def encode_many(objs: Iterable[Any]) -> bytes:
    """The frames of ``objs`` back to back, ready to send at once (pipelining)."""
    return b"".join([encode(obj) for obj in objs])


def send_frames(sock, objs: Iterable[Any]) -> None:
    """Send each of ``objs`` as a frame, all with a single ``sendall``."""
    sock.sendall(encode_many(objs))


# -- decoding ----------------------------------------------------------------


def _frame_size(size: int, max_frame: int) -> int:
    """``size`` read from a length prefix, if a receiver limited to ``max_frame`` accepts it."""
    if 0 < size <= max_frame:
        return size
    if size:
        raise FrameError(
            f"frame of {size} bytes exceeds the limit of {max_frame}",
            reason="too_large",
            size=size,
            limit=max_frame,
        )
    raise FrameError("frame of 0 bytes (a frame holds at least its version byte)", reason="empty")


def _check_version(version: int) -> None:
    if version != VERSION:
        raise FrameError(
            f"frame version {version} is not the supported version {VERSION}",
            reason="bad_version",
            version=version,
        )


def _decode_body(buf: bytearray, start: int, stop: int) -> Any:
    """The payload of the frame body ``buf[start:stop]`` (version byte included)."""
    _check_version(buf[start])
    try:
        if stop - start <= _COPY_MAX:
            return _unpackb(buf[start + 1 : stop], raw=False, strict_map_key=False)
        with memoryview(buf) as view, view[start + 1 : stop] as payload:
            return _unpackb(payload, raw=False, strict_map_key=False)
    except msgpack.ExtraData as exc:
        raise FrameError(
            f"frame payload has {len(exc.extra)} bytes after its msgpack object",
            reason="trailing_data",
        ) from exc
    except Exception as exc:  # msgpack raises ValueError, TypeError (unhashable key) ...
        raise FrameError(
            f"frame payload is not one valid msgpack object: {str(exc) or type(exc).__name__}",
            reason="bad_payload",
        ) from exc


def _closed_error(mid_frame: bool) -> Exception:
    """What a reader raises when the peer closed the stream."""
    if mid_frame:
        return FrameError("connection closed mid-frame", reason="closed_mid_frame")
    return EOFError("connection closed by peer")


class Decoder:
    """Incremental decoder of a byte stream, for non-blocking sockets.

    ``feed(data)`` returns the payloads completed by ``data`` and keeps any
    partial frame. A length prefix over ``max_frame`` is refused as soon as
    its 4 bytes arrive, a wrong version byte as soon as it arrives. After a
    FrameError the decoder is unusable (every later feed raises FrameError);
    payloads decoded earlier in the failing feed are dropped with the
    connection they came on.

    A frame of 256 KiB or more whose start has arrived gets a buffer of its
    own, its exact size: :meth:`buffer` is the part of it still to come, so
    a reader can receive straight into it (``recv_into``, an asyncio
    ``BufferedProtocol``) and report with :meth:`filled`, instead of feeding
    copies; :meth:`feed` fills it too.
    """

    __slots__ = ("max_frame", "_buf", "_failure", "_big", "_got", "_spare")

    def __init__(self, max_frame: int = MAX_FRAME_DEFAULT) -> None:
        if not 0 < max_frame <= _LENGTH_MAX:
            raise ValueError(f"max_frame must be in 1..{_LENGTH_MAX}, not {max_frame}")
        self.max_frame = max_frame
        self._buf = bytearray()
        self._failure: str | None = None
        self._big: memoryview | None = None  # the body of a large frame under way
        self._spare: bytearray | None = None # the buffer it is in (kept for the next)
        self._got = 0                        # its bytes received

    @property
    def buffered(self) -> int:
        """Bytes held: the start of a frame not complete yet."""
        return len(self._buf) + (_PREFIX_SIZE + self._got if self._big is not None else 0)

    def buffer(self) -> memoryview | None:
        """Where the next bytes received should go while a large frame is
        under way (the rest of its body; pass what was written to
        :meth:`filled`), else None (receive anywhere and :meth:`feed` it)."""
        if self._big is None:
            return None
        return self._big[self._got:]

    def filled(self, n: int) -> list:
        """``n`` bytes were received into :meth:`buffer`: the payload, if
        that completed the frame (a list, as feed returns)."""
        self._usable()
        self._got += n
        try:
            return self._big_done()
        except FrameError as exc:
            self._fail(exc)
            raise

    def feed(self, data: bytes | bytearray | memoryview) -> list:
        """Append ``data``; return every payload now complete, oldest first."""
        self._usable()
        try:
            out = []
            if self._big is not None:
                with memoryview(data) as view:
                    k = min(len(self._big) - self._got, view.nbytes)
                    self._big[self._got:self._got + k] = view[:k]
                    self._got += k
                    out += self._big_done()
                    if self._big is not None or k == view.nbytes:
                        return out
                    data = bytes(view[k:])
            out += self._feed(data)
            return out
        except FrameError as exc:
            self._fail(exc)
            raise

    def _usable(self) -> None:
        if self._failure is not None:
            raise FrameError(
                f"decoder unusable after an earlier frame error ({self._failure})",
                reason="unusable",
            )

    def _fail(self, exc: FrameError) -> None:
        self._failure = exc.message
        self._buf = bytearray()
        self._big = None

    def _body_buffer(self, size: int) -> memoryview:
        """A buffer for a large frame's body: the same spare one each time
        (up to _SPARE_MAX bytes), so receiving into it maps no fresh pages
        (a new megabyte a frame cost a page fault a page, and malloc's
        heap trims and grows again between them)."""
        if size > _SPARE_MAX:
            return memoryview(bytearray(size))
        if self._spare is None or len(self._spare) < size:
            self._spare = bytearray(max(size, 2 * _BIG_MIN))
        return memoryview(self._spare)[:size]

    def _big_done(self) -> list:
        big = self._big
        if self._got and big[0] != VERSION:
            _check_version(big[0])   # raises
        if self._got < len(big):
            return []
        self._big, self._got = None, 0
        return [_decode_body(big, 0, len(big))]

    def _feed(self, data) -> list:
        buf = self._buf
        buf += data
        end = len(buf)
        pos = 0
        out = []
        max_frame = self.max_frame
        while end - pos >= _PREFIX_SIZE:
            (size,) = _unpack_prefix(buf, pos)
            if not 0 < size <= max_frame:
                _frame_size(size, max_frame)  # raises
            start = pos + _PREFIX_SIZE
            stop = start + size
            if stop > end:
                if end > start:
                    _check_version(buf[start])
                if size >= _BIG_MIN:       # the rest goes straight into a buffer of its own
                    self._big = self._body_buffer(size)
                    with memoryview(buf) as view:   # (released before buf is cut below)
                        self._big[:end - start] = view[start:end]
                    self._got = end - start
                    pos = end
                break
            pos = stop
            # Fast path for the common small valid frame; anything else
            # (large body, bad version, bad payload) goes to _decode_body,
            # which also says what is wrong.
            if buf[start] == VERSION and size <= _COPY_MAX:
                try:
                    out.append(_unpackb(buf[start + 1 : stop], raw=False, strict_map_key=False))
                    continue
                except Exception:
                    pass
            out.append(_decode_body(buf, start, stop))
        # Frames completed in this feed ended inside ``data``, so what is left
        # came with ``data`` too: dropping the consumed front keeps feeding
        # linear in the bytes fed, however many frames one feed holds.
        if pos:
            del buf[:pos]
        return out


class FrameReader:
    """Blocking reads of whole frames from a stream socket, buffering ahead.

    Each ``recv_into`` takes up to ``chunk`` bytes, so frames the peer
    pipelined come out of :meth:`read` without further system calls.
    A socket timeout propagates and leaves the reader usable.
    """

    __slots__ = ("sock", "_decoder", "_ready", "_view")

    def __init__(self, sock, max_frame: int = MAX_FRAME_DEFAULT, chunk: int = _READ_CHUNK) -> None:
        self.sock = sock
        self._decoder = Decoder(max_frame)
        self._ready: deque = deque()
        self._view = memoryview(bytearray(chunk))

    def read(self) -> Any:
        """The next payload.

        Raises EOFError if the peer closed the stream between frames,
        FrameError if it closed it mid-frame or sent an invalid frame.
        """
        ready = self._ready
        while not ready:
            view = self._view
            n = self.sock.recv_into(view)
            if not n:
                raise _closed_error(self._decoder.buffered > 0)
            ready.extend(self._decoder.feed(view[:n]))
        return ready.popleft()


def _recv_exactly(sock, buf: bytearray, at_frame_start: bool) -> None:
    view = memoryview(buf)
    got, size = 0, len(buf)
    while got < size:
        n = sock.recv_into(view[got:])
        if not n:
            raise _closed_error(got > 0 or not at_frame_start)
        got += n


def recv_frame(sock, max_frame: int = MAX_FRAME_DEFAULT) -> Any:
    """Read exactly one frame from a blocking socket and return its payload.

    Reads the 4-byte prefix, then the body into a buffer of its exact size,
    never past the frame's end. Raises EOFError if the peer closed the
    stream before the frame began, FrameError if it closed it mid-frame or
    the frame is invalid.
    """
    head = bytearray(_PREFIX_SIZE)
    _recv_exactly(sock, head, at_frame_start=True)
    size = _frame_size(_PREFIX.unpack(head)[0], max_frame)
    body = bytearray(size)
    _recv_exactly(sock, body, at_frame_start=False)
    return _decode_body(body, 0, size)
