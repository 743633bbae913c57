"""The C store (the writer and reader sides in cext/) held against a plain Python model.

Every store is created by tests/store_helpers.Store under a unique name and is
unlinked by the test that made it; the `stores` fixture and the module-level
finalizer unlink whatever a failing test left behind.
"""
from __future__ import annotations

import math
import os
import random
import subprocess
import threading
import time

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, precondition, rule,
                                 run_state_machine_as_test)

from appliance import errors
from appliance._native import ffi, lib
from appliance.store.keys import decode_int, encode_bytes, encode_int, encode_str
from appliance.store.segment import Attachment, Geometry, Segment, SegmentNames, exists
from appliance.store.writer import FileSpec, Writer

from store_helpers import (CE_HDR, HDR, INSERT, SLOT, UPDATE, UPSERT, ReservedName, Store, audit_slots,
                           block_at, check_range, check_state, damage, file_entry, live_numbers,
                           log_bounds, max_key, max_value, mp_value, parse_image, read_log,
                           keys_at, unlink_leftovers, walk_tree)

FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.data_too_large])


@pytest.fixture(autouse=True, scope="module")
def _unlink_everything():
    """Finalizer: unlink every store of this module a test failed to remove."""
    yield
    left = unlink_leftovers()
    assert not left, f"tests left these stores linked: {left}"


# ----------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------

def key_strategy(block_size: int):
    mk = max_key(block_size)
    return st.one_of(
        st.integers(-40, 40).map(encode_int),                      # dense: collisions
        st.integers(-(1 << 63), (1 << 63) - 1).map(encode_int),
        st.text(alphabet="ab\x00\u00e9", max_size=12).map(encode_str),  # shared 8-byte prefixes
        st.binary(max_size=10).map(encode_bytes),
        st.binary(min_size=1, max_size=10),                        # raw: proper prefixes sort first
        st.builds(lambda n, c: encode_str(c * n), st.integers(mk - 12, mk - 2), st.sampled_from("ab")),
    )


def value_sizes(vmax: int):
    return st.one_of(st.integers(0, 24), st.integers(0, vmax), st.just(vmax))


def rand_value(rnd: random.Random, vmax: int) -> bytes:
    size = rnd.choice([rnd.randint(0, 24), rnd.randint(0, vmax), vmax])
    return mp_value(size, rnd.getrandbits(32))


# ----------------------------------------------------------------------------
# A random-operation model of one file
# ----------------------------------------------------------------------------

class Model:
    """Applies changes to a Store's file 0 and to a dict, checking every answer.

    A MemoryFullError is accepted only when `may_fill`; the change must then
    have changed nothing (the dict is left alone and later checks compare)."""

    def __init__(self, store: Store, *, may_fill: bool = False) -> None:
        self.store = store
        self.may_fill = may_fill
        self.model: dict[bytes, bytes] = {}
        self.published: dict[bytes, bytes] = {}
        self.full = 0
        self.changes = 0  # successful changes since the last publish

    @property
    def w(self):
        return self.store.writer

    def _refused(self, exc: errors.MemoryFullError) -> None:
        """A change refused for want of memory: fine in a store that may fill (later
        checks show it changed nothing), a failure anywhere else."""
        if not self.may_fill:
            raise exc
        self.full += 1

    def put(self, key: bytes, value: bytes, mode: int) -> None:
        self.store.begin()
        present = key in self.model
        if mode == INSERT and present:
            with pytest.raises(errors.DuplicateKeyError):
                self.w.put(0, key, value, mode)
            return
        if mode == UPDATE and not present:
            with pytest.raises(errors.NoSuchRecordError):
                self.w.put(0, key, value, mode)
            return
        try:
            kind, old = self.w.put(0, key, value, mode)
        except errors.MemoryFullError as exc:
            return self._refused(exc)
        if present:
            assert (kind, old) == (lib.APL_CE_UPDATE, self.model[key])
        else:
            assert (kind, old) == (lib.APL_CE_INSERT, None)
        self.model[key] = value
        self.changes += 1

    def delete(self, key: bytes) -> None:
        self.store.begin()
        if key not in self.model:
            with pytest.raises(errors.NoSuchRecordError):
                self.w.delete(0, key)
            return
        try:
            old = self.w.delete(0, key)
        except errors.MemoryFullError as exc:
            return self._refused(exc)
        assert old == self.model.pop(key)
        self.changes += 1

    def publish(self, absent=(), audit: bool = True) -> None:
        """Publish, reclaim, and hold everything readable against the dict (and,
        when nothing is pinned, audit the slots)."""
        self.store.publish()
        self.published = dict(self.model)
        self.changes = 0
        check_state(self.store, self.published, absent=absent)
        if audit:
            audit_slots(self.store)

    @classmethod
    def loaded(cls, store: Store, rnd: random.Random, n: int) -> "Model":
        """A model of `store` after n random changes, published."""
        m = cls(store)
        m.random_ops(rnd, n)
        m.publish()
        return m

    def random_ops(self, rnd: random.Random, n: int, *, int_keys: int = 400) -> None:
        """n random changes: single puts/deletes and runs of inserts/deletes."""
        bs = self.store.block_size
        for _ in range(n):
            op = rnd.random()
            if op < 0.45:
                key = encode_int(rnd.randrange(int_keys)) if rnd.random() < 0.8 else \
                    encode_str("k" * rnd.randint(0, 30) + str(rnd.random()))
                self.put(key, rand_value(rnd, max_value(bs, len(key))),
                         rnd.choice([INSERT, UPDATE, UPSERT]))
            elif op < 0.75 and self.model:
                self.delete(rnd.choice(sorted(self.model)))
            elif op < 0.9:
                base = rnd.randrange(int_keys)
                for i in range(rnd.randint(5, 60)):
                    self.put(encode_int(base + i), mp_value(rnd.randint(0, 40), i), UPSERT)
            elif self.model:
                keys = sorted(self.model)
                start = rnd.randrange(len(keys))
                for k in keys[start:start + rnd.randint(5, 60)]:
                    self.delete(k)


def pinned_by_dead_reader(s: Store, seed: int) -> Model:
    """Leave a pin whose owner process is gone (as if killed) behind a further batch."""
    rnd = random.Random(seed)
    m = Model.loaded(s, rnd, 100)
    pin = s.pin()
    dead = subprocess.Popen(["true"])
    dead.wait()
    slots = ffi.cast("struct apl_reader *", s.reader.att.readers.ptr + ffi.sizeof("struct apl_rhdr"))
    slots[pin._slot].rs_pid = dead.pid
    s.pins.remove(pin)
    pin._reader = None  # the slot is not ours any more: never release it
    m.random_ops(rnd, 100)
    m.publish(audit=False)
    assert s.writer.stats()["retire_pending"] > 0
    return m


class StoreMachine(RuleBasedStateMachine):
    """Random puts (insert/update/upsert), deletes, runs of them and batch
    boundaries on one file, checked against a dict after every publish; reads
    between publishes must see the last published state."""

    block_size = 1024
    max_overflow = 1
    store_kw: dict = {}
    may_fill = False
    full_hits = 0

    def __init__(self) -> None:
        super().__init__()
        self.store = Store(block_size=self.block_size, max_overflow=self.max_overflow, **self.store_kw)
        self.m = Model(self.store, may_fill=self.may_fill)
        self.keys = key_strategy(self.block_size)

    def teardown(self) -> None:
        type(self).full_hits += self.m.full
        self.store.close()

    @initialize(n=st.sampled_from([0, 0, 200, 1500]), size=st.integers(0, 150),
                seed=st.integers(0, 1 << 16))
    def preload(self, n, size, seed):
        """Start some examples from a tree that already has several levels."""
        rnd = random.Random(seed)
        for k in rnd.sample(range(-5000, 5000), n):
            if self.m.full:  # a tiny store is full
                break
            self.m.put(encode_int(k), mp_value(rnd.randint(0, size), k), INSERT)
        self.m.publish()

    def _key(self, data) -> bytes:
        if self.m.model and data.draw(st.booleans()):
            return data.draw(st.sampled_from(sorted(self.m.model)))
        return data.draw(self.keys)

    def _bound(self, data):
        choice = data.draw(st.integers(0, 2))
        if choice == 0:
            return None
        if choice == 1 and self.m.published:
            return data.draw(st.sampled_from(sorted(self.m.published)))
        return data.draw(self.keys)

    @rule(data=st.data(), mode=st.sampled_from([INSERT, UPDATE, UPSERT]))
    def put(self, data, mode):
        key = self._key(data)
        size = data.draw(value_sizes(max_value(self.block_size, len(key))))
        self.m.put(key, mp_value(size, data.draw(st.integers(0, 1 << 32))), mode)

    @rule(data=st.data())
    def delete(self, data):
        self.m.delete(self._key(data))

    @rule(base=st.integers(-1000, 1000), n=st.integers(5, 80), size=st.integers(0, 60),
          step=st.sampled_from([1, 1, 2, -1]))
    def insert_run(self, base, n, size, step):
        for i in range(n):
            self.m.put(encode_int(base + i * step), mp_value(size, i), UPSERT)

    @precondition(lambda self: len(self.m.model) > 3)
    @rule(data=st.data(), reverse=st.booleans())
    def delete_run(self, data, reverse):
        keys = sorted(self.m.model)
        start = data.draw(st.integers(0, len(keys) - 1))
        run = keys[start:start + data.draw(st.one_of(st.integers(1, 80), st.integers(1, 600)))]
        for k in reversed(run) if reverse else run:
            self.m.delete(k)

    @rule(data=st.data(), lo_incl=st.booleans())
    def publish(self, data, lo_incl):
        self.m.publish(absent=[data.draw(self.keys) for _ in range(3)])
        check_range(self.store.reader, 0, self.m.published, self._bound(data), self._bound(data), lo_incl)

    @rule(data=st.data(), lo_incl=st.booleans())
    def read_range(self, data, lo_incl):
        """Reads (inside or outside a batch) see exactly the last published state."""
        lo, hi = self._bound(data), self._bound(data)
        check_range(self.store.reader, 0, self.m.published, lo, hi, lo_incl)
        key = self._key(data)
        assert self.store.reader.get_raw(0, key) == self.m.published.get(key)
        assert self.store.reader.count(0) == len(self.m.published)


class TinyStoreMachine(StoreMachine):
    """The same on a store of 46 slots: MemoryFullError must change nothing."""

    store_kw = {"nsegments": 2, "segment_size": 24 << 10, "reserve_slots": 3}
    may_fill = True

    @rule(on=st.booleans())
    def reserve(self, on):
        self.store.writer.use_reserve(on)


def machine(block_size: int, max_overflow: int, base=StoreMachine):
    return type(f"{base.__name__}_{block_size}_{max_overflow}", (base,),
                {"block_size": block_size, "max_overflow": max_overflow, "full_hits": 0})


# ----------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------

class TestBlocks:
    @pytest.mark.parametrize("max_overflow", [0, 1, 3])
    @pytest.mark.parametrize("block_size", [1024, 4096])
    def test_random_operations_match_a_dict(self, block_size, max_overflow):
        """Random puts/deletes/batches keep get, count, scans, ranges and the tree equal to a dict."""
        run_state_machine_as_test(
            machine(block_size, max_overflow),
            settings=settings(FAST, max_examples=30, stateful_step_count=50))

    @pytest.mark.parametrize("max_overflow", [0, 3])
    def test_seeded_long_runs_match_a_dict(self, stores, max_overflow):
        """Long seeded runs of random changes over many batches stay equal to a dict."""
        for bs in (1024, 4096):
            s = stores(block_size=bs, max_overflow=max_overflow, segment_size=4 << 20)
            m = Model(s)
            rnd = random.Random(bs * 10 + max_overflow)
            for _ in range(30):
                m.random_ops(rnd, rnd.randint(1, 40))
                m.publish(absent=[encode_int(-1), encode_str("nope")])

    @pytest.mark.parametrize("order", ["random", "key"])
    @pytest.mark.parametrize("max_overflow", [0, 1])
    def test_inserts_leave_leaves_well_filled(self, stores, max_overflow, order):
        """After inserts in random order, leaves hold at least 72% of their bytes in records with
        2-block chains and 63% with 1-block ones (a full chain first shares records with a sibling
        that has room, apl_tree.c share_with_sibling: 76% and 69% here; splits alone leave 65% and
        55%), and at least 95% after inserts in key order; the tree stays valid and equal to a dict."""
        bsize = 4096
        s = stores(block_size=bsize, max_overflow=max_overflow, segment_size=16 << 20)
        m = Model(s)
        keys = list(range(12_000))
        if order == "random":
            random.Random(max_overflow).shuffle(keys)
        for at in range(0, len(keys), 400):
            for k in keys[at:at + 400]:
                m.put(encode_int(k), mp_value(88, k), INSERT)
            m.publish(audit=False)
        m.publish()
        tree = walk_tree(s.reader, 0)
        counts = audit_slots(s)
        leaf_blocks = counts["slots_used"] - tree.inner - 1          # less the inner blocks and the meta block
        in_records = sum(SLOT + max(len(k) - 8, 0) + len(v) for k, v in tree.records)   # slot + heap bytes
        fill = in_records / (leaf_blocks * (bsize - HDR))
        floor = 0.95 if order == "key" else 0.72 if max_overflow else 0.63
        assert fill >= floor, f"leaves {fill:.1%} full"

    def test_a_sibling_that_cannot_be_copied_makes_the_chain_split_instead(self, stores):
        """A full chain whose right sibling has room but is damaged (its bytes no longer match
        its checksum, so it cannot be copied into a new version) splits as it would without
        sharing: the insert succeeds, and the damaged sibling is left as it was."""
        s = stores(block_size=1024, max_overflow=0, segment_size=4 << 20)
        s.begin()
        for k in range(0, 2000, 10):                 # key order: leaves filled up
            s.writer.put(0, encode_int(k), mp_value(40, k), INSERT)
        s.publish()
        att = s.writer.att
        root = parse_image(s.reader.block_image(file_entry(att, 0).fl_root))
        assert root.level == 1 and len(root.records) > 5
        a_num, b_num = root.records[2][1], root.records[3][1]
        a_keys = [k for k, _, _ in parse_image(s.reader.block_image(a_num)).records]
        b_keys = [k for k, _, _ in parse_image(s.reader.block_image(b_num)).records]
        s.begin()
        for k in b_keys[: len(b_keys) // 2]:         # the sibling with room to share
            s.writer.delete(0, k)
        s.publish()
        addr = live_numbers(att)[b_num]
        damage(s.name, addr >> 48, addr & ((1 << 48) - 1), 1024)
        damaged = s.reader.block_checksum(b_num)
        s.begin()
        new = encode_int(decode_int(a_keys[0]) + 1)  # into the full chain
        s.writer.put(0, new, mp_value(40, 1), INSERT)
        s.publish()
        assert s.reader.get_raw(0, new) == mp_value(40, 1)
        assert live_numbers(att)[b_num] == addr and s.reader.block_checksum(b_num) == damaged
        assert parse_image(s.reader.block_image(file_entry(att, 0).fl_root)).records[3][1] != b_num

    def test_empty_values_and_empty_file(self, stores):
        """Empty values are stored and read back; an emptied file reads as empty and refills."""
        s = stores()
        m = Model(s)
        for i in range(200):
            m.put(encode_int(i), b"", INSERT)
        m.publish()
        assert s.reader.get_raw(0, encode_int(5)) == b""
        for i in range(200):
            m.delete(encode_int(i))
        m.publish()
        t = walk_tree(s.reader, 0)
        assert (t.records, t.count) == ([], 0)
        for i in range(300):
            m.put(encode_int(-i), mp_value(100, i), INSERT)
        m.publish()

    def test_update_returns_b_image_and_op_info(self, stores):
        """put/delete return the before image; op_info names the chain holding the record."""
        s = stores()
        s.begin()
        key = encode_str("alpha")
        assert s.writer.put(0, key, b"\x01", INSERT) == (lib.APL_CE_INSERT, None)
        assert s.writer.put(0, key, b"\x02\x03", UPDATE) == (lib.APL_CE_UPDATE, b"\x01")
        assert s.writer.put(0, key, b"", UPSERT) == (lib.APL_CE_UPDATE, b"\x02\x03")
        assert s.writer.put(0, key, b"\x04", UPSERT) == (lib.APL_CE_UPDATE, b"")
        info = s.writer.op_info()
        s.publish()
        img = parse_image(s.reader.block_image(info.block))
        assert img.kind == lib.APL_BLK_LEAF and (key, 1, b"\x04") in img.records
        s.begin()
        assert s.writer.delete(0, key) == b"\x04"
        s.publish()
        assert s.reader.get_raw(0, key) is None

    @pytest.mark.parametrize("max_overflow", [0, 3])
    def test_op_info_locates_records_and_names_changed_blocks(self, stores, max_overflow):
        """op_info locates each written record; its chains and structs cover every block whose image changed."""
        s = stores(block_size=1024, max_overflow=max_overflow, segment_size=4 << 20)
        m = Model(s)
        rnd = random.Random(max_overflow)
        att = s.writer.att
        meta = file_entry(att, 0).fl_meta
        for _ in range(30):
            before = s.pin()
            limit = s.reader.block_limit()
            touched = set()
            for _ in range(rnd.randint(1, 50)):
                key = encode_int(rnd.randrange(300))
                if key in m.model and rnd.random() < 0.45:
                    m.delete(key)
                    info = s.writer.op_info()
                else:
                    m.put(key, rand_value(rnd, max_value(1024, 8)), UPSERT)
                    info = s.writer.op_info()
                    assert key in keys_at(att, info.block, info.offset)
                touched |= {info.block} | {n for n, _ in info.structs}
            m.publish(audit=False)
            for n in range(max(limit, s.reader.block_limit())):
                if n != meta and s.reader.block_image(n, before.version) != s.reader.block_image(n):
                    assert n in touched, f"block {n} changed but no op named it"
            before.close()
            audit_slots(s)


class TestShape:
    @pytest.mark.parametrize("order", ["random", "sorted", "reversed"])
    @pytest.mark.parametrize("block_size", [1024, 4096])
    def test_fifty_thousand_keys_stay_shallow(self, stores, block_size, order):
        """50,000 inserts in any order give a shallow balanced tree with bounded block use."""
        n = 50_000
        s = stores(block_size=block_size, max_overflow=1, segment_size=12 << 20)
        keys = list(range(n))
        if order == "random":
            random.Random(7).shuffle(keys)
        elif order == "reversed":
            keys.reverse()
        value = msgpack.packb(b"v" * 10)
        for i in range(0, n, 1000):
            s.begin()
            for k in keys[i:i + 1000]:
                s.writer.put(0, encode_int(k), value, INSERT)
            s.publish()
        t = walk_tree(s.reader, 0)  # also checks balance: levels step down by one
        assert [k for k, _ in t.records] == [encode_int(k) for k in range(n)]
        assert t.count == n == s.reader.count(0)
        cap = block_size - 64
        data_blocks = n * (16 + 8 + len(value)) / cap
        used = audit_slots(s)["slots_used"]
        assert used <= 2.2 * data_blocks, (used, data_blocks)
        if order == "sorted":  # data past the end gets new full primary blocks ([0077])
            assert used <= 1.15 * data_blocks, (used, data_blocks)
        # inner blocks are split in halves: but for the root (>= 2 children), each has
        # >= cap / 2 bytes of 24-byte entries; so the height is logarithmic in that fan-out
        fanout = cap // 2 // 24
        assert (t.inner - 1) * fanout + 2 <= t.leaves + t.inner - 1, (t.inner, t.leaves)
        assert t.height <= 2 + math.ceil(math.log(t.leaves, fanout)), t.height
        assert list(s.reader.scan_keys(0, encode_int(100), encode_int(200))) == \
            [encode_int(k) for k in range(100, 200)]


class TestSnapshots:
    def test_pinned_version_reads_stay_exact(self, stores):
        """Reads at a pinned version return the pinned state through many later batches."""
        s = stores(block_size=1024, max_overflow=1, segment_size=4 << 20)
        rnd = random.Random(11)
        m = Model.loaded(s, rnd, 200)
        pins = []
        for round_ in range(40):
            if round_ % 10 == 0:
                pins.append((s.pin(), dict(m.published)))
            m.random_ops(rnd, 30)
            m.publish(audit=False)
            for pin, snap in pins:
                for k in rnd.sample(sorted(snap), min(20, len(snap))):
                    assert s.reader.get_raw(0, k, version=pin.version) == snap[k]
        check_state(s, m.published)
        st_pinned = s.writer.stats()
        assert st_pinned["oldest_pin"] == pins[0][0].version
        assert st_pinned["retire_pending"] > 0
        for pin, snap in pins:
            check_state(s, snap, version=pin.version, absent=[encode_int(-5)])
            check_range(s.reader, 0, snap, encode_int(50), encode_int(150), False, version=pin.version)
        pending = st_pinned["retire_pending"]
        rnd.shuffle(pins)
        for pin, snap in pins:
            pin.close()
            s.writer.reclaim()
            now = s.writer.stats()["retire_pending"]
            assert now <= pending
            pending = now
        assert pending == 0
        steady = audit_slots(s)
        st = s.writer.stats()
        assert st["slots_free"] > st_pinned["slots_free"]
        assert st["slots_total"] - st["slots_free"] == steady["slots_used"]

    def test_concurrent_readers_see_whole_batches(self, stores):
        """Reader threads only ever see whole published batches while the writer reclaims."""
        s = stores(block_size=1024, max_overflow=1, segment_size=4 << 20)

        def members(v):  # the keys of batch v
            return [k for k in range(300) if (k * 7 + v) % 5 != 0]

        def value(k, v):
            return msgpack.packb({"id": k, "v": v, "pad": "x" * ((k * 13 + v) % 90)})

        s.begin()
        for k in members(1):
            s.writer.put(0, encode_int(k), value(k, 1), INSERT)
        s.publish()
        assert s.reader.committed() == 2
        done = threading.Event()
        failures: list = []
        readers = [s.attach_reader() for _ in range(2)]

        def read_loop(r):
            try:
                while not done.is_set():
                    pin = r.pin()
                    try:
                        vals = [msgpack.unpackb(v) for v in r.scan_raw(0, None, None, version=pin.version)]
                        v = vals[0]["v"]
                        assert [x["id"] for x in vals] == members(v)
                        assert all(x["v"] == v for x in vals)
                        assert r.count(0, pin.version) == len(vals)
                    finally:
                        pin.close()
                    vals = [msgpack.unpackb(v) for v in r.scan_raw(0, encode_int(100), None)]
                    v = vals[0]["v"]
                    assert [x["id"] for x in vals] == [k for k in members(v) if k >= 100]
                    got = r.get_raw(0, encode_int(42))
                    assert got is None or msgpack.unpackb(got)["id"] == 42
            except BaseException as exc:  # reported by the main thread
                failures.append(exc)

        threads = [threading.Thread(target=read_loop, args=(r,)) for r in readers]
        for t in threads:
            t.start()
        try:
            for v in range(2, 80):
                old, new = set(members(v - 1)), set(members(v))
                s.begin()
                for k in sorted(old - new):
                    s.writer.delete(0, encode_int(k))
                for k in sorted(new):
                    s.writer.put(0, encode_int(k), value(k, v), UPSERT)
                s.publish()
        finally:
            done.set()
            for t in threads:
                t.join()
        assert not failures, failures[0]
        audit_slots(s)

    def test_reader_never_sees_a_chain_head_rewritten(self, stores):
        """(Stress, 3 s) Readers racing the delete path's in-place rewrite of a pending chain head never fail."""
        s = stores(block_size=1024, max_overflow=3)
        s.begin()
        for i in range(9):  # one chain of three blocks, three records each
            s.writer.put(0, encode_int(i), mp_value(250, i), INSERT)
        s.publish()
        att = s.writer.att
        assert block_at(att, live_numbers(att)[file_entry(att, 0).fl_root]).bh_chain == 3
        r = s.attach_reader()
        stop = threading.Event()
        bad: list = []

        def read_loop():
            key, want = encode_int(5), mp_value(250, 5)
            while not stop.is_set():
                try:
                    got = r.get_raw(0, key)
                except errors.ApplianceError as exc:
                    got = exc
                if got != want:
                    bad.append(got)

        t = threading.Thread(target=read_loop)
        t.start()
        try:
            end = time.monotonic() + 3
            while time.monotonic() < end:
                s.begin()
                for i in range(3):  # empties the head block: its successor is copied into it
                    s.writer.delete(0, encode_int(i))
                for i in range(3):
                    s.writer.put(0, encode_int(i), mp_value(250, i), INSERT)
                s.publish()
        finally:
            stop.set()
            t.join()
        assert not bad, bad[:3]

    def test_removed_number_has_no_image_while_a_pin_keeps_it(self, stores):
        """A number removed while a reader pins an older version is not in use from its removal on:
        block images (verify's checksums, a first copy's images) say so at once, and still show it
        at the pinned version."""
        s = stores(block_size=1024, max_overflow=0)
        s.begin()
        for k in range(200):
            s.writer.put(0, encode_int(k), mp_value(100, k), INSERT)
        s.publish()
        before = set(live_numbers(s.writer.att))
        pin = s.pin()
        s.begin()
        for k in range(200):
            s.writer.delete(0, encode_int(k))
        now = s.publish()
        removed = sorted(before - {n for n in range(s.reader.block_limit()) if s.reader.block_image(n)})
        assert removed, "the deletes removed no number"
        assert set(removed) <= set(live_numbers(s.writer.att)), "the pin keeps the removed numbers"
        for n in removed:
            assert s.reader.block_image(n) is None and s.reader.block_checksum(n) == 0
            assert s.reader.block_image(n, now) is None
            assert s.reader.block_image(n, pin.version) is not None
        images, _ = s.reader.block_images(0, now, 1 << 20, s.reader.block_limit())
        pos, absent = 0, set()
        while pos < len(images):
            num, length = int.from_bytes(images[pos:pos + 4], "little"), int.from_bytes(images[pos + 4:pos + 8], "little")
            if length == 0:
                absent.add(num)
            pos += 8 + length
        assert set(removed) <= absent
        pin.close()
        s.writer.reclaim()
        assert not set(removed) & set(live_numbers(s.writer.att))

    def test_reader_slots_run_out_and_come_back(self, stores):
        """Pins beyond the reader slots raise ReadersFullError; a closed pin's slot is reused."""
        s = stores(nreaders=4)
        assert s.reader.get_raw(0, b"k") is None  # this thread's per-call slot
        pins = [s.pin() for _ in range(3)]
        with pytest.raises(errors.ReadersFullError):
            s.reader.pin()
        assert s.reader.get_raw(0, b"k") is None  # the per-call slot is still this thread's
        assert s.writer.stats()["readers_active"] == 3
        pins[0].close()
        assert s.pin().version == pins[1].version
        with pytest.raises(errors.ReadersFullError):
            s.reader.pin()

    def test_sweep_releases_dead_readers_pins(self, stores):
        """sweep_readers() clears the pin of a reader whose process is gone; reclaim then frees."""
        s = stores()
        pinned_by_dead_reader(s, 8)
        assert s.writer.sweep_readers() == 1
        audit_slots(s)


class TestAltKeys:
    ALTS = ["", "a", "a\x00", "ab", "b" * 20, "\u00e9t\u00e9"]

    @settings(FAST, max_examples=30)
    @given(ops=st.lists(st.tuples(st.sampled_from(["put", "delete"]), st.integers(-30, 30),
                                  st.sampled_from(ALTS), st.integers(0, 300)),
                        min_size=1, max_size=120),
           batch=st.integers(1, 30))
    def test_find_returns_records_by_alternate_key(self, ops, batch):
        """find_raw(index, table, encode(alt)) returns exactly the alt's records in pk order."""
        with Store(block_size=1024, max_overflow=1, nfiles=2) as s:
            w, model = s.writer, {}
            for i in range(0, len(ops), batch):
                s.begin()
                for op, pk, alt, pad in ops[i:i + batch]:
                    self._apply(w, model, op, pk, alt, pad)
                s.publish()
                self._check(s, model)
            audit_slots(s)

    @staticmethod
    def _apply(w, model, op, pk, alt, pad):
        key = encode_int(pk)
        if pk in model:
            old_alt = model[pk]["alt"]
            w.delete(1, encode_str(old_alt) + key)
            old = msgpack.unpackb(w.delete(0, key))
            assert old == model.pop(pk)
        if op == "put":
            rec = {"id": pk, "alt": alt, "pad": "p" * pad}
            assert w.put(0, key, msgpack.packb(rec), INSERT) == (lib.APL_CE_INSERT, None)
            assert w.put(1, encode_str(alt) + key, b"", INSERT) == (lib.APL_CE_INSERT, None)
            model[pk] = rec

    def _check(self, s, model, version=None):
        for alt in self.ALTS + ["zz"]:
            want = [model[pk] for pk in sorted(model) if model[pk]["alt"] == alt]
            assert [msgpack.unpackb(v) for v in s.reader.find_raw(1, 0, encode_str(alt), version=version)] == want, alt
        assert s.reader.count(1, version or 0) == len(model) == s.reader.count(0, version or 0)

    def test_find_continues_past_one_buffer(self, stores):
        """A find whose result exceeds the read buffer continues at the right key, pinned."""
        s = stores(block_size=4096, max_overflow=1, nfiles=2, segment_size=8 << 20)
        model: dict = {}
        s.begin()
        for pk in range(2500):
            self._apply(s.writer, model, "put", pk, self.ALTS[pk % 2], 200)
        s.publish()
        pin = s.pin()
        snap = {pk: dict(rec) for pk, rec in model.items()}
        s.begin()
        for pk in range(0, 2500, 3):
            self._apply(s.writer, model, "put", pk, "ab", 10)
        s.publish()
        self._check(s, model)
        self._check(s, snap, version=pin.version)
        vals = [msgpack.unpackb(v) for v in s.reader.scan_raw(0, None, None, version=pin.version)]
        assert vals == [snap[pk] for pk in sorted(snap)]


class TestRecovery:
    @settings(FAST, max_examples=6)
    @given(seed=st.integers(0, 1 << 32))
    def test_crash_rolls_back_to_last_publish(self, seed):
        """A crash before publish rolls back to the published state; the store keeps working without leaks."""
        rnd = random.Random(seed)
        with Store(block_size=1024, max_overflow=rnd.choice([0, 1, 3]), segment_size=4 << 20) as s:
            m = Model.loaded(s, rnd, 150)
            for _ in range(6):
                m.random_ops(rnd, rnd.randint(20, 80))  # the batch the crash interrupts
                s.begin()
                s.writer.log(lib.APL_CE_BEGIN, txn=1, time_ns=1, a=b"lost")
                m.model = dict(m.published)
                info = s.crash_and_recover()
                assert (info["rolled_back"] > 0) == (m.changes > 0)
                m.changes = 0
                assert info["blocks_live"] == s.writer.stats()["blocks_used"]
                check_state(s, m.published)
                m.random_ops(rnd, rnd.randint(0, 40))
                m.publish()

    def test_crash_keeps_versions_pinned_by_readers(self, stores):
        """Recovery keeps the old versions a live reader has pinned, and frees them after."""
        s = stores(block_size=1024, max_overflow=1, segment_size=4 << 20)
        rnd = random.Random(3)
        m = Model.loaded(s, rnd, 300)
        pin, snap = s.pin(), dict(m.published)
        for _ in range(5):
            m.random_ops(rnd, 40)
            m.publish(audit=False)
        m.random_ops(rnd, 40)
        m.model = dict(m.published)
        info = s.crash_and_recover()
        assert info["rolled_back"] > 0 and info["versions_kept"] > 0
        check_state(s, snap, version=pin.version)
        check_state(s, m.published)
        m.random_ops(rnd, 40)
        m.publish(audit=False)
        check_state(s, snap, version=pin.version)
        pin.close()
        s.publish()
        check_state(s, m.published)
        audit_slots(s)

    def test_crash_clears_dead_readers(self, stores):
        """Recovery releases the pins of readers whose process is gone."""
        s = stores()
        m = pinned_by_dead_reader(s, 5)
        info = s.crash_and_recover()
        assert info["readers_cleared"] == 1 and info["versions_kept"] == 0
        s.publish()
        check_state(s, m.published)
        audit_slots(s)

    def test_crash_discards_unpublished_log_entries(self, stores):
        """Log entries of the interrupted batch vanish; serials continue from the published one."""
        s = stores()
        s.begin()
        first = s.writer.log(lib.APL_CE_BEGIN, txn=1, time_ns=5, a=b"kept")
        s.publish()
        s.begin()
        s.writer.log(lib.APL_CE_BEGIN, txn=2, time_ns=6, a=b"lost" * 100)
        s.writer.put(0, encode_int(1), b"x", INSERT)
        info = s.crash_and_recover()
        assert info["log_head"] == log_bounds(s.reader)["head"]
        s.begin()
        assert s.writer.log(lib.APL_CE_BEGIN, txn=3, time_ns=7, a=b"next") == first + 1
        s.publish()
        entries, _, rc = read_log(s.reader, 0)
        assert rc == 0
        assert [(e.serial, e.a) for e in entries] == [(first, b"kept"), (first + 1, b"next")]

    def test_crash_after_log_overrun_keeps_readers_in_place(self, stores):
        """After a crash whose batch overran the log ring, a caught-up log reader reads what follows."""
        s = stores(log_size=64 << 10)
        s.begin()
        first = s.writer.log(lib.APL_CE_BEGIN, txn=1, time_ns=0, a=b"a" * 100)
        s.publish()
        pos = log_bounds(s.reader)["head"]
        s.begin()
        for _ in range(6):  # 72 KiB of entries into a 64 KiB ring, never published
            s.writer.log(lib.APL_CE_BEGIN, txn=2, time_ns=0, a=b"x" * 12000)
        s.crash_and_recover()
        assert read_log(s.reader, 0)[2] == lib.APL_ELOGFULL  # the first entry was overwritten
        s.begin()
        s.writer.log(lib.APL_CE_BEGIN, txn=3, time_ns=0, a=b"next")
        s.publish()
        entries, end, rc = read_log(s.reader, pos)
        assert rc == 0 and [(e.serial, e.a) for e in entries] == [(first + 1, b"next")]
        b = log_bounds(s.reader)
        assert b["tail"] <= pos < end == b["head"]

    def test_repeated_crashes_do_not_shrink_free_space(self, stores):
        """Many crash/recover cycles leave exactly the slots the content needs."""
        s = stores(block_size=1024, max_overflow=1, segment_size=2 << 20)
        rnd = random.Random(9)
        m = Model.loaded(s, rnd, 200)
        baseline = s.writer.stats()["slots_free"]
        for _ in range(25):
            m.random_ops(rnd, 60)
            m.model = dict(m.published)
            s.crash_and_recover()
            s.begin()
            s.publish()  # an empty batch lets the rolled-back versions go
            audit_slots(s)
            assert s.writer.stats()["slots_free"] == baseline
        check_state(s, m.published)


class TestMemoryFull:
    def test_random_operations_on_a_tiny_store(self):
        """On a 46-slot store, MemoryFullError leaves everything as it was; the rest matches a dict."""
        cls = machine(1024, 1, TinyStoreMachine)
        run_state_machine_as_test(cls, settings=settings(FAST, max_examples=60, stateful_step_count=50))
        assert cls.full_hits > 0, "the store never filled up"

    def test_full_store_recovers_space_after_deletes(self, stores):
        """Filling until MemoryFullError keeps published content; deletes make room for inserts again."""
        s = stores(block_size=1024, max_overflow=1, nsegments=2, segment_size=32 << 10)
        m = Model(s)
        rnd = random.Random(1)
        k = 0
        with pytest.raises(errors.MemoryFullError):
            while True:
                s.begin()
                for _ in range(4):
                    k += 1
                    key = encode_int(k)
                    value = rand_value(rnd, max_value(1024, 8))
                    try:
                        s.writer.put(0, key, value, INSERT)
                    except errors.MemoryFullError:
                        failed = key
                        raise
                    m.model[key] = value
                m.publish()
        m.publish(absent=[failed])  # the batch with the failure: what succeeded, not the failure
        assert len(m.model) > 10
        free = s.writer.stats()["slots_free"]
        for i, key in enumerate(sorted(m.model)[: len(m.model) * 3 // 4]):
            m.delete(key)  # copy-on-write: a few per batch, old versions go at publish
            if i % 2:
                m.publish()
        m.publish()
        assert s.writer.stats()["slots_free"] > free
        for i in range(len(m.model), len(m.model) + 10):
            m.put(encode_int(10_000 + i), mp_value(300, i), INSERT)
        m.publish()

    @pytest.mark.parametrize("usable", [0, 1, 2, 3, 4])
    def test_refused_delete_changes_nothing(self, stores, usable):
        """A delete refused for want of slots (leaf, meta or parent copy) changes nothing."""
        s = stores(block_size=1024, max_overflow=0, segment_size=1 << 20)
        m = Model(s, may_fill=True)
        for i in range(40):  # max-size records: leaves of one record under one root
            m.put(encode_int(i), mp_value(max_value(1024, 8), i), INSERT)
        m.publish()
        t = walk_tree(s.reader, 0)
        assert t.height == 2
        lone = next(keys[0] for keys in t.leaf_keys if len(keys) == 1)
        # a writer whose reserve leaves exactly `usable` slots to normal changes
        s.crash_and_recover(reserve_slots=s.writer.stats()["slots_free"] - usable)
        m.delete(lone)  # needs a copy of the leaf, the meta block and the root
        assert m.full == (usable < 3)
        m.publish(audit=False)
        audit_slots(s)
        s.writer.use_reserve(True)
        if lone in m.model:
            m.delete(lone)
        m.publish()
        assert lone not in m.published

    def test_sparse_chain_merge_without_usable_slots(self, stores):
        """Deletes that thin out a chain work when the reserve was used and switched off."""
        s = stores(block_size=1024, max_overflow=3, segment_size=32 << 10)
        m = Model(s)
        for i in range(14):  # one root chain of four blocks, 3-4 records each
            m.put(encode_int(i), mp_value(200, i), INSERT)
        m.publish()
        assert audit_slots(s)["slots_used"] == 5
        s.crash_and_recover(reserve_slots=s.writer.stats()["slots_free"] - 1)
        s.begin()
        s.writer.use_reserve(True)
        m.put(encode_int(100), b"\x01", INSERT)  # copies the chain and the meta block from the reserve
        s.writer.use_reserve(False)
        for k in [0, 2, 4, 6, 8, 10, 12, 13]:  # every block keeps a record; the chain gets sparse
            m.delete(encode_int(k))
        m.publish()

    def test_reserve_is_kept_back_until_enabled(self, stores):
        """Normal puts leave reserve_slots free; use_reserve(True) lets them be used."""
        reserve = 12
        s = stores(block_size=1024, max_overflow=1, nsegments=1, segment_size=64 << 10,
                   reserve_slots=reserve)
        m = Model(s, may_fill=True)
        s.begin()
        i = 0
        while m.full == 0:
            i += 1
            m.put(encode_int(i), mp_value(200, i), INSERT)
        assert s.writer.stats()["slots_free"] >= reserve
        s.writer.use_reserve(True)
        before = len(m.model)
        while m.full == 1:
            i += 1
            m.put(encode_int(i), mp_value(200, i), INSERT)
        assert len(m.model) > before
        assert s.writer.stats()["slots_free"] < reserve
        s.writer.use_reserve(False)
        m.publish()


class TestChangeLog:
    def test_entries_read_back_in_order(self, stores):
        """Logged entries are invisible until publish, then read back whole with serials +1."""
        s = stores()
        s.begin()
        pos = log_bounds(s.reader)["head"]
        logged = []
        for i in range(20):
            kind = [lib.APL_CE_INSERT, lib.APL_CE_UPDATE, lib.APL_CE_DELETE][i % 3]
            kw = dict(txn=100 + i, time_ns=7 * i, file=i % 2, block=i, offset=8 * i, flags=i % 4,
                      key=encode_int(i), a=os.urandom(i * 7), b=os.urandom(i * 3))
            logged.append((s.writer.log(kind, **kw), dict(kw, kind=kind)))
        assert read_log(s.reader, pos)[0] == []
        ver = s.publish()
        entries, end, rc = read_log(s.reader, pos)
        assert rc == 0 and end == log_bounds(s.reader)["head"]
        assert [e.serial for e in entries] == [sv for sv, _ in logged]
        assert all(b.serial == a.serial + 1 for a, b in zip(entries, entries[1:]))
        for e, (_, kw) in zip(entries, logged):
            assert {f: getattr(e, f) for f in kw} == kw
            assert e.version == ver and e.epoch == 1
        assert log_bounds(s.reader)["serial"] == entries[-1].serial

    @settings(FAST, max_examples=15)
    @given(sizes=st.lists(st.one_of(st.integers(0, 200), st.integers(0, 16 * 1024 - CE_HDR - 8)),
                          min_size=30, max_size=120),
           per_batch=st.integers(1, 6))
    def test_ring_wraps_and_pads_are_skipped(self, sizes, per_batch):
        """A 64 KiB ring wraps: a reader that keeps up reads every entry where the ring model puts it."""
        ring = 64 << 10
        with Store(log_size=ring) as s:
            pos = expect = serial = 0
            for i in range(0, len(sizes), per_batch):
                s.begin()
                chunk = sizes[i:i + per_batch]
                want = [s.writer.log(lib.APL_CE_INSERT, txn=i, time_ns=0, key=b"k",
                                     a=bytes([n % 251]) * n) for n in chunk]
                s.publish()
                entries, pos, rc = read_log(s.reader, pos)
                assert rc == 0
                assert [e.serial for e in entries] == want == list(range(serial + 1, serial + 1 + len(want)))
                for e, n in zip(entries, chunk):
                    length = (CE_HDR + 1 + n + 7) // 8 * 8
                    if ring - expect % ring < length:  # does not fit before the end: PAD (or
                        expect += ring - expect % ring  # too little room for one) skipped
                    assert (e.pos, e.len, e.kind) == (expect, length, lib.APL_CE_INSERT)
                    assert e.a == bytes([n % 251]) * n
                    expect += length
                assert pos == expect == log_bounds(s.reader)["head"]
                serial = want[-1]
            assert log_bounds(s.reader)["tail"] >= expect - ring

    @pytest.mark.parametrize("rest", [0, 8, 64, 72, 4096])
    def test_ring_end_exact_fit_gap_and_pad(self, stores, rest):
        """Entries skip the ring's last `rest` bytes (PAD, or nothing if a header does not fit) lap after lap."""
        ring = 64 << 10
        s = stores(log_size=ring)
        full = (ring - rest - 80) // 8000
        sizes = [8000] * full + [ring - full * 8000 - rest]  # lengths: the lap ends `rest` bytes short
        sizes += [max(80, rest + 8)] + [8000] * 9  # does not fit in those bytes (unless rest == 0)
        sizes = sizes * 3
        pos = 0
        expect = []
        at = 0
        for length in sizes:
            if ring - at % ring < length:
                at += ring - at % ring
            expect.append(at)
            at += length
            s.begin()
            s.writer.log(lib.APL_CE_BEGIN, txn=1, time_ns=0, a=b"z" * (length - CE_HDR))
            s.publish()
            entries, pos, rc = read_log(s.reader, pos)
            assert rc == 0 and [(e.pos, e.len) for e in entries] == [(expect[-1], length)]
        b = log_bounds(s.reader)
        assert b["head"] == at and at - ring <= b["tail"] <= at
        assert read_log(s.reader, 0)[2] == lib.APL_ELOGFULL
        live = [p for p in expect if p >= b["tail"]]
        entries, _, rc = read_log(s.reader, live[0])
        assert rc == 0 and [e.pos for e in entries] == live

    def test_lagging_reader_gets_logfull(self, stores):
        """A reader whose position fell behind the tail gets APL_ELOGFULL; a PAD is skipped."""
        s = stores(log_size=64 << 10)
        positions = []
        for i in range(40):
            s.begin()
            s.writer.log(lib.APL_CE_BEGIN, txn=i, time_ns=0, a=b"x" * 5000)
            s.publish()
            positions.append(log_bounds(s.reader)["head"])
        b = log_bounds(s.reader)
        assert b["tail"] > 0 and b["head"] - b["tail"] <= 64 << 10
        _, _, rc = read_log(s.reader, 0)
        assert rc == lib.APL_ELOGFULL
        live = [p for p in positions if p >= b["tail"]]
        entries, end, rc = read_log(s.reader, live[0])
        assert rc == 0 and end == b["head"]
        assert len(entries) == len(live) - 1
        assert sum(e.len for e in entries) < end - live[0]  # a PAD (or lap end) was skipped

    def test_oversized_entry_is_refused(self, stores):
        """An entry larger than a quarter of the ring is refused with InternalError (APL_ELOGFULL)."""
        s = stores(log_size=64 << 10)
        s.begin()
        with pytest.raises(errors.InternalError):
            s.writer.log(lib.APL_CE_BEGIN, txn=1, time_ns=0, a=b"x" * (16 << 10))
        s.publish()
        assert read_log(s.reader, 0)[0] == []

    def test_block_entries_carry_block_images(self, stores):
        """BLOCK entries logged for op_info's structs carry the images readers see after publish."""
        s = stores(block_size=1024, max_overflow=1)
        rnd = random.Random(4)
        pos = 0
        present: set[bytes] = set()
        removals = 0
        for batch in range(12):
            s.begin()
            structs: dict[int, bool] = {}
            run = sorted(present)[rnd.randrange(len(present) or 1):][:40] if batch % 3 == 2 else []
            for k in run or [encode_int(rnd.randrange(200)) for _ in range(60)]:
                if run:  # a run of neighbours: leaves empty and are removed
                    present.discard(k)
                    s.writer.delete(0, k)
                else:
                    present.add(k)
                    s.writer.put(0, k, mp_value(rnd.randint(0, 300), batch), UPSERT)
                for n, gone in s.writer.op_info().structs:
                    structs[n] = structs.get(n, False) or gone
            for n, gone in structs.items():
                s.writer.log_block(n, txn=batch, time_ns=0, removed=gone)
            s.publish()
            entries, pos, rc = read_log(s.reader, pos)
            assert rc == 0 and len(entries) == len(structs)
            for e in entries:
                assert e.kind == lib.APL_CE_BLOCK and e.file == 0
                gone = e.flags & lib.APL_CEF_REMOVED
                assert bool(gone) == structs[e.block]
                assert e.a == (b"" if gone else s.reader.block_image(e.block))
                if gone:
                    removals += 1
                    assert s.reader.block_image(e.block) is None
        assert removals > 0


class TestErrors:
    @pytest.mark.parametrize("block_size", [1024, 4096])
    def test_key_length_limits(self, stores, block_size):
        """Keys longer than the block allows (or empty) raise KeyTooLongError; the longest is fine."""
        s = stores(block_size=block_size)
        mk = max_key(block_size)
        s.begin()
        for bad in (b"", b"k" * (mk + 1)):
            with pytest.raises(errors.KeyTooLongError):
                s.writer.put(0, bad, b"", UPSERT)
            with pytest.raises(errors.KeyTooLongError):
                s.writer.delete(0, bad)
        s.writer.put(0, b"k" * mk, b"v", INSERT)
        s.publish()
        assert s.reader.get_raw(0, b"k" * mk) == b"v"
        with pytest.raises(errors.KeyTooLongError):
            s.reader.get_raw(0, b"k" * (lib.APL_MAX_KEY + 1))

    @pytest.mark.parametrize("block_size", [1024, 4096])
    def test_record_size_limit(self, stores, block_size):
        """A value past (block_size - 64) / 2 minus slot and key raises RecordTooLargeError."""
        s = stores(block_size=block_size)
        key = encode_str("big")
        vmax = max_value(block_size, len(key))
        s.begin()
        s.writer.put(0, key, mp_value(vmax, 1), INSERT)
        with pytest.raises(errors.RecordTooLargeError):
            s.writer.put(0, key, mp_value(vmax + 1, 2), UPSERT)
        with pytest.raises(errors.RecordTooLargeError):
            s.writer.put(0, encode_str("new"), mp_value(vmax + 1, 2), INSERT)
        s.publish()
        check_state(s, {key: mp_value(vmax, 1)})

    def test_changes_without_a_batch(self, stores):
        """put, delete, log and publish without begin() raise InternalError (APL_EBATCH)."""
        s = stores()
        w = s.writer
        for call in (lambda: w.put(0, b"k", b"", UPSERT), lambda: w.delete(0, b"k"),
                     lambda: w.log(lib.APL_CE_BEGIN, txn=1, time_ns=0),
                     lambda: w.publish(0, 0)):
            with pytest.raises(errors.InternalError) as ei:
                call()
            assert ei.value.code == "APL_EBATCH"
        w.begin()
        with pytest.raises(errors.InternalError):
            w.begin()

    def test_duplicate_and_missing_keys(self, stores):
        """INSERT of a present key and UPDATE/delete of an absent one raise and change nothing."""
        s = stores()
        s.begin()
        s.writer.put(0, b"a", b"1", INSERT)
        with pytest.raises(errors.DuplicateKeyError):
            s.writer.put(0, b"a", b"2", INSERT)
        with pytest.raises(errors.NoSuchRecordError):
            s.writer.put(0, b"b", b"2", UPDATE)
        with pytest.raises(errors.NoSuchRecordError):
            s.writer.delete(0, b"b")
        s.publish()
        check_state(s, {b"a": b"1"})

    def test_failed_create_leaves_no_segments(self):
        """Writer.create that fails to create a file (name too long) unlinks every segment it made."""
        geo = Geometry(block_size=1024, nsegments=2, segment_size=1 << 20, nfiles=1, max_overflow=1,
                       nreaders=8, log_size=64 << 10)
        with ReservedName(2) as name:
            with pytest.raises(errors.InternalError):
                Writer.create(name, geo, mode=0o600, gid=None, schema_hash=1, reserve_slots=0,
                              files=[FileSpec("x" * 60, lib.APL_FILE_PRIMARY, 0)])
            assert [n for n in SegmentNames(name, 2).all() if exists(n)] == []

    @pytest.mark.parametrize("segment", ["meta", "device"])
    @pytest.mark.parametrize("field", ["magic", "format"])
    def test_corrupted_header_is_refused(self, stores, segment, field):
        """A segment whose magic or format number is wrong makes Attachment raise FormatError."""
        s = stores(nsegments=2)
        names = SegmentNames(s.name, 2)
        seg = Segment.open(names.meta if segment == "meta" else names.device(1), True)
        try:
            word = ffi.cast("uint32_t *", seg.ptr)
            word[0 if field == "magic" else 1] ^= 0x5A5A
        finally:
            seg.close()
        with pytest.raises(errors.FormatError):
            Attachment(s.name, writable=False)
