"""Tests of appliance.wire.framing: frame layout, incremental decoding, blocking reads."""
from __future__ import annotations

import contextlib
import socket
import struct
import threading

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.errors import ProtocolError
from appliance.wire import framing
from appliance.wire.framing import (
    MAX_FRAME_DEFAULT,
    VERSION,
    Decoder,
    FrameError,
    FrameReader,
    encode,
    encode_many,
    recv_frame,
    send_frames,
)

PAYLOADS = [
    None,
    True,
    False,
    0,
    -1,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    1.5,
    -0.0,
    1e300,
    "",
    "héllo wörld \u2603",
    b"",
    b"\x00\xff" * 100,
    [],
    {},
    [1, "a", b"b", None, 2.5],
    {"op": "put", "table": "t", "rows": [{"k": 1, "v": b"x"}, {"k": 2, "v": None}]},
    {1: "int key", b"raw": [True, False], "n": {"deep": [[[[{"x": -5}]]]]}},
    list(range(1000)),
    "x" * 100_000,
]


def frame(body: bytes) -> bytes:
    """A frame around ``body`` (version byte included), built by hand."""
    return struct.pack("<I", len(body)) + body


def raw_frame(payload: bytes, version: int = VERSION) -> bytes:
    return frame(bytes([version]) + payload)


def reason_of(excinfo) -> str:
    return excinfo.value.details["reason"]


def feed_chunked(dec: Decoder, data: bytes, cuts) -> list:
    """Feed ``data`` cut at the offsets ``cuts`` (out-of-range ones ignored); return all payloads."""
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    out = []
    for lo, hi in zip(bounds, bounds[1:]):
        out.extend(dec.feed(data[lo:hi]))
    return out


class TestEncode:
    @pytest.mark.parametrize("obj", PAYLOADS, ids=range(len(PAYLOADS)))
    def test_round_trip(self, obj):
        """Every msgpack-able payload comes back equal from one frame."""
        assert Decoder().feed(encode(obj)) == [obj]

    def test_layout(self):
        """A frame is a little-endian u32 body length, the version byte, then msgpack."""
        data = encode([1, 2, 3])
        body = msgpack.packb([1, 2, 3], use_bin_type=True)
        assert data == struct.pack("<I", len(body) + 1) + bytes([VERSION]) + body
        assert VERSION == 1 and MAX_FRAME_DEFAULT == 64 * 1024 * 1024

    def test_str_and_bytes_stay_apart(self):
        """str travels as msgpack str and bytes as bin, so neither turns into the other."""
        out = Decoder().feed(encode(["s", b"s"]))[0]
        assert type(out[0]) is str and type(out[1]) is bytes

    def test_tuple_arrives_as_list(self):
        """Tuples are packed as msgpack arrays and decode as lists."""
        assert Decoder().feed(encode((1, (2, 3)))) == [[1, [2, 3]]]

    def test_encode_many_concatenates(self):
        """encode_many is the frames of each object back to back."""
        objs = [1, "two", [3], {"4": 4}]
        assert encode_many(objs) == b"".join(encode(o) for o in objs)
        assert encode_many([]) == b""

    @pytest.mark.parametrize("obj", [
        [7, 1, 2, 3, bytes(range(256)) * 1024],             # a replication batch: [type, epoch, serial, ts, body]
        [*range(20), b"\x01" * (64 << 10)],                 # 21 items: the array 32 header
        [b"\x02" * (64 << 10)],
    ])
    def test_encode_parts_ends_with_the_large_bytes_uncopied(self, obj):
        """encode_parts of a list ending in >= 64 KiB of bytes: two buffers, the second the very bytes object; joined they decode to the object, however they are cut."""
        parts = framing.encode_parts(obj)
        assert len(parts) == 2 and parts[1] is obj[-1]
        data = b"".join(parts)
        assert Decoder().feed(data) == [obj]
        dec = Decoder()
        got = [x for i in range(0, len(data), 4093) for x in dec.feed(data[i:i + 4093])]
        assert got == [obj]

    @pytest.mark.parametrize("obj", [[1, b"x" * ((64 << 10) - 1)], [1, bytearray(70000)], (1, b"y" * 70000),
                                     {"a": b"z" * 70000}, b"w" * 70000, []])
    def test_encode_parts_of_anything_else_is_encode(self, obj):
        """Below 64 KiB, a bytearray, a tuple, a map, bare bytes, an empty list: one buffer, encode's."""
        assert framing.encode_parts(obj) == [encode(obj)]

    def test_unpackable_object_leaves_encoder_usable(self):
        """An object msgpack cannot pack raises TypeError and the next encode is clean."""
        with pytest.raises(TypeError):
            encode([1, object()])
        assert encode(7) == raw_frame(b"\x07")

    def test_threads_encode_alike(self):
        """Each thread's packer produces the same frames as the main thread's."""
        objs = [{"i": i, "b": bytes(i)} for i in range(200)]
        expected = [encode(o) for o in objs]
        results = []

        def work():
            results.append([encode(o) for o in objs])

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [expected] * 4


class TestDecoder:
    def test_many_frames_in_one_feed(self):
        """Thousands of small frames in one feed all come out, in order."""
        objs = [[i, "x", b"y", None, i * 0.5] for i in range(20_000)]
        dec = Decoder()
        assert dec.feed(encode_many(objs)) == objs
        assert dec.buffered == 0

    def test_one_byte_at_a_time(self):
        """Feeding a stream one byte at a time yields each payload when its last byte arrives."""
        objs = PAYLOADS[:20]
        data = encode_many(objs)
        dec = Decoder()
        out = []
        for i in range(len(data)):
            out.extend(dec.feed(data[i : i + 1]))
        assert out == objs and dec.buffered == 0

    def test_split_at_every_boundary(self):
        """A stream cut in two at any byte decodes to the same payloads."""
        objs = [[1, 2], "abc", {"k": b"v"}, None]
        data = encode_many(objs)
        for cut in range(len(data) + 1):
            assert feed_chunked(Decoder(), data, [cut]) == objs, cut

    def test_partial_frame_is_buffered(self):
        """buffered counts the bytes of the frame not complete yet."""
        data = encode(["partial"])
        dec = Decoder()
        assert dec.feed(data[:-2]) == [] and dec.buffered == len(data) - 2
        assert dec.feed(data[-2:]) == [["partial"]] and dec.buffered == 0

    def test_accepts_bytearray_and_memoryview(self):
        """feed takes bytes, bytearray and memoryview alike."""
        data = encode_many([1, 2, 3])
        dec = Decoder()
        assert dec.feed(bytearray(data[:5])) + dec.feed(memoryview(data)[5:]) == [1, 2, 3]

    def test_large_frame_then_more(self):
        """A frame over the copy threshold decodes in place and the decoder keeps working."""
        big = b"z" * (framing._COPY_MAX * 3)
        data = encode(big) + encode("after")
        dec = Decoder()
        assert dec.feed(data[:-3]) == [big]
        assert dec.feed(data[-3:]) == ["after"]

    @pytest.mark.parametrize("seed", range(6))
    def test_large_frames_received_into_their_own_buffer(self, seed):
        """Frames of >= 256 KiB between small ones, the bytes arriving in random pieces, part fed and part received into buffer() (reported with filled()), as a BufferedProtocol or recv_into does: the same payloads in order, buffered counting what is held."""
        import random
        rng = random.Random(seed)
        objs = ["a", [1, b"x" * (framing._BIG_MIN + 5)], {"k": 2}, b"y" * (framing._BIG_MIN * 3), [7, "z"],
                [3, 4, 5, 6, rng.randbytes(framing._BIG_MIN)]]
        data = encode_many(objs)
        dec, out, pos, used = Decoder(), [], 0, 0
        while pos < len(data):
            room = dec.buffer()
            k = min(rng.randrange(1, 300_000), len(data) - pos)
            if room is not None:
                k = min(k, room.nbytes)
                room[:k] = data[pos:pos + k]
                out += dec.filled(k)
                used += 1
            else:
                out += dec.feed(data[pos:pos + k])
            pos += k
            assert dec.buffered == 0 or pos < len(data)
        assert out == objs and used > 0 and dec.buffer() is None and dec.buffered == 0

    def test_large_frame_with_a_wrong_version_is_refused_at_its_first_byte(self):
        """A large frame gets its buffer once its length prefix is in; its version byte is checked as soon as it arrives, fed or received into buffer()."""
        good = encode(b"v" * framing._BIG_MIN)
        bad = bytearray(good)
        bad[4] = 9
        for how in ("feed", "filled"):
            dec = Decoder()
            assert dec.feed(bad[:4]) == [] and dec.buffer().nbytes == len(good) - 4
            with pytest.raises(FrameError) as ei:
                if how == "feed":
                    dec.feed(bad[4:6])
                else:
                    dec.buffer()[:2] = bad[4:6]
                    dec.filled(2)
            assert ei.value.details["reason"] == "bad_version"
            with pytest.raises(FrameError):
                dec.feed(b"")
        dec = Decoder()
        assert dec.feed(good[:5]) == []
        room = dec.buffer()
        room[:] = good[5:]
        assert dec.filled(room.nbytes) == [b"v" * framing._BIG_MIN] and dec.buffered == 0

    def test_exactly_max_frame_accepted(self):
        """A frame whose body is exactly max_frame bytes is accepted."""
        data = encode(b"q" * 90)
        dec = Decoder(max_frame=len(data) - 4)
        assert dec.feed(data) == [b"q" * 90]

    def test_oversized_prefix_rejected_after_four_bytes(self):
        """A length over max_frame is refused as soon as its 4 prefix bytes arrive."""
        dec = Decoder()
        assert dec.feed(b"\xff\xff\xff") == []
        with pytest.raises(FrameError) as excinfo:
            dec.feed(b"\xff")
        assert str(excinfo.value) == "frame of 4294967295 bytes exceeds the limit of 67108864"
        assert reason_of(excinfo) == "too_large"

    def test_small_limit_rejects_one_byte_over(self):
        """With max_frame=100 a 101-byte body is refused from its prefix alone."""
        with pytest.raises(FrameError) as excinfo:
            Decoder(max_frame=100).feed(struct.pack("<I", 101))
        assert excinfo.value.details == {"reason": "too_large", "size": 101, "limit": 100}

    def test_zero_length_rejected(self):
        """A frame of length 0 (no version byte) is refused."""
        with pytest.raises(FrameError) as excinfo:
            Decoder().feed(b"\x00\x00\x00\x00")
        assert reason_of(excinfo) == "empty"

    def test_wrong_version_rejected(self):
        """A frame whose version byte is not VERSION is refused."""
        with pytest.raises(FrameError) as excinfo:
            Decoder().feed(raw_frame(b"\x01", version=2))
        assert reason_of(excinfo) == "bad_version" and "version 2" in str(excinfo.value)

    def test_wrong_version_rejected_before_body(self):
        """A wrong version byte is refused before the rest of its body arrives."""
        data = raw_frame(b"\x01" * 1000, version=0)
        with pytest.raises(FrameError) as excinfo:
            Decoder().feed(data[:5])
        assert reason_of(excinfo) == "bad_version"

    @pytest.mark.parametrize(
        "payload",
        [b"\xc1", b"", b"\x92\x01", b"\xd9\x05ab", b"\x81\x91\x01\x02"],
        ids=["reserved-byte", "empty", "truncated-array", "truncated-str", "unhashable-key"],
    )
    def test_garbage_msgpack_rejected(self, payload):
        """A payload that is not one complete msgpack object is refused."""
        with pytest.raises(FrameError) as excinfo:
            Decoder().feed(raw_frame(payload))
        assert reason_of(excinfo) == "bad_payload"
        assert str(excinfo.value).startswith("frame payload is not one valid msgpack object: ")

    def test_trailing_data_rejected(self):
        """Bytes after the msgpack object inside a frame are refused."""
        with pytest.raises(FrameError) as excinfo:
            Decoder().feed(raw_frame(b"\x01\x02\x03"))
        assert reason_of(excinfo) == "trailing_data"
        assert str(excinfo.value) == "frame payload has 2 bytes after its msgpack object"

    def test_unusable_after_error(self):
        """After a FrameError every later feed raises FrameError, even of valid frames."""
        dec = Decoder()
        with pytest.raises(FrameError):
            dec.feed(b"\x00\x00\x00\x00")
        for _ in range(2):
            with pytest.raises(FrameError) as excinfo:
                dec.feed(encode(1))
            assert reason_of(excinfo) == "unusable"
        assert dec.buffered == 0

    def test_error_is_protocol_error(self):
        """FrameError is a ProtocolError carrying the APL_EPROTO code."""
        with pytest.raises(ProtocolError) as excinfo:
            Decoder().feed(raw_frame(b"", version=9))
        assert isinstance(excinfo.value, FrameError) and excinfo.value.code == "APL_EPROTO"

    def test_bad_max_frame_refused(self):
        """A max_frame outside 1..2**32-1 is a ValueError."""
        for bad in (0, -1, 2**32):
            with pytest.raises(ValueError):
                Decoder(max_frame=bad)

    @settings(max_examples=300, deadline=None)
    @given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=12))
    def test_fuzz_random_bytes(self, data, cuts):
        """Random bytes in random chunks raise nothing but FrameError, and never hang: what is
        not refused is decoded, but for at most one frame (prefix and max_frame) still buffered."""
        dec = Decoder(max_frame=256)
        with contextlib.suppress(FrameError):
            feed_chunked(dec, data, cuts)
            assert dec.buffered <= 4 + 256

    @settings(max_examples=300, deadline=None)
    @given(
        bodies=st.lists(
            st.one_of(st.binary(max_size=40), st.binary(max_size=40).map(lambda b: b"\x01" + b)),
            max_size=8,
        ),
        cuts=st.lists(st.integers(0, 400), max_size=12),
    )
    def test_fuzz_framed_random_bodies(self, bodies, cuts):
        """Well-framed random bodies decode or raise FrameError, whatever the chunking: one payload
        per frame, nothing left buffered."""
        data = b"".join(frame(b) for b in bodies)
        dec = Decoder(max_frame=256)
        with contextlib.suppress(FrameError):
            assert len(feed_chunked(dec, data, cuts)) == len(bodies) and dec.buffered == 0

    @settings(max_examples=100, deadline=None)
    @given(
        objs=st.lists(
            st.recursive(
                st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary(),
                lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(), kids, max_size=4),
                max_leaves=10,
            ),
            max_size=6,
        ),
        cuts=st.lists(st.integers(0, 2000), max_size=10),
    )
    def test_fuzz_round_trip_any_chunking(self, objs, cuts):
        """Any payloads survive encode_many and any chunking of the stream."""
        dec = Decoder()
        assert feed_chunked(dec, encode_many(objs), cuts) == objs and dec.buffered == 0


class CountingSocket:
    """A socket wrapper that counts recv_into calls."""

    def __init__(self, sock):
        self.sock = sock
        self.recvs = 0

    def recv_into(self, buf, *args):
        self.recvs += 1
        return self.sock.recv_into(buf, *args)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


class TestFrameReader:
    def test_pipelined_frames_one_recv(self, pair):
        """Pipelined frames sent in one sendall come out of one recv_into call."""
        a, b = pair
        objs = [[i, "r", b"v", None, True] for i in range(100)]
        send_frames(a, objs)
        sock = CountingSocket(b)
        reader = FrameReader(sock)
        assert [reader.read() for _ in objs] == objs
        assert sock.recvs == 1

    def test_eof_at_boundary(self, pair):
        """A peer closing between frames gives the frames, then EOFError."""
        a, b = pair
        send_frames(a, ["one", "two"])
        a.close()
        reader = FrameReader(b)
        assert reader.read() == "one" and reader.read() == "two"
        with pytest.raises(EOFError):
            reader.read()

    def test_eof_mid_frame(self, pair):
        """A peer closing inside a frame gives FrameError, not EOFError."""
        a, b = pair
        data = encode_many(["whole", "cut short"])
        a.sendall(data[:-3])
        a.close()
        reader = FrameReader(b)
        assert reader.read() == "whole"
        with pytest.raises(FrameError) as excinfo:
            reader.read()
        assert reason_of(excinfo) == "closed_mid_frame"
        assert str(excinfo.value) == "connection closed mid-frame"

    def test_frame_larger_than_chunk(self, pair):
        """A frame several times the read chunk arrives whole."""
        a, b = pair
        big = bytes(range(256)) * 2000
        sender = threading.Thread(target=send_frames, args=(a, [big, "tail"]))
        sender.start()
        reader = FrameReader(b, chunk=4096)
        assert reader.read() == big and reader.read() == "tail"
        sender.join()

    def test_invalid_frame_raises(self, pair):
        """An oversized prefix from the peer raises FrameError from read."""
        a, b = pair
        a.sendall(struct.pack("<I", 1000) + b"\x01")
        with pytest.raises(FrameError) as excinfo:
            FrameReader(b, max_frame=999).read()
        assert reason_of(excinfo) == "too_large"

    def test_timeout_leaves_reader_usable(self, pair):
        """A socket timeout mid-frame propagates and the frame completes on the next read."""
        a, b = pair
        b.settimeout(0.05)
        data = encode({"k": "v"})
        a.sendall(data[:3])
        reader = FrameReader(b)
        with pytest.raises(socket.timeout):
            reader.read()
        a.sendall(data[3:])
        assert reader.read() == {"k": "v"}

    def test_recv_frame_reads_exactly_one(self, pair):
        """recv_frame leaves the next frame unread in the socket."""
        a, b = pair
        send_frames(a, [[1, 2], "next"])
        assert recv_frame(b) == [1, 2]
        assert recv_frame(b) == "next"

    def test_recv_frame_eof(self, pair):
        """recv_frame raises EOFError at a boundary and FrameError mid-frame."""
        a, b = pair
        data = encode("x" * 50)
        a.sendall(data + data[:10])
        a.close()
        assert recv_frame(b) == "x" * 50
        with pytest.raises(FrameError) as excinfo:
            recv_frame(b)
        assert reason_of(excinfo) == "closed_mid_frame"
        with pytest.raises(EOFError):
            recv_frame(b)

    def test_recv_frame_eof_inside_prefix(self, pair):
        """recv_frame raises FrameError when the peer closes inside the length prefix."""
        a, b = pair
        a.sendall(b"\x05\x00")
        a.close()
        with pytest.raises(FrameError):
            recv_frame(b)

    def test_recv_frame_checks_limit(self, pair):
        """recv_frame refuses a prefix over its max_frame before reading the body."""
        a, b = pair
        a.sendall(struct.pack("<I", 10_000))
        with pytest.raises(FrameError) as excinfo:
            recv_frame(b, max_frame=100)
        assert reason_of(excinfo) == "too_large"
