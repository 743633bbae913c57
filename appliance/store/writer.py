"""The controller's handle on the store: format, recover, batches, changes,
the change log, publishing and reclamation. A thin layer over the C writer
(cext/apl_store_int.h lists its files); only the controller process uses it,
from one thread.
"""
from __future__ import annotations

import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

from .. import errors
from .._native import check, ffi, lib
from .segment import Attachment, Geometry, Segment, SegmentNames, readers_mode, unlink_all

__all__ = ["Writer", "FileSpec", "OpInfo", "SlotInfo", "bits_set"]

KIND_INSERT = lib.APL_CE_INSERT
KIND_UPDATE = lib.APL_CE_UPDATE
KIND_DELETE = lib.APL_CE_DELETE


@dataclass(frozen=True)
class FileSpec:
    name: str          # table name, or "<table>.<field>" for an alternate-key index
    kind: int          # lib.APL_FILE_PRIMARY / APL_FILE_ALTKEY
    table: int         # for an index: the file id of its table


class SlotInfo(NamedTuple):
    """One reader slot in use (apl_readers_list)."""
    slot: int
    pid: int
    start: int       # the owner's start time as it recorded it (0: unknown)
    gen: int         # the claim's token
    pin: int         # 0 idle, PENDING, or the pinned version
    since_ns: int    # a snapshot's pin time (0 for a per-call slot)
    kind: int        # 1 per-call, 2 snapshot
    owned: bool      # the controller verified this pid and start as its owner


@dataclass(frozen=True)
class OpInfo:
    block: int
    offset: int
    structs: tuple[tuple[int, bool], ...]  # (block number, removed)


def _cbuf(data):
    """bytes as they are; a buffer (a durability file's pooled read, a
    memoryview) as a pointer into it, not a copy."""
    return data if type(data) is bytes else ffi.from_buffer(data)


class Writer:
    """Owns an :class:`Attachment` opened read-write and the C writer state."""

    def __init__(self, att: Attachment, reserve_slots: int) -> None:
        self.att = att
        self._s = lib.apl_store_new(att.view, reserve_slots)
        if self._s == ffi.NULL:
            raise errors.InternalError("apl_store_new: out of process memory")
        bsize = att.sb.sb_block_size
        self._oldcap = bsize
        self._old = ffi.new("uint8_t[]", self._oldcap)
        self._oldlen = ffi.new("int64_t *")
        self._info = ffi.new("struct apl_opinfo *")
        self._serial = ffi.new("uint64_t *")
        self._failed = ffi.new("int64_t *")
        self._consumed = ffi.new("uint64_t *")
        self._last = ffi.new("uint64_t *")
        self._lastc = ffi.new("uint64_t *")
        self._stats = ffi.new("struct apl_stats *")
        self.in_batch = False

    # -- creation and recovery -------------------------------------------------

    @classmethod
    def create(cls, name: str, geo: Geometry, *, mode: int, gid: int | None, schema_hash: int,
               files: list[FileSpec], reserve_slots: int, layout: bytes = b"",
               instance: int | None = None) -> "Writer":
        """Create and format every segment, then the files (published as version 1).
        `layout` (geo.layout_len bytes) is recorded in meta (Attachment.layout).
        `instance`: the appliance's identity, kept by a cold start (default: a new one)."""
        names = SegmentNames(name, geo.nsegments)
        made: list[Segment] = []
        try:
            meta = Segment.create(names.meta, geo.meta_size, mode, gid)
            made.append(meta)
            readers = Segment.create(names.readers, geo.readers_size, readers_mode(mode), gid)
            made.append(readers)
            devs = _create_devices(names, geo, mode, gid, made)
            instance = instance or secrets.randbits(63) | 1
            check(lib.apl_format_readers(readers.ptr, geo.c, instance), "format readers")
            for i, d in enumerate(devs):
                check(lib.apl_format_device(d.ptr, geo.c, instance, i), f"format device {i}")
            check(lib.apl_format_meta(meta.ptr, geo.c, instance, schema_hash, time.time_ns()),
                  "format meta")
            if len(layout) != geo.layout_len:
                raise errors.InternalError(f"format meta: layout of {len(layout)} bytes, "
                                           f"geometry made room for {geo.layout_len}")
            if layout:
                ffi.memmove(meta.ptr + geo.layout_off, layout, len(layout))
            att = Attachment(name, writable=True, segments=devs, meta=meta, readers=readers)
        except BaseException:
            for s in made:
                s.close()
            unlink_all(name, geo.nsegments)
            raise
        w = None
        try:  # a store that failed to get its files is not left behind either
            w = cls(att, reserve_slots)
            w.recover()
            w.begin()
            for i, f in enumerate(files):
                check(lib.apl_store_create_file(w._s, i, f.name.encode(), f.kind, f.table),
                      f"create file {f.name}")
            w.publish(time.time_ns(), 0)
        except BaseException:
            if w is not None:
                w.close()  # closes att too
            else:
                att.close()
            unlink_all(name, geo.nsegments)
            raise
        return w

    def recover(self) -> dict:
        r = ffi.new("struct apl_recovery *")
        check(lib.apl_store_recover(self._s, r), "recover")
        return _facts(r)

    def close(self) -> None:
        if getattr(self, "_s", None) is not None:
            lib.apl_store_free(self._s)
            self._s = None
            self.att.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- batches and changes -----------------------------------------------------

    def begin(self) -> None:
        check(lib.apl_batch_begin(self._s), "begin batch")
        self.in_batch = True

    def put(self, file: int, key: bytes, value: bytes, mode: int) -> tuple[int, bytes | None]:
        """Insert/update/upsert; returns (KIND_INSERT|KIND_UPDATE, old value or None)."""
        rc = lib.apl_put(self._s, file, key, len(key), value, len(value), mode,
                         self._old, self._oldcap, self._oldlen)
        if rc < 0:
            check(rc, "put", sb=self.att.sb)
        n = self._oldlen[0]
        return rc, (bytes(ffi.buffer(self._old, n)) if n >= 0 else None)

    def delete(self, file: int, key: bytes) -> bytes:
        rc = lib.apl_delete(self._s, file, key, len(key), self._old, self._oldcap, self._oldlen)
        if rc < 0:
            check(rc, "delete", sb=self.att.sb)
        return bytes(ffi.buffer(self._old, self._oldlen[0]))

    def op_info(self) -> OpInfo:
        lib.apl_op_info(self._s, self._info)
        i = self._info
        return OpInfo(i.block, i.offset,
                      tuple((i.structs[k], bool(i.removed[k])) for k in range(i.nstruct)))

    def log(self, kind: int, *, txn: int, time_ns: int, file: int = 0, block: int = 0,
            offset: int = 0, flags: int = 0, key: bytes = b"", a: bytes = b"", b: bytes = b"") -> int:
        check(lib.apl_log_append(self._s, kind, flags, file, block, offset, txn, time_ns,
                                 key, len(key), a, len(a), b, len(b), self._serial), "log append")
        return self._serial[0]

    def log_block(self, number: int, *, txn: int, time_ns: int, removed: bool) -> int:
        flags = lib.APL_CEF_REMOVED if removed else 0
        check(lib.apl_log_block(self._s, number, flags, txn, time_ns, self._serial), "log block")
        return self._serial[0]

    def commit_txn(self, txn: int, time_ns: int, tlog: bytes, ops: bytearray) -> int:
        """Apply and log a whole transaction (see apl_commit_txn); returns the
        COMMIT entry's serial. Raises the failing step's error after undoing."""
        failed = self._failed
        rc = lib.apl_commit_txn(self._s, txn, time_ns, tlog, len(tlog), ffi.from_buffer(ops), len(ops),
                                self._serial, failed)
        if rc < 0:
            check(rc, f"commit of transaction {txn} (step {failed[0]})", sb=self.att.sb, step=failed[0])
        return self._serial[0]

    # -- a secondary applying its primary's stream --------------------------------

    def apply_entries(self, blob: bytes | memoryview, after_serial: int, copied: bytearray | None) -> tuple[int, int, int]:
        """Apply whole transactions of `blob` (inside an open batch);
        returns (bytes consumed, last serial applied, last COMMIT/CANCEL serial)."""
        c, ls, lc = self._consumed, self._last, self._lastc
        ls[0] = lc[0] = after_serial
        bits = ffi.from_buffer(copied) if copied is not None else ffi.NULL
        nbits = len(copied) * 8 if copied is not None else 0
        check(lib.apl_apply_entries(self._s, _cbuf(blob), len(blob), after_serial, bits, nbits, c, ls, lc),
              "apply the primary's changes")
        return c[0], ls[0], lc[0]

    def apply_image(self, number: int, image: bytes | None) -> None:
        check(lib.apl_apply_image(self._s, number, image or ffi.NULL, len(image) if image else 0),
              f"apply block {number}")

    def apply_images(self, blob: bytes | memoryview, copied: bytearray) -> None:
        check(lib.apl_apply_images(self._s, _cbuf(blob), len(blob), ffi.from_buffer(copied), len(copied) * 8),
              "apply copied blocks")

    def drop_uncopied(self, copied: bytearray) -> int:
        return check(lib.apl_drop_uncopied(self._s, ffi.from_buffer(copied), len(copied) * 8),
                     "drop blocks the copy did not bring")

    def resume(self, serial: int, txn_next: int) -> None:
        """A cold start: the open batch publishes `serial` as the change log's
        last; transaction numbers go on from at least `txn_next`."""
        check(lib.apl_store_resume(self._s, serial, txn_next), "resume the serial and transaction numbers")

    def set_source(self, serial: int, instance: int) -> None:
        lib.apl_set_source(self._s, serial, instance)

    # -- failover (apl_rewind.c) ----------------------------------------------------

    def log_restart(self, serial: int) -> None:
        """In the open batch: the change log continues at `serial`; the
        entries it held (another history) are dropped."""
        check(lib.apl_log_restart(self._s, serial), "restart the change log")

    def undo_entries(self, blob: bytes) -> tuple[int, list[int]]:
        """In the open batch: undo `blob` (entries, oldest first) newest first
        from its B logs; returns (transactions undone, the block numbers to
        copy from the new primary instead)."""
        nbits = self.att.sb.sb_max_blocks
        copy = bytearray((nbits + 7) // 8)
        txns = ffi.new("uint64_t *")
        check(lib.apl_undo_entries(self._s, blob, len(blob), ffi.from_buffer(copy), nbits, txns),
              "undo the history past the fork")
        return txns[0], bits_set(copy)

    def check_blocks(self, start: int, limit: int, damaged_only: bool, cap: int) -> tuple[list[dict], int]:
        """Block numbers in use in [start, limit) with their file, devices
        (bit i: segment i) and whether their content still matches their
        checksum (apl_check_blocks); only the damaged ones with
        `damaged_only`. Returns (them, the number to go on from)."""
        out = ffi.new("struct apl_blockinfo[]", max(1, min(cap, max(0, limit - start))))
        nxt = ffi.new("uint32_t *")
        n = check(lib.apl_check_blocks(self._s, start, limit, out, len(out), 1 if damaged_only else 0, nxt),
                  "check block checksums")
        return [{"number": b.number, "file": b.file, "devices": b.devices, "damaged": bool(b.damaged),
                 "removed": bool(b.removed)} for b in (out[i] for i in range(n))], nxt[0]

    # -- storage devices out of service and back (cext/apl_devices.c) ----------------

    def detach_device(self, seg: int) -> int:
        """Take device segment `seg` out of service; how many block numbers
        that leaves unavailable until they are refilled."""
        return check(lib.apl_device_detach(self._s, seg), f"detach device {seg}")

    def device_numbers(self, seg: int) -> list[int]:
        """The block numbers with a block of their chain on device `seg`."""
        out, start, cap = [], 0, 1 << 16
        buf, nxt = ffi.new("uint32_t[]", cap), ffi.new("uint32_t *")
        while start < self.att.sb.sb_max_blocks:
            n = check(lib.apl_device_numbers(self._s, seg, start, buf, cap, nxt), f"device {seg}")
            out.extend(buf[0:n])
            start = nxt[0]
        return out

    def device_marked(self, seg: int) -> int:
        """Block numbers of device `seg` not refilled yet."""
        return check(lib.apl_device_marked(self._s, seg), f"device {seg}")

    def renew_device(self, seg: int) -> bool:
        """Give detached device `seg`'s memory back and put it in service,
        empty; False while a version some pin may read still lives there."""
        rc = lib.apl_device_renew(self._s, seg)
        if rc == lib.APL_EBUSY:
            return False
        check(rc, f"renew device {seg}")
        return True

    def fill_device(self, seg: int, numbers: list[int]) -> int:
        """In the open batch: copy these numbers' blocks onto device `seg`."""
        arr = ffi.new("uint32_t[]", numbers) if numbers else ffi.NULL
        return check(lib.apl_device_fill(self._s, seg, arr, len(numbers)), f"fill device {seg}",
                     sb=self.att.sb)

    def expand_into(self, dst: "Writer") -> tuple[int, int]:
        """Lay every live lz4 backup block of this (compressed) store into
        `dst`'s open batch as primary blocks (apl_expand); (blocks, bytes)."""
        blocks, nbytes = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        check(lib.apl_expand(self._s, dst._s, blocks, nbytes), "decompress the backup blocks into primary blocks")
        return blocks[0], nbytes[0]

    def use_reserve(self, on: bool) -> None:
        lib.apl_store_use_reserve(self._s, 1 if on else 0)

    def abort(self) -> dict:
        """Roll the open batch back (apl_batch_abort): nothing of it is
        published; returns the recovery facts (rolled_back ...)."""
        r = ffi.new("struct apl_recovery *")
        check(lib.apl_batch_abort(self._s, r), "abort batch")
        self.in_batch = False
        return _facts(r)

    def publish(self, time_ns: int, last_txn: int) -> int:
        check(lib.apl_batch_publish(self._s, time_ns, last_txn), "publish")
        self.in_batch = False
        return self.att.sb.sb_version

    def reclaim(self) -> int:
        return check(lib.apl_reclaim(self._s), "reclaim")

    def sweep_readers(self) -> int:
        """Clear the slots of processes that are gone (pid free or reused)."""
        return check(lib.apl_sweep_readers(self._s), "sweep readers")

    def readers(self) -> list[SlotInfo]:
        """Every reader slot in use (all of them, whatever rh_high says)."""
        n = self.att.sb.sb_nreaders
        buf = ffi.new("struct apl_slotinfo[]", n)
        got = check(lib.apl_readers_list(self._s, buf, n), "list reader slots")
        return [SlotInfo(b.slot, b.pid, b.start, b.gen, b.pin, b.since_ns, b.kind, bool(b.owned))
                for b in (buf[i] for i in range(got))]

    def own_reader(self, slot: int, pid: int, start: int) -> None:
        """Record that a connected session verified (pid, start) as the slot's owner."""
        check(lib.apl_reader_own(self._s, slot, pid, start), "own reader slot")

    def clear_reader(self, slot: int, pid: int, gen: int) -> bool:
        """Clear the slot if it still holds that claim; True when cleared."""
        return check(lib.apl_reader_clear(self._s, slot, pid, gen), "clear reader slot") == 1

    def next_txn(self) -> int:
        return lib.apl_next_txn(self._s)

    def set_epoch(self, epoch: int) -> None:
        lib.apl_store_set_epoch(self._s, epoch)

    def stats(self) -> dict:
        st = self._stats
        check(lib.apl_store_stats(self._s, st), "stats")
        nseg = self.att.sb.sb_nsegments
        out = {k: getattr(st, k) for k in ("version", "slots_total", "slots_free", "blocks_used",
                                           "max_blocks", "retire_pending", "oldest_pin",
                                           "readers_active", "log_head", "log_tail", "log_size",
                                           "serial", "retained", "horizon", "bytes_used", "bytes_live")}
        if not self.att.compressed:
            out["bytes_used"] = (out["slots_total"] - out["slots_free"]) * self.att.sb.sb_block_size
        out["segment_free"] = [st.seg_free[i] for i in range(nseg)]
        return out


def bits_set(bits: bytes) -> list[int]:
    """The numbers whose bit is set in a bitmap (bit n: byte n // 8, bit n % 8)."""
    out = []
    for i, byte in enumerate(bits):
        if byte:
            base = i * 8
            out.extend(base + k for k in range(8) if byte >> k & 1)
    return out


def _facts(r) -> dict:
    """A struct apl_recovery as a dict."""
    return {k: getattr(r, k) for k in ("rolled_back", "versions_kept", "blocks_live",
                                       "slots_used", "readers_cleared", "log_head")}


def _create_devices(names: SegmentNames, geo: Geometry, mode: int, gid: int | None, made: list) -> list:
    """The device segments, reserved two (or as many as there are cores) at
    a time: reserving is the kernel zeroing pages (posix_fallocate releases
    the GIL), so threads on other cores shorten a start, a cold start and an
    lz4 promote. Every segment made goes into `made` (the caller unlinks
    them if one fails)."""
    workers = max(1, min(geo.nsegments, os.cpu_count() or 1, 4))
    if workers == 1:
        out = []
        for i in range(geo.nsegments):
            out.append(Segment.create(names.device(i), geo.segment_size, mode, gid))
            made.append(out[-1])
        return out
    with ThreadPoolExecutor(workers, thread_name_prefix="appliance-reserve") as pool:
        futs = [pool.submit(Segment.create, names.device(i), geo.segment_size, mode, gid)
                for i in range(geo.nsegments)]
        out, failure = [], None
        for f in futs:
            try:
                out.append(f.result())
                made.append(out[-1])
            except BaseException as e:       # the others are still collected, so each is unlinked
                failure = failure or e
    if failure is not None:
        raise failure
    return out
