"""A TCP proxy for fault injection on a replication link, for tests.

It listens on a free loopback port and forwards every connection to a target
port, running an asyncio loop in a daemon thread. The primary's agent is
pointed at it instead of the secondary, and the test then breaks the link on
purpose:

- ``pause()`` / ``resume()``: stall the link. The proxy stops reading from
  both sides (bytes wait in the kernel and the stream buffers; nothing is
  lost) and forwards them in order after ``resume()``. ``pause("to_primary")``
  or ``pause("to_secondary")`` stalls one direction only (say, the ACKs).
- ``drop()``: abort every current connection (with a TCP reset); new
  connections are accepted as before.
- ``reorder_next(n)``: the next ``n`` ENTRIES frames from the primary are held
  back and then sent in reverse order (other frames pass at once), so the
  secondary sees serials out of order.
- ``pause_after(kind)``: forward the next frame of that type from the
  primary, then pause as ``pause()`` does (to hold a block copy mid-way;
  frames that came in the same read go along with it).
- ``corrupt_next()``: the next frame from the primary is sent with bytes of
  its msgpack payload flipped, so it is no valid frame payload any more.
- ``close()``: stop listening and abort everything.

Frames in the primary -> secondary direction are cut at their length prefix
and decoded with :class:`appliance.wire.framing.Decoder` to learn their type;
they are forwarded byte for byte unless a fault says otherwise. Bytes that
are not frames (or frames the decoder refuses) are passed on untouched from
then on, for that connection.

Counters in ``stats`` (connections, frames, reordered, corrupted,
paused_after, drops) let a test wait until a fault has really happened.
"""
from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections import Counter

from appliance.wire import framing
from appliance.wire import replication as rp

__all__ = ["ReplProxy"]

_PREFIX = struct.Struct("<I")
DIRECTIONS = ("to_secondary", "to_primary")   # the primary's agent is the connecting side


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close a connection at once, with a reset rather than a FIN."""
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()


class _Upstream:
    """Cuts the primary -> secondary byte stream into frames and applies the
    armed faults; returns what to forward now."""

    def __init__(self, proxy: "ReplProxy") -> None:
        self.proxy = proxy
        self.buf = bytearray()
        self.decoder = framing.Decoder(framing.MAX_FRAME_DEFAULT * 4)
        self.passthrough = False
        self.held: list[bytes] = []

    def feed(self, data: bytes) -> bytes:
        if self.passthrough:
            return data
        self.buf += data
        out = bytearray()
        while len(self.buf) >= _PREFIX.size:
            size = _PREFIX.unpack_from(self.buf)[0]
            end = _PREFIX.size + size
            if len(self.buf) < end:
                break
            frame = bytes(self.buf[:end])
            del self.buf[:end]
            out += self._frame(frame)
        return bytes(out)

    def _frame(self, frame: bytes) -> bytes:
        p = self.proxy
        try:
            (msg,) = self.decoder.feed(frame)
            kind = msg[0] if isinstance(msg, list) and msg else None
        except (framing.FrameError, ValueError):
            self.passthrough = True     # not ours to judge: pass the rest as it comes
            return frame + bytes(self.buf)
        with p.lock:
            p.stats["frames"] += 1
            if p._corrupt:
                p._corrupt -= 1
                p.stats["corrupted"] += 1
                head = _PREFIX.size + 1   # flip the first payload bytes: the array header turns into garbage
                n = min(8, len(frame) - head)
                return frame[:head] + bytes(b ^ 0xFF for b in frame[head:head + n]) + frame[head + n:]
            if p._reorder and kind == rp.ENTRIES:
                self.held.append(frame)
                if len(self.held) < p._reorder:
                    return b""
                p._reorder = 0
                p.stats["reordered"] += 1
                held, self.held = self.held, []
                return b"".join(reversed(held))
            if kind is not None and kind == p._pause_after:
                p._pause_after = None
                p.stats["paused_after"] += 1
                for ev in p._flow.values():   # on the proxy's loop: the pumps stop before their next read
                    ev.clear()
        return frame


class ReplProxy:
    """A fault-injecting TCP proxy from a free port on ``host`` to ``target_port``."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.target = (host, target_port)
        self.lock = threading.Lock()
        self.stats: Counter = Counter()
        self._reorder = 0
        self._corrupt = 0
        self._pause_after: int | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="repl-proxy", daemon=True)
        self._thread.start()
        self._flow = {d: self._call(self._make_event) for d in DIRECTIONS}
        self._server = self._call(asyncio.start_server, self._accept, host, 0)
        self.port: int = self._server.sockets[0].getsockname()[1]
        self.address = f"{host}:{self.port}"

    # -- running things on the proxy's loop --------------------------------------------

    def _call(self, fn, *args):
        async def run():
            out = fn(*args)
            return await out if asyncio.iscoroutine(out) else out
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    @staticmethod
    def _make_event() -> asyncio.Event:
        ev = asyncio.Event()
        ev.set()
        return ev

    # -- controls -------------------------------------------------------------------------

    def pause(self, direction: str = "both") -> None:
        """Stop forwarding ("both" ways, or "to_secondary" / "to_primary" only);
        what arrives meanwhile waits."""
        for d in DIRECTIONS if direction == "both" else (direction,):
            self._call(self._flow[d].clear)

    def resume(self) -> None:
        """Forward again both ways, starting with what waited."""
        for ev in self._flow.values():
            self._call(ev.set)

    def drop(self) -> int:
        """Abort every current connection; returns how many there were."""
        def abort_all() -> int:
            conns = list(self._conns)
            for pair in conns:
                for w in pair:
                    _abort(w)
            self._conns.clear()
            return len(conns)
        n = self._call(abort_all)
        with self.lock:
            self.stats["drops"] += 1
        return n

    def pause_after(self, kind: int) -> None:
        """Pause both ways right after forwarding the next frame of type `kind`
        (appliance.wire.replication: COPY_BLOCKS, ENTRIES ...) to the secondary."""
        with self.lock:
            self._pause_after = kind

    def reorder_next(self, n: int) -> None:
        """Send the next `n` ENTRIES frames from the primary in reverse order."""
        if n < 2:
            raise ValueError("reordering needs at least 2 frames")
        with self.lock:
            self._reorder = n

    def corrupt_next(self) -> None:
        """Garble the payload of the next frame from the primary."""
        with self.lock:
            self._corrupt = 1

    def close(self) -> None:
        """Stop listening, abort every connection, stop the thread."""
        if not self._loop.is_running():
            return
        self.resume()
        self.drop()

        async def shut():
            self._server.close()
            await self._server.wait_closed()
        try:
            self._call(shut)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> "ReplProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the forwarding ---------------------------------------------------------------------

    async def _accept(self, c_reader, c_writer) -> None:
        try:
            s_reader, s_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _abort(c_writer)
            return
        pair = (c_writer, s_writer)
        self._conns.add(pair)
        with self.lock:
            self.stats["connections"] += 1
        up = _Upstream(self)
        tasks = [asyncio.create_task(self._pump(c_reader, s_writer, self._flow["to_secondary"], up.feed)),
                 asyncio.create_task(self._pump(s_reader, c_writer, self._flow["to_primary"], None))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                if t.done() and not t.cancelled():
                    t.exception()          # a reset peer: retrieved, so asyncio does not complain
                t.cancel()
            self._conns.discard(pair)
            for w in pair:
                _abort(w)

    @staticmethod
    async def _pump(reader, writer, running: asyncio.Event, transform) -> None:
        while True:
            await running.wait()
            data = await reader.read(1 << 16)
            if not data:
                return
            await running.wait()       # a pause while reading: hold the bytes until resumed
            if transform is not None:
                data = transform(data)
            if data:
                writer.write(data)
                await writer.drain()
