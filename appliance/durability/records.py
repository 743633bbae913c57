"""The format of the durability files: checksummed records.

A durability file — a log file or a checkpoint — is an 8-byte magic
(:data:`LOG_MAGIC`, :data:`CHECKPOINT_MAGIC`) followed by records back to
back. A record is a 56-byte header and its payload, padded to 8 bytes::

    u32 crc     CRC-32 (zlib's crc32) of the header after this field, then the payload
    u32 length  payload bytes
    u64 seq     the record's number: +1 per record over the appliance's
                durable life, continued across files, restarts and cold starts
    u64 first   first serial the record carries (kind-specific, below)
    u64 last    last serial
    u64 aux1    kind-specific
    u64 aux2    kind-specific
    u16 kind    KIND_*
    u16 flags
    u32 pad

Kinds (payloads are bytes as the C helpers produce and consume them, so this
format knows nothing of records or blocks):

- HEADER: the first record of every file; msgpack map (format, what file it
  is, the appliance, its instance, schema hash, layout; a checkpoint adds
  where it stands: seq, serial, version, transaction numbers, epoch, role).
- ENTRIES: one commit batch of this appliance's change log (entries back to
  back, cext/apl_layout.h); first/last: their serials; aux1: the last
  transaction committed, aux2: the next transaction number.
- APPLIED: a secondary applied its primary's entries (whole transactions);
  first/last: the primary's serials; aux1: the primary's instance.
- COPY_BEGIN, COPY_BLOCKS, COPY_END: a secondary's block copy from its
  primary (msgpack map / block images as apl_block_images writes them /
  msgpack map); aux1: the primary's instance.
- ROLE: msgpack map {role, epoch}: the role or epoch changed.
- GAP: msgpack map {after, next}: serials the files never got (the log
  before it cannot be continued past `after`; see appliance/durability/logfiles.py).
- BLOCKS: a checkpoint's block images (apl_block_images format).
- END: the last record of a checkpoint; msgpack map {blocks, bytes, records}.

Reading stops at the first record that is not whole and valid; what it found
there is the scan's ``stop``: "end" (the end of the file, or a header of
zeros: space never written), "torn" (a record cut short by the end of the
file: a write a crash interrupted) or "corrupt" (a checksum or a header that
does not hold). Nothing after such a record is used.
"""
from __future__ import annotations

import errno
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import msgpack

from .._native import ffi, lib

__all__ = ["LOG_MAGIC", "CHECKPOINT_MAGIC", "FORMAT", "HDR", "Record", "Scan", "ReadAhead", "crc32", "drop_cached", "frame", "read", "scan",
           "pack", "unpack",
           "KIND_HEADER", "KIND_ENTRIES", "KIND_APPLIED", "KIND_COPY_BEGIN", "KIND_COPY_BLOCKS", "KIND_COPY_END",
           "KIND_ROLE", "KIND_GAP", "KIND_BLOCKS", "KIND_END", "KIND_NAMES"]

LOG_MAGIC = b"APLDLOG\x01"
CHECKPOINT_MAGIC = b"APLDCKP\x01"
FORMAT = 1
MAGIC_LEN = 8

HDR = struct.Struct("<IIQQQQQHHI")
_AFTER_CRC = struct.Struct("<IQQQQQHHI")   # the header without its crc field
_ZERO = bytes(HDR.size)
MAX_PAYLOAD = 1 << 30

(KIND_HEADER, KIND_ENTRIES, KIND_APPLIED, KIND_COPY_BEGIN, KIND_COPY_BLOCKS, KIND_COPY_END, KIND_ROLE,
 KIND_GAP, KIND_BLOCKS, KIND_END) = range(1, 11)
KIND_NAMES = {KIND_HEADER: "header", KIND_ENTRIES: "entries", KIND_APPLIED: "applied",
              KIND_COPY_BEGIN: "copy_begin", KIND_COPY_BLOCKS: "copy_blocks", KIND_COPY_END: "copy_end",
              KIND_ROLE: "role", KIND_GAP: "gap", KIND_BLOCKS: "blocks", KIND_END: "end"}
_PAD = bytes(8)
_NATIVE_CRC = 4096        # payloads from this size are summed by apl_crc32 (cext/apl_crc.c), smaller by zlib


def crc32(data, crc: int = 0) -> int:
    """zlib.crc32(data, crc), the same value: large buffers through the C
    helpers' PCLMULQDQ version (2-3x zlib's rate here; neither holds the GIL)."""
    n = len(data)
    if n < _NATIVE_CRC:
        return zlib.crc32(data, crc)
    return lib.apl_crc32(crc, ffi.from_buffer(data), n)


@dataclass(frozen=True, slots=True)
class Record:
    offset: int       # where its header starts in the file
    size: int         # header + payload + padding
    seq: int
    kind: int
    first: int
    last: int
    aux1: int
    aux2: int
    flags: int
    payload: bytes

    def doc(self) -> dict:
        """The payload of a msgpack record (HEADER, COPY_BEGIN, ...)."""
        return unpack(self.payload)


def pack(doc: dict) -> bytes:
    return msgpack.packb(doc, use_bin_type=True)


def unpack(payload: bytes) -> dict:
    doc = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    if not isinstance(doc, dict):
        raise ValueError("not a map")
    return doc


def frame(seq: int, kind: int, payload: bytes | memoryview, *, first: int = 0, last: int = 0, aux1: int = 0,
          aux2: int = 0, flags: int = 0) -> list:
    """A record as the pieces to write, in order (header, payload, padding):
    the payload is not copied."""
    n = len(payload)
    rest = _AFTER_CRC.pack(n, seq, first, last, aux1, aux2, kind, flags, 0)
    crc = crc32(payload, zlib.crc32(rest))
    pad = -n & 7
    out = [struct.pack("<I", crc) + rest, payload]
    if pad:
        out.append(_PAD[:pad])
    return out


@dataclass
class Scan:
    """What reading a file found: its records and why reading stopped."""

    path: Path
    magic_ok: bool = False
    records: list | None = None
    stop: str = "end"          # "end", "torn" or "corrupt"
    stop_offset: int = 0       # where the first unusable byte is (the end of the last good record)
    size: int = 0              # the file's size
    problem: str | None = None


WINDOW = 1 << 20          # bytes read at a time for records smaller than a quarter of it
DROP_BEHIND = 8 << 20     # the page cache of what was read is dropped in steps of this size


class _File:
    """A durability file read front to back with pread: small records come
    out of a 1 MiB window, a large one's bytes are read straight into the
    bytes object that holds them, or with a pool into one of its reused
    buffers (one copy, by the kernel, without the GIL;
    an mmap would cost a page fault a page and its slices a second copy
    under the GIL).

    Behind the reader, the file's pages leave the page cache
    (drop_cached, every DROP_BEHIND bytes; what was read is in
    bytes objects already, and a file is read once): a cold start reading a
    1 GiB checkpoint keeps ~8 MiB of it cached, not all of it, and reads
    into the pages it just gave back rather than fresh memory, whose first
    touch is most of a cold start's CPU on a VM that takes freed memory
    back."""

    def __init__(self, fd: int, size: int, pool: "_Pool | None" = None) -> None:
        self.fd, self.size = fd, size
        self.buf, self.start = b"", 0
        self.dropped = 0          # the page cache before this offset was dropped
        self.pool = pool

    def get(self, off: int, n: int) -> bytes | memoryview:
        """The file's bytes [off, off + n), all of them (the caller checked
        the size); a large read with a pool: a read-only view of one of its
        buffers (release() gives it back)."""
        rel = off - self.start
        if rel >= 0 and rel + n <= len(self.buf):
            return self.buf[rel:rel + n]
        if off - self.dropped >= DROP_BEHIND:
            self.drop(off)
        if n >= WINDOW // 4:
            if self.pool is not None:
                return self.pool.read(self.fd, n, off)
            return _pread(self.fd, n, off)
        self.buf, self.start = _pread(self.fd, min(WINDOW, self.size - off), off), off
        return self.buf[:n]

    def release(self, data) -> None:
        """Done with what get() returned (a pooled buffer goes back)."""
        if self.pool is not None and type(data) is memoryview:
            self.pool.give(data)

    def drop(self, upto: int) -> None:
        self.dropped = drop_cached(self.fd, self.dropped, upto)


def drop_cached(fd: int, start: int, end: int) -> int:
    """Drop the page cache of a file's bytes [start, end) that are on disk
    (whole pages; POSIX_FADV_DONTNEED, advice only: the kernel keeps dirty
    pages). Returns the page-aligned offset dropped up to: pass it as the
    next `start`. A file written or read once keeps only what is in flight
    cached, and its next pages reuse the ones given back: on a VM whose
    host takes freed memory back (a balloon's free page reporting), the
    first touch of a fresh page costs microseconds while the host backs it
    again (_File reads this way; the checkpoint writer writes this way)."""
    end &= ~4095
    if end > start:
        try:
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        return end
    return start


class _Pool:
    """Buffers a reader reads its large records into, used again once the
    consumer is done with them (ReadAhead(reuse=True)): reading a 1 GiB
    checkpoint then touches a few buffers' memory again and again instead of
    a fresh 4 MiB mapping a record — glibc maps a large allocation of a
    thread afresh each time, and on a VM whose host takes freed memory back
    each fresh page's first touch costs microseconds (seconds of system
    time for a GiB of such reads when the host has taken the memory back;
    none when the buffers are used again).
    Never blocks: a buffer is made when none is free (the read-ahead queue
    bounds how many are out); kept: at most `keep`, none above MAX_KEPT.
    Shared: the free list, between the reading thread (read) and the
    consumer (give); list.append and list.pop are atomic under the GIL."""

    MAX_KEPT = 16 << 20

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.free: list[bytearray] = []

    def read(self, fd: int, n: int, off: int) -> memoryview:
        buf = None
        while self.free and buf is None:     # (only this thread takes from it)
            b = self.free.pop()
            if len(b) >= n:
                buf = b
        if buf is None:
            buf = bytearray(max(n, CHUNK_HINT))
        view = memoryview(buf)[:n]
        _pread_into(fd, view, off, 0)
        return view.toreadonly()

    def give(self, view: memoryview) -> None:
        """The consumer is done with `view`: its buffer is read into again,
        unless anything still holds a view of it (a consumer that kept one,
        against the rule: then it is left to that view and never reused)."""
        buf = view.obj
        try:
            view.release()
            buf.append(0)         # a bytearray resizes only with no view of it alive
            del buf[-1]
        except BufferError:
            return
        if len(self.free) < self.keep and len(buf) <= self.MAX_KEPT:
            self.free.append(buf)


CHUNK_HINT = (4 << 20) + 4096     # a pooled buffer holds at least a checkpoint's BLOCKS record


def _pread(fd: int, n: int, off: int) -> bytes:
    data = os.pread(fd, n, off)
    if len(data) == n:
        return data
    buf = bytearray(n)               # a short read (rare): the rest read into the same buffer
    buf[:len(data)] = data
    _pread_into(fd, memoryview(buf), off, len(data))
    return bytes(buf)


def _pread_into(fd: int, view: memoryview, off: int, got: int) -> None:
    """Fill view[got:] with the file's bytes from off + got on."""
    n = len(view)
    while got < n:
        k = os.preadv(fd, [view[got:]], off + got)
        if not k:
            raise OSError(errno.EIO, f"read {n} bytes at offset {off}: the file ended at {off + got}")
        got += k


def _parse(f: _File, start: int, size: int, with_payload) -> Iterator[Record | tuple]:
    """Records of the file's bytes [start, size); the last item yielded is
    ("stop", reason, offset, problem) when it ends before `size` or on a bad
    record."""
    pos = start
    unpack_hdr = HDR.unpack
    get = f.get
    while True:
        if pos == size:
            return
        if pos + HDR.size > size:
            tail = get(pos, size - pos)
            if tail.strip(b"\0"):
                yield ("stop", "torn", pos, f"a record header cut short at offset {pos}")
            return
        hdr = get(pos, HDR.size)
        crc, n, seq, first, last, aux1, aux2, kind, flags, _ = unpack_hdr(hdr)
        if not crc and not n and not seq and not kind and hdr == _ZERO:
            return   # space never written (the end)
        end = pos + HDR.size + n + (-n & 7)
        if n > MAX_PAYLOAD or not KIND_HEADER <= kind <= KIND_END:
            yield ("stop", "corrupt", pos, f"a record header that does not hold at offset {pos}")
            return
        if end > size:
            yield ("stop", "torn", pos, f"a record of {n} bytes at offset {pos} cut short by the end "
                                        f"of the file ({size - pos - HDR.size} bytes of it there)")
            return
        body = get(pos + HDR.size, n)
        if crc32(body, zlib.crc32(hdr[4:])) != crc:
            f.release(body)
            yield ("stop", "corrupt", pos, f"the record at offset {pos} (seq {seq}) fails its checksum")
            return
        if not with_payload(kind):
            f.release(body)
            body = b""
        yield Record(pos, end - pos, seq, kind, first, last, aux1, aux2, flags, body)
        pos = end


def read(path: Path, magic: bytes, result: Scan, *, payloads=lambda kind: True,
         pool: _Pool | None = None) -> Iterator[Record]:
    """The whole, valid records of a file, one at a time (payloads only of
    the kinds `payloads` accepts); `result` says where and why reading
    stopped once the iterator is exhausted. With `pool`, a large payload is
    a read-only view of a pooled buffer, which the consumer gives back."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    f = None
    try:
        size = os.fstat(fd).st_size
        result.size = size
        if size < MAGIC_LEN:
            result.stop, result.problem = "torn", ("shorter than its magic number" if size else "empty")
            return
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)   # read once, front to back: a larger readahead
        f = _File(fd, size, pool)
        if f.get(0, MAGIC_LEN) != magic:
            result.stop, result.problem = "corrupt", "not a durability file of this kind (magic number)"
            return
        result.magic_ok = True
        result.stop_offset = MAGIC_LEN
        for item in _parse(f, MAGIC_LEN, size, payloads):
            if type(item) is tuple:
                _, result.stop, result.stop_offset, result.problem = item
                return
            result.stop_offset = item.offset + item.size
            yield item
    finally:
        if f is not None:
            f.drop(result.stop_offset)
        os.close(fd)


class ReadAhead:
    """read() in a thread of its own, a few records ahead of the consumer
    (iterate it once): reading and checking the next records (pread,
    crc32, both without the GIL) overlaps with applying the previous
    ones (C calls, which release it too). The thread starts at once, so the
    caller may do other work before it iterates. Shared: a bounded queue;
    `result` is complete once the iteration ends."""

    _END = object()

    def __init__(self, path: Path, magic: bytes, *, payloads=lambda kind: True, depth: int = 4,
                 reuse: bool = False) -> None:
        import queue
        import threading
        self.result = Scan(path)
        # reuse: a record's large payload is a view of a pooled buffer, valid
        # until the consumer asks for the next record (it must not keep it)
        self._pool = _Pool(depth + 2) if reuse else None
        self._q: "queue.Queue" = queue.Queue(maxsize=depth)
        self._stop = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(path, magic, payloads),
                                        name="durability-read-ahead", daemon=True)
        self._thread.start()

    def _run(self, path, magic, payloads) -> None:
        try:
            for r in read(path, magic, self.result, payloads=payloads, pool=self._pool):
                if self._stop:
                    return
                self._q.put(r)
        except BaseException as e:   # handed to the consumer
            self._error = e
        finally:
            self._q.put(self._END)

    def __iter__(self) -> Iterator[Record]:
        pool = self._pool
        try:
            while (r := self._q.get()) is not self._END:
                yield r
                if pool is not None and type(r.payload) is memoryview:
                    pool.give(r.payload)      # the consumer asked for the next one: done with it
            if self._error is not None:
                raise self._error
        finally:
            self.close()

    def close(self) -> None:
        """Stop reading (the consumer gave up early) and wait for the thread."""
        self._stop = True
        while self._thread.is_alive():
            try:
                self._q.get(timeout=0.05)
            except Exception:
                pass
        self._thread.join()


def scan(path: Path, magic: bytes, *, payloads=lambda kind: True, records: bool = True) -> Scan:
    """Read a whole file: its valid records (payloads only of the kinds
    `payloads` accepts; with records=False none are kept, only where reading
    stops)."""
    out = Scan(path, records=[] if records else None)
    for r in read(path, magic, out, payloads=payloads):
        if records:
            out.records.append(r)
    return out
