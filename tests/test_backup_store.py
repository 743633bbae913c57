"""A secondary's backup store fed from a primary's change log, in one process:
block-for-block identity, uncompressed and lz4-compressed, and crash rollback."""
from __future__ import annotations

import random
import time

import msgpack
import pytest

from appliance import errors
from appliance._native import ffi, lib
from appliance.controller.txn import step
from appliance.store.keys import encode_int, encode_str
from appliance.store.reader import Reader
from appliance.store.segment import Attachment, Geometry, unlink_all
from appliance.store.writer import FileSpec, Writer

from store_helpers import unique_name

FILES = [FileSpec("t", lib.APL_FILE_PRIMARY, 0), FileSpec("t.a", lib.APL_FILE_ALTKEY, 0)]
TXI, TXU, TXD = lib.APL_TXN_INSERT, lib.APL_TXN_UPDATE, lib.APL_TXN_DELETE


def geometry(compressed=False, block_size=1024, segment_size=8 << 20):
    return Geometry(block_size=block_size, nsegments=2, segment_size=segment_size, nfiles=2, max_overflow=1,
                    nreaders=16, log_size=4 << 20, compressed=compressed, max_blocks=1 << 16)


@pytest.fixture
def stores():
    names = []

    def make(compressed=False, **kw):
        name = unique_name()
        names.append(name)
        return Writer.create(name, geometry(compressed, **kw), mode=0o600, gid=None, schema_hash=1, files=FILES,
                             reserve_slots=8)
    yield make
    for n in names:
        unlink_all(n, 2)


class Stream:
    """Drives a primary with random transactions and ships its log to secondaries."""

    def __init__(self, primary: Writer, seed: int = 1) -> None:
        self.p = primary
        self.reader = Reader(primary.att)
        self.rng = random.Random(seed)
        self.model: dict[int, tuple[bytes, str]] = {}
        self.pos = ffi.new("uint64_t *", 0)
        self.out = ffi.new("uint8_t[]", 1 << 22)
        self.fs, self.ls, self.cnt = (ffi.new("uint64_t *") for _ in range(3))
        self.txn = 0

    def batch(self, txns: int = 4, big: bool = False) -> None:
        rng, p = self.rng, self.p
        p.begin()
        for _ in range(txns):
            ops = bytearray()
            for _ in range(rng.randrange(1, 8)):
                k = rng.randrange(3000)
                if k in self.model and rng.random() < 0.3:
                    v, br = self.model.pop(k)
                    step(ops, TXD, 0, encode_int(k), b"")
                    step(ops, TXD, 1, encode_str(br) + encode_int(k), b"")
                elif k in self.model:
                    v = msgpack.packb({"id": k, "x": "u" * rng.randrange(0, 300 if big else 120)})
                    step(ops, TXU, 0, encode_int(k), v)
                    self.model[k] = (v, self.model[k][1])
                else:
                    br = "b%d" % rng.randrange(20)
                    v = msgpack.packb({"id": k, "x": "i" * rng.randrange(0, 120)})
                    step(ops, TXI, 0, encode_int(k), v)
                    step(ops, TXI, 1, encode_str(br) + encode_int(k), b"")
                    self.model[k] = (v, br)
            self.txn += 1
            p.commit_txn(self.txn, time.time_ns(), b"\x90", ops)
        p.publish(time.time_ns(), 0)
        p.reclaim()

    def export(self, opts: int) -> bytes:
        n = lib.apl_log_export(self.reader.view, self.pos, self.out, 1 << 22, opts, 0, self.fs, self.ls, self.cnt)
        assert n >= 0, n
        return bytes(ffi.buffer(self.out, n))


class Secondary:
    def __init__(self, w: Writer) -> None:
        self.w = w
        self.applied = 0
        self.pending = b""

    def apply(self, blob: bytes, publish: bool = True, copied: bytearray | None = None) -> None:
        data = self.pending + blob
        self.w.begin()
        consumed, last, _ = self.w.apply_entries(data, self.applied, copied)
        self.pending = data[consumed:]
        if consumed:
            self.applied = last
            self.w.set_source(last, 7)
        if publish:
            self.w.publish(time.time_ns(), 0)
            self.w.reclaim()


def streamed_pair(stores, compressed: bool, seed: int, batches: int) -> tuple[Writer, Secondary, Stream]:
    """A primary and a secondary fed `batches` batches of its log: (primary, secondary, stream)."""
    p = stores()
    sec = Secondary(stores(compressed=compressed))
    s = Stream(p, seed=seed)
    for _ in range(batches):
        s.batch()
        sec.apply(s.export(0))
    return p, sec, s


def differing(a: Writer, b: Writer) -> list[int]:
    ra, rb = Reader(a.att), Reader(b.att)
    lim = max(ra.block_limit(), rb.block_limit())
    return [n for n in range(lim) if ra.block_checksum(n) != rb.block_checksum(n)]


class TestIdentity:
    @pytest.mark.parametrize("opts", [0, lib.APL_EXPORT_DELTA | lib.APL_EXPORT_NO_B])
    def test_uncompressed_and_compressed_secondaries_match_the_primary(self, stores, opts):
        """Applying the exported log keeps both kinds of secondary identical, block for block, every batch."""
        p = stores()
        plain, packed = Secondary(stores()), Secondary(stores(compressed=True))
        s = Stream(p, seed=opts + 3)
        for i in range(150):
            s.batch(big=i % 10 == 0)
            blob = s.export(opts)
            plain.apply(blob)
            packed.apply(blob)
            if i % 25 == 0:
                assert differing(p, plain.w) == [] and differing(p, packed.w) == []
        assert differing(p, plain.w) == [] and differing(p, packed.w) == []
        rp = Reader(p.att)
        assert Reader(packed.w.att).count(0) == rp.count(0) == len(s.model)
        assert Reader(plain.w.att).count(1) == rp.count(1) == len(s.model)
        sb = packed.w.att.sb
        assert sb.sb_pub[sb.sb_version & 1].pb_source_serial == plain.applied == s.ls[0]

    def test_compressed_store_refuses_record_reads(self, stores):
        """Readers of a compressed store get APL_ENOREAD; its block images still come back whole."""
        packed = stores(compressed=True)
        r = Reader(packed.att)
        with pytest.raises(errors.NotServingReadsError):
            r.get_raw(0, encode_int(1))
        with pytest.raises(errors.NotServingReadsError):
            list(r.scan_raw(0, None, None))
        assert r.block_image(0) is not None

    def test_compressed_memory_is_under_half_of_the_primary(self, stores):
        """With lz4 the backup objects take less than half of the primary's block memory."""
        p = stores(block_size=4096, segment_size=32 << 20)
        packed = Secondary(stores(compressed=True, block_size=4096, segment_size=32 << 20))
        s = Stream(p, seed=9)
        for _ in range(400):
            s.batch(txns=8)
            packed.apply(s.export(0))
        assert differing(p, packed.w) == []
        primary_bytes = p.stats()["bytes_used"]
        st = packed.w.stats()
        assert st["bytes_live"] < 0.5 * primary_bytes, (st, primary_bytes)


class TestCrash:
    @pytest.mark.parametrize("compressed", [False, True])
    def test_unpublished_apply_rolls_back(self, stores, compressed):
        """A batch applied but not published is gone after recovery; applying continues from there."""
        p, sec, s = streamed_pair(stores, compressed, seed=11, batches=40)
        before = {n: Reader(sec.w.att).block_checksum(n) for n in range(Reader(sec.w.att).block_limit())}
        applied = sec.applied
        for _ in range(5):
            s.batch()
        sec.apply(s.export(0), publish=False)          # "crash" before publish
        name = sec.w.att.name
        w2 = Writer(Attachment(name, writable=True), 8)
        facts = w2.recover()
        assert facts["rolled_back"] > 0
        after = {n: Reader(w2.att).block_checksum(n) for n in range(Reader(w2.att).block_limit())}
        assert {k: v for k, v in after.items() if v} == {k: v for k, v in before.items() if v}
        sb = w2.att.sb
        assert sb.sb_pub[sb.sb_version & 1].pb_source_serial == applied
        # resume from the published serial: re-export from the log position after it
        sec2 = Secondary(w2)
        sec2.applied = applied
        rc = lib.apl_log_seek(s.reader.view, applied + 1, s.pos)
        assert rc == 0
        for _ in range(10):
            s.batch()
        sec2.apply(s.export(0))
        assert differing(p, w2) == []


class TestPartialTransactions:
    @pytest.mark.parametrize("compressed", [False, True])
    def test_a_transaction_cut_across_messages_is_applied_once_whole(self, stores, compressed):
        """Entries ending mid-transaction apply nothing of it; with the rest it applies once (counts exact)."""
        p = stores(block_size=4096, segment_size=32 << 20)
        sec = Secondary(stores(compressed=compressed, block_size=4096, segment_size=32 << 20))
        s = Stream(p, seed=21)
        ops = bytearray()
        for i in range(3000):   # one big transaction with many splits, like a bulk load
            v = msgpack.packb({"id": i, "x": "y" * 40})
            step(ops, TXI, 0, encode_int(i), v)
            step(ops, TXI, 1, encode_str("b%d" % (i % 30)) + encode_int(i), b"")
        p.begin()
        p.commit_txn(1, time.time_ns(), b"\x90", ops)
        p.publish(time.time_ns(), 1)
        blob = s.export(0)
        cuts = [len(blob) // 3, 2 * len(blob) // 3]
        cut_at = [0]
        for c in cuts:   # cut at entry boundaries near 1/3 and 2/3
            pos = cut_at[-1]
            from appliance.store.changelog import ENTRY
            while pos + ENTRY.size <= len(blob) and pos < c:
                pos += ENTRY.unpack_from(blob, pos)[0]
            cut_at.append(pos)
        cut_at.append(len(blob))
        for a, b in zip(cut_at, cut_at[1:]):
            sec.apply(blob[a:b])
            if b < len(blob):
                assert Reader(sec.w.att).count(0) == 0 and sec.applied == 0
        assert Reader(sec.w.att).count(0) == 3000 and Reader(sec.w.att).count(1) == 3000
        assert differing(p, sec.w) == []


def copy_while_writing(s: Stream, sec: Secondary, step, cap) -> tuple[int, int]:
    """A first copy as the relay runs it, in one process: each round the primary does `step(round)`,
    its log goes to the secondary (changes to blocks not copied yet dropped), then the images of the
    next numbers at a pinned version (`cap(round)` bytes); the end drops what was not copied.
    Returns (rounds, numbers sent as absent)."""
    r = Reader(s.p.att)
    copied = bytearray((1 << 16) // 8)
    n, rounds, absent = 0, 0, 0
    while True:
        step(rounds)
        sec.apply(s.export(0), copied=copied)
        limit = r.block_limit()
        if n >= limit:
            break
        pin = r.pin()
        try:
            batch, n = r.block_images(n, pin.version, cap(rounds), limit)
        finally:
            pin.close()
        pos = 0
        while pos < len(batch):                 # (u32 number, u32 length, image)*
            length = int.from_bytes(batch[pos + 4:pos + 8], "little")
            absent += length == 0
            pos += 8 + length
        sec.w.begin()
        sec.w.apply_images(batch, copied)
        sec.w.publish(time.time_ns(), 0)
        sec.w.reclaim()
        rounds += 1
    sec.w.begin()
    sec.w.drop_uncopied(copied)
    sec.w.publish(time.time_ns(), 0)
    return rounds, absent


class TestCopyWhileWriting:
    @staticmethod
    def commit(s: Stream, inserts=(), deletes=()) -> None:
        ops = bytearray()
        for k in deletes:
            v, br = s.model.pop(k)
            step(ops, TXD, 0, encode_int(k), b"")
            step(ops, TXD, 1, encode_str(br) + encode_int(k), b"")
        for k in inserts:
            v = msgpack.packb({"id": k, "x": "z" * 60})
            step(ops, TXI, 0, encode_int(k), v)
            step(ops, TXI, 1, encode_str("b%d" % (k % 7)) + encode_int(k), b"")
            s.model[k] = (v, "b%d" % (k % 7))
        s.txn += 1
        s.p.begin()
        s.p.commit_txn(s.txn, time.time_ns(), b"\x90", ops)
        s.p.publish(time.time_ns(), 0)
        s.p.reclaim()

    @staticmethod
    def start(s: Stream, sec: Secondary) -> None:
        s.export(0)                             # the copy starts here: the log before it is not shipped
        sec.applied = s.ls[0]

    @staticmethod
    def stream_on(s: Stream, sec: Secondary) -> None:
        """After the copy: every change applies; identical block for block, same counts."""
        for _ in range(20):
            s.batch(txns=8)
            sec.apply(s.export(0))
        assert differing(s.p, sec.w) == []
        assert Reader(sec.w.att).count(0) == Reader(s.p.att).count(0) == len(s.model)

    @pytest.mark.parametrize("compressed", [False, True])
    def test_numbers_freed_before_the_cursor_and_reused_reach_the_secondary(self, stores, compressed):
        """A first copy in small batches while the primary reuses block numbers the copy has passed
        (freed by deletes before the copy, taken by inserts during it); the secondary ends identical
        and streams on."""
        p = stores()
        sec = Secondary(stores(compressed=compressed))
        s = Stream(p)
        for lo in range(0, 3000, 100):
            self.commit(s, inserts=range(lo, lo + 100))
        self.commit(s, deletes=range(0, 1000))        # empty leaves: their numbers are freed
        self.start(s, sec)
        new = iter(range(10_000, 20_000, 40))

        def step(rnd):
            if 2 < rnd < 15:                        # the cursor is past the freed numbers: reuse them
                lo = next(new)
                self.commit(s, inserts=range(lo, lo + 40))
        rounds, absent = copy_while_writing(s, sec, step, lambda rnd: 4000)
        assert rounds > 10 and absent > 0, (rounds, absent)   # the case is exercised
        assert differing(p, sec.w) == []
        self.stream_on(s, sec)

    @pytest.mark.parametrize("seed", [3, 18, 29])
    @pytest.mark.parametrize("compressed", [False, True])
    def test_random_workload_during_a_copy(self, stores, compressed, seed):
        """Random inserts, updates, deletes (and a mass delete before, half the time) while a copy runs
        in batches of random size; the secondary ends identical and streams on."""
        rng = random.Random(seed)
        p = stores()
        sec = Secondary(stores(compressed=compressed))
        s = Stream(p, seed=seed)
        for _ in range(rng.randrange(10, 80)):
            s.batch(txns=8, big=rng.random() < 0.2)
        if rng.random() < 0.5:
            self.commit(s, deletes=sorted(s.model)[:len(s.model) // 3])
        self.start(s, sec)

        def step(rnd):
            if rnd < 40:
                s.batch(txns=rng.randrange(1, 6), big=rng.random() < 0.2)
        copy_while_writing(s, sec, step, lambda rnd: rng.choice([2000, 5000, 20000]))
        assert differing(p, sec.w) == []
        self.stream_on(s, sec)


def corrupt_last_count_change(blob: bytes) -> bytes:
    """`blob` with its last INSERT or DELETE entry naming file 250 (there is none): the
    entries before it apply, that one fails (APL_ECORRUPT) in the middle of the batch."""
    from appliance.store.changelog import E_FILE, E_KIND, E_LEN, ENTRY
    out = bytearray(blob)
    pos, last = 0, None
    while pos + ENTRY.size <= len(out):
        f = ENTRY.unpack_from(out, pos)
        if f[E_KIND] in (lib.APL_CE_INSERT, lib.APL_CE_DELETE):
            last = pos
        pos += f[E_LEN]
    assert last is not None, "no insert or delete in the blob"
    out[last + 8:last + 12] = (250).to_bytes(4, "little")   # ce_file (apl_layout.h)
    assert ENTRY.unpack_from(out, last)[E_FILE] == 250
    return bytes(out)


class TestAbort:
    @pytest.mark.parametrize("compressed", [False, True])
    def test_a_failed_apply_is_rolled_back_in_process(self, stores, compressed):
        """An apply that fails part-way (its earlier entries already changed blocks) is undone by
        apl_batch_abort in the same process, while a reader keeps its pin: the blocks, the applied
        serial and the slot accounting are those a restart's recovery would give, and applying
        goes on from the same serial."""
        p, sec, s = streamed_pair(stores, compressed, seed=17, batches=30)
        r = Reader(sec.w.att)
        sums = {n: r.block_checksum(n) for n in range(r.block_limit())}
        st0 = sec.w.stats()
        pin = r.pin() if not compressed else None     # a reader in the middle of the failed batch
        applied = sec.applied
        for _ in range(3):
            s.batch(txns=6)
        bad = corrupt_last_count_change(s.export(0))
        sec.w.begin()
        with pytest.raises(errors.CorruptionError):
            sec.w.apply_entries(bad, sec.applied, None)
        st_mid = sec.w.stats()
        keys = ("slots_free", "blocks_used", "bytes_used", "bytes_live", "retire_pending")
        changed = {k: st_mid[k] for k in keys} != {k: st0[k] for k in keys}
        assert changed, "the failing apply changed nothing before it failed: the case is not exercised"
        facts = sec.w.abort()
        assert facts["rolled_back"] > 0 and not sec.w.in_batch
        if pin is not None:
            assert {n: r.block_checksum(n, pin.version) for n in sums} == sums
            pin.close()
        assert {n: r.block_checksum(n) for n in range(r.block_limit())} == sums
        sb = sec.w.att.sb
        assert sb.sb_pub[sb.sb_version & 1].pb_source_serial == applied
        # the next batch publishes normally and the allocator agrees with a fresh recovery
        assert lib.apl_log_seek(s.reader.view, applied + 1, s.pos) == 0
        sec.apply(s.export(0))
        for _ in range(5):
            s.batch()
            sec.apply(s.export(0))
        assert differing(p, sec.w) == []
        sec.w.begin()                       # one more version: every retired one is reclaimable
        sec.w.publish(time.time_ns(), 0)
        sec.w.reclaim()
        mine = sec.w.stats()
        fresh = Writer(Attachment(sec.w.att.name, writable=True), 8)
        try:
            fresh.recover()
            theirs = fresh.stats()
        finally:
            fresh.close()
        assert mine["retire_pending"] == 0
        # A compressed store keeps a page in its class once classed, even when its
        # last object is freed (apl_bstore.c); recovery returns empty pages to the
        # free pool. So its running count may hold more pages than a recovery's,
        # never fewer, and everything else agrees.
        keys = ("blocks_used", "bytes_live") if compressed else ("slots_free", "blocks_used", "bytes_used", "bytes_live")
        assert {k: mine[k] for k in keys} == {k: theirs[k] for k in keys}
        if compressed:
            assert mine["bytes_used"] >= theirs["bytes_used"] and mine["slots_free"] <= theirs["slots_free"]

    def test_abort_without_a_batch_is_refused(self, stores):
        """apl_batch_abort with no open batch is APL_EBATCH and changes nothing."""
        w = stores()
        version = w.att.sb.sb_version
        with pytest.raises(errors.InternalError) as err:
            w.abort()
        assert err.value.code == "APL_EBATCH" and w.att.sb.sb_version == version


class TestNumberReuse:
    """The primary frees a removed block number once its readers have passed it and reuses the
    newest freed number first; a secondary whose reclaim lags (a snapshot pins it, or several of the
    primary's batches arrive in one apply) sees the number come back while its removal is still
    queued. The re-created block must survive that removal's reclaim."""

    @staticmethod
    def run(s: Stream, rng: random.Random, rounds: int) -> list:
        """Rounds of the serving-secondary workload: one transaction inserts 1,500 consecutive keys
        at a random start, the next deletes 1,500 consecutive keys at another (records 1-200 bytes);
        each transaction is its own batch on the primary. Returns the exported blob of each batch."""
        blobs = []
        for i in range(rounds):
            ops = bytearray()
            lo = rng.randrange(20_000)
            for k in range(lo, lo + 1500):
                if i % 2 == 0 and k not in s.model:
                    v = msgpack.packb({"id": k, "x": "v" * rng.randrange(0, 190)})
                    step(ops, TXI, 0, encode_int(k), v)
                    step(ops, TXI, 1, encode_str("b%d" % (k % 7)) + encode_int(k), b"")
                    s.model[k] = (v, "b%d" % (k % 7))
                elif i % 2 == 1 and k in s.model:
                    _, br = s.model.pop(k)
                    step(ops, TXD, 0, encode_int(k), b"")
                    step(ops, TXD, 1, encode_str(br) + encode_int(k), b"")
            s.txn += 1
            s.p.begin()
            s.p.commit_txn(s.txn, time.time_ns(), b"\x90", ops)
            s.p.publish(time.time_ns(), 0)
            s.p.reclaim()
            blobs.append(s.export(0))
        return blobs

    @pytest.mark.parametrize("compressed", [False, True])
    def test_removed_then_recreated_in_one_apply(self, stores, compressed):
        """The primary removes numbers (a mass delete), frees them, and reuses them in its next batch;
        the secondary gets both batches in one apply: nothing it holds is dropped by the reclaim."""
        p = stores(segment_size=32 << 20)
        sec = Secondary(stores(compressed=compressed, segment_size=32 << 20))
        s = Stream(p)
        TestCopyWhileWriting.commit(s, inserts=range(0, 3000))
        sec.apply(s.export(0))
        TestCopyWhileWriting.commit(s, deletes=range(1000, 2000))   # empties leaves: numbers removed
        TestCopyWhileWriting.commit(s, inserts=range(5000, 6000))   # new leaves take those numbers
        sec.apply(s.export(0))
        assert differing(p, sec.w) == []
        TestCopyWhileWriting.stream_on(s, sec)

    @pytest.mark.parametrize("compressed", [False, True])
    @pytest.mark.parametrize("seed", [1, 2, 3])
    def test_serving_workload_under_snapshots(self, stores, compressed, seed):
        """R0's workload, in process: a reader on the secondary holds a snapshot over a random number
        of applies, and the applier coalesces a random number of the primary's batches per apply.
        After every apply the secondary is block-for-block the primary, and the snapshot still reads
        the state it pinned."""
        rng = random.Random(seed)
        p = stores(segment_size=32 << 20)
        sw = stores(compressed=compressed, segment_size=32 << 20)
        sec = Secondary(sw)
        s = Stream(p, seed=seed)
        sreader = Reader(sw.att)
        pin, pinned_count, held = None, None, 0
        for _ in range(25):
            blobs = self.run(s, rng, rng.randrange(1, 4))
            if pin is None and rng.random() < 0.7:
                pin = sreader.pin()
                pinned_count = sreader.count(0, pin.version)
                held = rng.randrange(1, 5)
            sec.apply(b"".join(blobs))
            assert differing(p, sw) == []
            if pin is not None:
                assert sreader.count(0, pin.version) == pinned_count
                held -= 1
                if held == 0:
                    pin.close()
                    pin = None
        if pin is not None:
            pin.close()
        sec.apply(b"")
        assert differing(p, sw) == []
        assert Reader(sw.att).count(0) == len(s.model)
