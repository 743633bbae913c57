"""The replication agent's framed stream (appliance.replication.link.FrameStream)
on a real socket pair, in-process: reading pauses while decoded messages wait
and goes on once they are taken; a large frame arrives whole; drain waits for
a peer that does not read; a bad frame and a closed peer are told apart."""
from __future__ import annotations

import asyncio
import socket
import threading
from functools import partial

import pytest

from appliance import errors
from appliance.replication import link
from appliance.wire import framing


async def stream_on(sock: socket.socket) -> link.FrameStream:
    loop = asyncio.get_running_loop()
    return await link.open_stream(partial(loop.create_unix_connection, sock=sock))


def run(coro):
    return asyncio.run(coro)


def test_reading_pauses_while_messages_wait_and_every_one_arrives_in_order():
    """A peer sends 20,000 frames (large ones among them) faster than they are taken: the stream stops reading (the sender blocks on a full socket) and, as recv() takes them, reads on; every payload arrives, in order."""
    a, b = socket.socketpair()
    objs = [[i, b"x" * (300_000 if i % 5000 == 7 else 10)] for i in range(20_000)]

    def sender():
        for o in objs:
            b.sendall(b"".join(framing.encode_parts(o)))
        b.shutdown(socket.SHUT_WR)

    async def main():
        fs = await stream_on(a)
        t = threading.Thread(target=sender)
        t.start()
        await asyncio.sleep(0.3)          # nothing taken: the stream fills and pauses
        paused = fs._proto.paused_reading
        got = []
        while True:
            try:
                got.append(await fs.recv(timeout=10))
            except EOFError:
                break
        t.join()
        fs.close()
        return paused, got

    paused, got = run(main())
    b.close()
    assert paused
    assert got == objs


def test_drain_waits_for_a_peer_that_does_not_read():
    """Sending far more than the socket holds: drain() does not return until the peer reads; then it does and the peer has every frame."""
    a, b = socket.socketpair()
    big = [1, 2, 3, 4, b"y" * (4 << 20)]

    async def main():
        fs = await stream_on(a)
        for _ in range(4):
            fs.send(big)
        drain = asyncio.ensure_future(fs.drain())
        await asyncio.sleep(0.3)
        waited = not drain.done()
        loop = asyncio.get_running_loop()
        dec, got = framing.Decoder(link.MAX_FRAME), []
        b.setblocking(False)
        while len(got) < 4:
            data = await loop.sock_recv(b, 1 << 20)
            got += dec.feed(data)
        await asyncio.wait_for(drain, 10)
        fs.close()
        return waited, got

    waited, got = run(main())
    b.close()
    assert waited and got == [big] * 4


@pytest.mark.parametrize("tail, expected", [
    (b"", EOFError),                                   # closed between frames
    (framing.encode([1, 2])[:-1], errors.ProtocolError),  # closed mid-frame
    (b"\x05\x00\x00\x00\x09abcd", errors.ProtocolError),  # a wrong version byte
])
def test_the_end_of_a_stream_says_how_it_ended(tail, expected):
    """After the whole frames, recv() raises EOFError for a clean close, ProtocolError for a close mid-frame or a bad frame."""
    a, b = socket.socketpair()
    b.sendall(framing.encode(["first"]))

    async def main():
        fs = await stream_on(a)
        first = await fs.recv(timeout=5)
        b.sendall(tail)
        b.close()
        with pytest.raises(expected):
            await fs.recv(timeout=5)
        fs.close()
        return first

    assert run(main()) == ["first"]
