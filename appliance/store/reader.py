"""Zero-round-trip reads over an :class:`~appliance.store.segment.Attachment`.

Each call reads one committed version: without a ``version`` it pins the
latest inside the C call (per-thread reader slot); with one, the caller holds
that version pinned by a :class:`Pin` (a snapshot slot of its own).
Multi-call reads (a scan that does not fit one buffer) always hold a Pin, so
"one call sees one committed state" holds however long the result is.

Records come back decoded through a table's native reader
(:meth:`Reader.table_reader`: a ``TableReader`` of cext/apl_py.c, which pins,
looks up, copies and decodes in one call); the ``*_raw`` reads return the
stored value bytes, for tools and the store's own tests.
"""
from __future__ import annotations

import struct
import threading
from typing import Callable, Iterator

from .._native import TableReader, check, ffi, lib, raise_for, view_address

#: buffers C fills before they are read: not zeroed first
_raw_alloc = ffi.new_allocator(should_clear_after_alloc=False)

__all__ = ["Reader", "Pin"]

_EBUFSIZE = lib.APL_EBUFSIZE
_NOTFOUND = lib.APL_NOTFOUND
_NO_BOUND = lib.APL_NO_BOUND
_VALUES = lib.APL_SCAN_VALUES
_KEYS = lib.APL_SCAN_KEYS
_MAXKEY = lib.APL_MAX_KEY
_SCAN_CHUNK = 256 << 10
_SUM = struct.Struct("<IQ")
_IMAGE_HDR = struct.Struct("<II")
_LEN = struct.Struct("<I")


def _values(buf: bytearray, n: int) -> Iterator[bytes]:
    """The values of an APL_SCAN_VALUES buffer: [u32 length][bytes] each."""
    mv = memoryview(buf)
    off = 0
    while off < n:
        (vl,) = _LEN.unpack_from(buf, off)
        yield bytes(mv[off + 4:off + 4 + vl])
        off += 4 + vl


class Pin:
    """A pinned committed version (a snapshot slot); release with close().
    Only the process that opened it releases its slot (apl_snap_close checks
    the claim), so a forked child's close leaves the parent's pin alone."""

    __slots__ = ("_reader", "_slot", "_gen", "version", "__weakref__")

    def __init__(self, reader: "Reader") -> None:
        slot = ffi.new("uint32_t *")
        gen = ffi.new("uint64_t *")
        ver = ffi.new("uint64_t *")
        check(lib.apl_snap_open(reader.view, slot, gen, ver), "pin a snapshot")
        self._reader = reader
        self._slot = slot[0]
        self._gen = gen[0]
        self.version = ver[0]

    def close(self) -> None:
        if self._reader is not None:
            if not self._reader.closed:
                lib.apl_snap_close(self._reader.view, self._slot, self._gen)
            self._reader = None

    def __del__(self):  # a leaked snapshot must not pin memory for the process's life
        try:
            self.close()
        except Exception:
            pass


class _Buf(threading.local):
    def __init__(self, size: int = 1 << 16) -> None:
        self.resize(size)

    def resize(self, size: int) -> None:
        self.raw = bytearray(size)
        self.c = ffi.from_buffer("uint8_t[]", self.raw)
        self.mv = memoryview(self.raw)
        self.size = size


class Reader:
    """Reads of one attached appliance. Thread-safe: buffers are per thread."""

    def __init__(self, att) -> None:
        self.att = att
        self.view = att.view
        self._tls = _Buf()

    @property
    def closed(self) -> bool:
        return self.att.closed

    def committed(self) -> int:
        return lib.apl_committed(self.view)

    def pin(self) -> Pin:
        return Pin(self)

    # -- point reads -----------------------------------------------------------

    def get_raw(self, file: int, key: bytes, version: int = 0) -> bytes | None:
        """The stored value bytes for an encoded key, or None."""
        b = self._tls
        while True:
            n = lib.apl_get(self.view, file, key, len(key), version, b.c, b.size)
            if n >= 0:
                return bytes(b.mv[:n])
            if n == _NOTFOUND:
                return None
            if n == _EBUFSIZE:
                b.resize(max(b.size * 2, int.from_bytes(b.raw[:8], "little")))
                continue
            raise_for(n, "get", sb=self.att.sb)

    def count(self, file: int, version: int = 0) -> int:
        return check(lib.apl_count(self.view, file, version), "count")

    # -- ordered reads -------------------------------------------------------------

    def _chunks(self, fn, version: int | None):
        """Run a continued C scan under one pinned version; yield (buffer view, count)."""
        pin = None
        if version is None:
            pin = Pin(self)
            version = pin.version
        try:
            yield from fn(version)
        finally:
            if pin is not None:
                pin.close()

    def table_reader(self, table, on_error: Callable) -> TableReader:
        """The native reader of a table (a :class:`~appliance.store.records.TableSchema`):
        get / scan / find in one C call each, records decoded by its codec.
        ``on_error(code, op, argument)`` raises the error of a failed read."""
        return TableReader(view_address(self.view), self.att, table.file, table.codec,
                           table.pk_codec.type_name, table.key, on_error)

    def scan_values(self, tr: TableReader, lo: bytes | None, hi: bytes | None, *, lo_incl: bool = True,
                    version: int | None = None) -> Iterator[dict]:
        """Records of [lo, hi) in key order (lo/hi None = unbounded), through
        the table reader `tr`: one native call per chunk, every chunk at one
        pinned version (a snapshot's reader reads its own)."""
        def run(ver):
            start, incl = lo, lo_incl
            while True:
                recs, resume = tr.scan(start, incl, hi, ver, _SCAN_CHUNK)
                yield from recs
                if resume is None:
                    return
                start, incl = resume, False
        return self._chunks(run, version if version is not None else (tr.version or None))

    def scan_raw(self, file: int, lo: bytes | None, hi: bytes | None, *, lo_incl: bool = True,
                 version: int | None = None) -> Iterator[bytes]:
        """The stored value bytes of [lo, hi) in key order."""
        def run(ver):
            count = ffi.new("uint64_t *")
            more = ffi.new("int *")
            resume = ffi.new("uint8_t[]", _MAXKEY)
            rlen = ffi.new("uint32_t *")
            start, incl = (lo or b""), lo_incl or lo is None
            hib, hil = (hi, len(hi)) if hi is not None else (ffi.NULL, _NO_BOUND)
            buf = bytearray(_SCAN_CHUNK)
            cbuf = ffi.from_buffer("uint8_t[]", buf)
            while True:
                n = lib.apl_scan(self.view, file, start, len(start), incl, hib, hil, ver, _VALUES,
                                 cbuf, len(buf), count, resume, rlen, more)
                if n == _EBUFSIZE:
                    buf = bytearray(max(len(buf) * 2, int.from_bytes(buf[:8], "little")))
                    cbuf = ffi.from_buffer("uint8_t[]", buf)
                    continue
                if n < 0:
                    raise_for(n, "scan", sb=self.att.sb)
                yield from _values(buf, n)
                if not more[0]:
                    return
                start, incl = bytes(ffi.buffer(resume, rlen[0])), False
        return self._chunks(run, version)

    def scan_keys(self, file: int, lo: bytes | None, hi: bytes | None, *,
                  version: int | None = None) -> Iterator[bytes]:
        """Encoded keys of [lo, hi) in key order."""
        def run(ver):
            count = ffi.new("uint64_t *")
            more = ffi.new("int *")
            resume = ffi.new("uint8_t[]", _MAXKEY)
            rlen = ffi.new("uint32_t *")
            start, incl = (lo or b""), True
            hib, hil = (hi, len(hi)) if hi is not None else (ffi.NULL, _NO_BOUND)
            buf = bytearray(_SCAN_CHUNK)
            cbuf = ffi.from_buffer("uint8_t[]", buf)
            while True:
                n = lib.apl_scan(self.view, file, start, len(start), incl, hib, hil, ver, _KEYS,
                                 cbuf, len(buf), count, resume, rlen, more)
                if n < 0:
                    raise_for(n, "scan keys", sb=self.att.sb)
                mv = memoryview(buf)
                off = 0
                while off < n:
                    kl = mv[off] | (mv[off + 1] << 8)
                    yield bytes(mv[off + 2: off + 2 + kl])
                    off += 2 + kl
                if not more[0]:
                    return
                start, incl = bytes(ffi.buffer(resume, rlen[0])), False
        return self._chunks(run, version)

    def find_raw(self, index: int, table: int, prefix: bytes, *,
                 version: int | None = None) -> Iterator[bytes]:
        """The stored value bytes of the records whose alternate key (index file) encodes to `prefix`."""
        def run(ver):
            count = ffi.new("uint64_t *")
            more = ffi.new("int *")
            resume = ffi.new("uint8_t[]", _MAXKEY)
            rlen = ffi.new("uint32_t *")
            after = b""
            buf = bytearray(_SCAN_CHUNK)
            cbuf = ffi.from_buffer("uint8_t[]", buf)
            while True:
                n = lib.apl_find(self.view, index, table, prefix, len(prefix), after, len(after),
                                 ver, cbuf, len(buf), count, resume, rlen, more)
                if n == _EBUFSIZE:
                    buf = bytearray(max(len(buf) * 2, int.from_bytes(buf[:8], "little")))
                    cbuf = ffi.from_buffer("uint8_t[]", buf)
                    continue
                if n < 0:
                    raise_for(n, "find", sb=self.att.sb)
                yield from _values(buf, n)
                if not more[0]:
                    return
                after = bytes(ffi.buffer(resume, rlen[0]))
        return self._chunks(run, version)

    # -- block images (verify, replication) ------------------------------------

    def block_checksum(self, number: int, version: int = 0) -> int:
        out = ffi.new("uint64_t *")
        check(lib.apl_block_checksum(self.view, number, version, out), "block checksum")
        return out[0]

    def block_image(self, number: int, version: int = 0) -> bytes | None:
        cap = self.att.sb.sb_block_size * 16 + 64
        buf = ffi.new("uint8_t[]", cap)
        n = lib.apl_block_image(self.view, number, version, buf, cap)
        if n == _NOTFOUND:
            return None
        check(n, "block image")
        return bytes(ffi.buffer(buf, n))

    def block_images(self, start: int, version: int, cap: int, limit: int, *,
                     copy: bool = True) -> tuple[bytes, int]:
        """Images of block numbers [start, limit) at a pinned version, up to about
        `cap` bytes: (u32 number, u32 length, image)*, next number. A number not
        in use has length 0 (apl_block_images). copy=False: a buffer over the
        memory they were read into instead of bytes (no copy made while the
        GIL is held: a checkpoint's thread copying megabytes held up every
        commit of the loop thread)."""
        buf = _raw_alloc("uint8_t[]", cap)   # not cleared: only the n bytes written are read
        nxt = ffi.new("uint32_t *")
        n = lib.apl_block_images(self.view, start, limit, version, buf, cap, nxt)
        check(n, "block images")
        return (bytes(ffi.buffer(buf, n)) if copy else ffi.buffer(buf, n)), nxt[0]

    def images_of(self, numbers: list[int], start: int, version: int, cap: int) -> tuple[bytes, int]:
        """Images of numbers[start:] at a pinned version, as block_images
        writes them (a number not in use: length 0), up to about `cap` bytes
        (at least one); returns (them, the index to go on from)."""
        if start >= len(numbers):
            return b"", start
        nums = ffi.new("uint32_t[]", numbers[start:])
        one = self.att.sb.sb_block_size * (self.att.sb.sb_max_overflow + 1) * 2 + 64
        size = min(cap, len(nums) * one) + one        # the first record always fits
        buf = _raw_alloc("uint8_t[]", size)
        nxt = ffi.new("uint32_t *")
        n = lib.apl_block_images_of(self.view, nums, len(nums), version, buf, size, nxt)
        check(n, "block images", sb=self.att.sb)
        return bytes(ffi.buffer(buf, n)), start + nxt[0]

    def block_limit(self) -> int:
        return lib.apl_block_limit(self.view)

    def chain_lengths(self, nbuckets: int) -> list[int]:
        """Primary blocks by the length of their chain at the latest version
        (apl_chain_lengths): [chains of 1 block, of 2, ..., of nbuckets or more].
        One walk of the location table under its own pin."""
        hist = ffi.new("uint64_t[]", nbuckets)
        check(lib.apl_chain_lengths(self.view, hist, nbuckets), "chain lengths")
        return list(hist)

    def block_sums(self, version: int) -> bytes:
        """(u32 number, u64 checksum) of every block in use at a pinned version."""
        out = bytearray()
        pack = _SUM.pack
        for n in range(self.block_limit()):
            sm = self.block_checksum(n, version)
            if sm:
                out += pack(n, sm)
        return bytes(out)
