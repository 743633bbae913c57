"""Records in the fixed layout of cext/apl_rec.h and the native read path of
cext/apl_py.c: the codec against a Python model of the format (round trips,
validation errors, damaged images), the schema facts that refuse another
format or field order, and a table's native get / scan / find against a model
while a writer publishes, in-process over real shared memory (the writer of
tests/store_helpers.Store, readers attached as clients are)."""
from __future__ import annotations

import math
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance import errors
from appliance._native import lib
from appliance.config import layout_differences
from appliance.store.keys import encode_int, encode_str

from conftest import write_config
from store_helpers import INSERT, UPSERT, Store, native_reader, table_schema

I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TYPES = ("int", "float", "bool", "str", "bytes")


# ---------------------------------------------------------------------------- the format, in Python

def model_encode(fields: list[tuple[str, str, bool]], rec: dict) -> bytes:
    """The image cext/apl_rec.h describes, built from its text: null bitmap,
    fixed slots, u16 end table, variable bytes."""
    bitmap = bytearray((len(fields) + 7) // 8)
    fixed, ends, var = bytearray(), [], bytearray()
    for i, (name, typ, _) in enumerate(fields):
        v = rec[name]
        if v is None:
            bitmap[i >> 3] |= 1 << (i & 7)
        if typ == "int":
            fixed += struct.pack("<q", v or 0)
        elif typ == "float":
            fixed += struct.pack("<d", 0.0 if v is None else v)
        elif typ == "bool":
            fixed.append(1 if v else 0)
        else:
            if v is not None:
                var += v.encode("utf-8") if typ == "str" else v
            ends.append(len(var))
    return bytes(bitmap) + bytes(fixed) + b"".join(struct.pack("<H", e) for e in ends) + bytes(var)


def same(a: dict, b: dict) -> bool:
    """Equal records, -0.0 told from 0.0 (== does not)."""
    return a == b and all(math.copysign(1, a[k]) == math.copysign(1, b[k])
                          for k in a if type(a[k]) is float)


def value_of(typ: str):
    return {
        "int": st.integers(I64_MIN, I64_MAX) | st.sampled_from([I64_MIN, I64_MAX, 0, -1]),
        "float": st.floats(allow_nan=False) | st.sampled_from([-0.0, 0.0, math.inf, -math.inf, 5e-324]),
        "bool": st.booleans(),
        "str": st.text(max_size=40) | st.sampled_from(["", "\x00", "é", "日本語", "\U0001F600", "a\x00b"]),
        "bytes": st.binary(max_size=40) | st.sampled_from([b"", b"\x00", b"\xff" * 3]),
    }[typ]


@st.composite
def schemas_and_records(draw):
    """(fields, record): an int primary key then 0..14 fields of any type, some nullable."""
    n = draw(st.integers(0, 14))
    fields = [("id", "int", False)] + [(f"f{i}", draw(st.sampled_from(TYPES)), draw(st.booleans()))
                                       for i in range(n)]
    rec = {}
    for name, typ, nullable in fields:
        v = value_of(typ)
        rec[name] = draw(st.none() | v if nullable else v)
    return fields, rec


def schema_of(fields, block_size: int = 32768):
    spec = {name: {"type": typ, "nullable": nullable} for name, typ, nullable in fields}
    return table_schema(spec, block_size=block_size)


class TestCodec:
    @settings(FAST, max_examples=300)
    @given(schemas_and_records())
    def test_images_are_the_documented_format_and_decode_to_the_record(self, sr):
        """Any record of any schema encodes to exactly the image apl_rec.h describes (None,
        unicode, empty bytes, i64 bounds, -0.0 and inf included) and decodes back to it."""
        fields, rec = sr
        t = schema_of(fields)
        img = t.encode(rec, encode_int(rec["id"]))
        assert img == model_encode(fields, rec)
        assert same(t.decode(img), rec)
        assert list(t.decode(img)) == [f for f, _, _ in fields]      # schema order, as msgpack kept it

    def test_record_too_large_names_size_and_limit(self):
        """A record whose image does not fit half a block is refused with RecordTooLargeError
        saying its size and the limit for this block size and key; nothing is built."""
        t = table_schema({"id": "int", "s": "str"}, block_size=1024)
        limit = (1024 - 64) // 2 - 16 - 8
        assert len(t.encode({"id": 1, "s": "x" * (limit - 1 - 8 - 2)}, encode_int(1))) == limit
        with pytest.raises(errors.RecordTooLargeError) as ei:
            t.encode({"id": 1, "s": "x" * (limit - 8 - 2)}, encode_int(1))
        assert str(ei.value) == f"t[1]: record of {limit + 1} bytes exceeds the maximum of {limit} for this block size"
        assert ei.value.details == {"table": "t", "size": limit + 1, "limit": limit}

    def test_a_huge_value_is_refused_not_truncated(self):
        """A value far beyond what u16 end offsets can address is too large, never wrapped."""
        t = table_schema({"id": "int", "b": "bytes"}, block_size=32768)
        with pytest.raises(errors.RecordTooLargeError):
            t.encode({"id": 1, "b": b"y" * 70000}, encode_int(1))

    @pytest.mark.parametrize("bad", [
        {"id": 1},                                              # a required field missing
        {"id": 1, "n": 2, "f": 1.0, "s": "a", "extra": 1},      # a field the table does not have
        {"id": "1", "n": 2, "f": 1.0, "s": "a"},                # str for int
        {"id": 1, "n": True, "f": 1.0, "s": "a"},               # bool is not an int
        {"id": 1, "n": 1 << 63, "f": 1.0, "s": "a"},            # outside i64
        {"id": 1, "n": 2, "f": math.nan, "s": "a"},             # NaN
        {"id": 1, "n": 2, "f": 1.0, "s": None},                 # None in a non-nullable field
        {"id": 1, "n": 2, "f": 1.0, "s": b"a"},                 # bytes for str
        [("id", 1)],                                            # not a dict
    ], ids=["missing", "unknown", "str-for-int", "bool-for-int", "i64", "nan", "none", "bytes-for-str",
            "not-a-dict"])
    def test_encoding_a_bad_record_raises_what_validation_raises(self, bad):
        """The encoder refuses what TableSchema.full refuses, with the same error type and message."""
        t = table_schema({"id": "int", "n": "int", "f": "float", "s": "str"})
        with pytest.raises(errors.ApplianceError) as want:
            t.full(bad)
        with pytest.raises(type(want.value)) as got:
            t.encode(bad, encode_int(1))
        assert str(got.value) == str(want.value)

    def test_values_are_made_canonical_before_encoding(self):
        """An int in a float field and a bytearray or memoryview in a bytes field are stored as
        float and bytes, as validation makes them; a default fills a missing field."""
        t = table_schema({"id": "int", "f": "float", "b": "bytes", "d": {"type": "int", "default": 7}})
        img = t.encode({"id": 1, "f": 3, "b": bytearray(b"ab")}, encode_int(1))
        assert t.decode(img) == {"id": 1, "f": 3.0, "b": b"ab", "d": 7} and type(t.decode(img)["f"]) is float
        assert t.decode(t.encode({"id": 2, "f": 0.5, "b": memoryview(b"c"), "d": 1}, encode_int(2)))["b"] == b"c"

    def test_a_lone_surrogate_is_a_wrong_type(self):
        """A str UTF-8 cannot encode is refused with WrongTypeError naming the field."""
        t = table_schema({"id": "int", "s": "str"})
        with pytest.raises(errors.WrongTypeError) as ei:
            t.encode({"id": 1, "s": "a\ud800"}, encode_int(1))
        assert str(ei.value).startswith("t.s: a str that UTF-8 cannot encode")


class TestDamagedImages:
    FIELDS = [("id", "int", False), ("ok", "bool", False), ("s", "str", False), ("b", "bytes", True),
              ("n", "int", True), ("x", "float", False)]
    REC = {"id": 7, "ok": True, "s": "héllo", "b": b"\x00\x01", "n": None, "x": -0.0}
    #: where things are in an image of FIELDS: the slots of ok, n and x, and the end table
    OK, N, X, ENDS = 1 + 8, 1 + 8 + 1, 1 + 8 + 1 + 8, 1 + 8 + 1 + 8 + 8

    def image(self) -> bytearray:
        return bytearray(model_encode(self.FIELDS, self.REC))

    def damaged(self):
        img = self.image()
        yield "truncated", img[:-1]
        yield "extended", img + b"\x00"
        yield "empty", b""
        bad = self.image()
        bad[self.OK] = 2
        yield "bool", bad
        bad = self.image()
        bad[self.ENDS + 4] = 0xFF        # the first byte of s: not UTF-8
        yield "utf8", bad
        bad = self.image()
        bad[0] |= 1                      # id (not nullable) marked None
        yield "null", bad
        bad = self.image()
        bad[0] |= 0x80                   # a bitmap bit past the last field
        yield "pad", bad
        bad = self.image()
        first, second = struct.unpack_from("<HH", bad, self.ENDS)
        struct.pack_into("<HH", bad, self.ENDS, second + 1, second)
        yield "order", bad               # ends out of order (the last, and so the length, unchanged)
        bad = self.image()
        bad[self.N] = 1                  # n is None but its slot is not empty
        yield "none-slot", bad
        bad = self.image()
        struct.pack_into("<d", bad, self.X, math.nan)
        yield "nan", bad

    def test_each_damage_is_a_corruption_error(self):
        """Truncated, extended, a bool neither 0 nor 1, invalid UTF-8, a null in a non-nullable
        field, stray bitmap bits, end offsets out of order, a None with a value, a NaN: each raises
        CorruptionError naming the table and the image's size."""
        t = schema_of(self.FIELDS)
        assert same(t.decode(bytes(self.image())), self.REC)
        for what, img in self.damaged():
            with pytest.raises(errors.CorruptionError) as ei:
                t.decode(bytes(img))
            assert str(ei.value).startswith(f"t: a record image of {len(img)} bytes is damaged: "), what

    @settings(FAST, max_examples=400)
    @given(st.binary(max_size=80))
    def test_any_bytes_decode_to_a_record_or_a_corruption_error(self, raw):
        """Arbitrary bytes never crash the decoder: a record of the schema, or CorruptionError."""
        t = schema_of(self.FIELDS)
        try:
            rec = t.decode(raw)
        except errors.CorruptionError:
            return
        assert list(rec) == [f for f, _, _ in self.FIELDS]
        assert t.encode(rec, encode_int(rec["id"])) == raw       # a valid image is its record's only one


class TestSchemaFacts:
    BASE = {"id": "int", "branch": "str", "balance": "int"}

    def cfg(self, tmp_path, fields: dict):
        from appliance.config import load
        spec = ", ".join(f'{k} = "{v}"' for k, v in fields.items())
        path = write_config(tmp_path, tables=f'[tables.accounts]\nprimary_key = "id"\nfields = {{ {spec} }}\n')
        return load(path)

    def test_field_order_and_record_format_fix_the_schema(self, tmp_path):
        """Reordering fields changes the schema hash and the replication fingerprint (the images
        change), and the recorded layout says the order and the record format."""
        a = self.cfg(tmp_path, self.BASE)
        b = self.cfg(tmp_path, {"id": "int", "balance": "int", "branch": "str"})
        assert a.schema_hash() != b.schema_hash()
        assert a.replication_fingerprint() != b.replication_fingerprint()
        assert a.layout()["record_format"] == lib.APL_REC_FORMAT == 2
        assert layout_differences(a.layout(), b.layout()) == [
            "tables.accounts.field_order: [id, branch, balance] in shared memory, "
            "[id, balance, branch] in the config"]

    def test_segments_of_an_older_record_format_are_named(self, tmp_path):
        """Segments formatted before the record format was recorded (one msgpack map per record)
        are refused with the setting named, not misread."""
        now = self.cfg(tmp_path, self.BASE).layout()
        older = {k: v for k, v in now.items() if k != "record_format"}
        older["tables"] = {n: {k: v for k, v in t.items() if k != "field_order"} for n, t in now["tables"].items()}
        said = layout_differences(older, now)
        assert "record_format: not in shared memory, 2 in the config" in said


# ---------------------------------------------------------------------------- the native reader

ALTS = ["a", "b", "c\x00", "日本"]


def rec_of(pk: int, alt: str, v: int, pad: int = 0) -> dict:
    return {"id": pk, "alt": alt, "v": v, "pad": "p" * pad, "f": None if pk % 3 else pk / 7}


def bank_schema():
    return table_schema({"id": "int", "alt": "str", "v": "int", "pad": "str",
                         "f": {"type": "float", "nullable": True}}, alt=("alt",))


def put(s, t, model, rec, mode=UPSERT):
    key = encode_int(rec["id"])
    old = model.get(rec["id"])
    if old is not None and old["alt"] != rec["alt"]:
        s.writer.delete(1, encode_str(old["alt"]) + key)
    s.writer.put(0, key, t.encode(rec, key), mode)
    s.writer.put(1, encode_str(rec["alt"]) + key, b"", UPSERT)
    model[rec["id"]] = rec


def delete(s, model, pk):
    key = encode_int(pk)
    s.writer.delete(1, encode_str(model.pop(pk)["alt"]) + key)
    s.writer.delete(0, key)


def check_native(s, tr, model, version=0):
    """get, scan (every chunk size) and find of the native reader equal the model."""
    for pk in list(model) + [-1, 10 ** 6]:
        assert tr.get(pk) == model.get(pk), pk
    want = [model[k] for k in sorted(model)]
    assert list(s.reader.scan_values(tr, None, None, version=version or None)) == want
    for cap in (1, 300):     # one record a chunk, a few a chunk: the continuation contract
        got, lo, incl = [], None, True
        while True:
            recs, resume = tr.scan(lo, incl, None, version, cap)
            got += recs
            if resume is None:
                break
            assert recs, "a chunk that asks for more holds a record"
            lo, incl = resume, False
        assert got == want
    lo, hi = encode_int(5), encode_int(40)
    assert tr.scan(lo, False, hi, version, 1 << 20) == ([model[k] for k in sorted(model) if 5 < k < 40], None)
    for alt in ALTS + ["zz"]:
        assert tr.find(1, encode_str(alt), version, alt) == [model[k] for k in sorted(model)
                                                              if model[k]["alt"] == alt], alt


class TestNativeReads:
    @settings(FAST, max_examples=15)
    @given(ops=st.lists(st.tuples(st.sampled_from(["put", "put", "del"]), st.integers(0, 60),
                                  st.sampled_from(ALTS), st.integers(0, 120)), min_size=1, max_size=150),
           batch=st.integers(1, 40))
    def test_get_scan_find_equal_the_model(self, ops, batch):
        """After every published batch of inserts, updates (alternate key changes included) and
        deletes, get, scan in chunks of every size and find equal a Python model, and a snapshot
        reader keeps seeing the state it pinned."""
        t = bank_schema()
        with Store(block_size=1024, max_overflow=1, nfiles=2, segment_size=4 << 20) as s:
            tr = native_reader(s.reader, t)
            model: dict = {}
            snaps: list = []
            for i in range(0, len(ops), batch):
                s.begin()
                for op, pk, alt, pad in ops[i:i + batch]:
                    if op == "put":
                        put(s, t, model, rec_of(pk, alt, i, pad))
                    elif pk in model:
                        delete(s, model, pk)
                s.publish()
                check_native(s, tr, model)
                pin = s.reader.pin()
                snaps.append((pin, tr.at(pin.version), dict(model)))
                if len(snaps) > 3:       # a few snapshots held across later batches
                    pin, at, old = snaps.pop(0)
                    check_native(s, at, old, pin.version)
                    at.close()
                    pin.close()
            for pin, at, old in snaps:
                check_native(s, at, old, pin.version)
                at.close()
                pin.close()

    def test_find_larger_than_one_buffer_is_one_state(self, stores):
        """A find whose records take many times the first buffer returns all of them in key order."""
        s = stores(block_size=4096, max_overflow=1, nfiles=2, segment_size=16 << 20)
        t = bank_schema()
        tr = native_reader(s.reader, t)
        model: dict = {}
        s.begin()
        for pk in range(3000):
            put(s, t, model, rec_of(pk, ALTS[pk % 2], 1, 150), INSERT)
        s.publish()
        got = tr.find(1, encode_str("a"), 0, "a")
        assert got == [model[k] for k in range(0, 3000, 2)] and len(got) * 150 > 4 * (1 << 15)

    def test_reads_see_whole_batches_while_a_writer_publishes(self, stores):
        """Reader threads (each with its own attachment, as client processes have) never see part
        of a batch: every get sees one batch's record, every scan and find one batch's records,
        a snapshot one batch throughout, and versions never go back."""
        s = stores(block_size=1024, max_overflow=1, nfiles=2, segment_size=8 << 20)
        t = bank_schema()

        def members(v):
            return [k for k in range(200) if (k * 7 + v) % 5 != 0]

        def batch(v, model):
            for k in sorted(set(model) - set(members(v))):
                delete(s, model, k)
            for k in members(v):
                put(s, t, model, rec_of(k, ALTS[(k + v) % len(ALTS)], v, (k * 13 + v) % 60))

        model: dict = {}
        s.begin()
        batch(1, model)
        s.publish()
        done = threading.Event()
        failures: list = []
        rounds = [0]

        def read_loop(reader):
            tr = native_reader(reader, t)
            last = 0
            try:
                while not done.is_set():
                    rec = tr.get(3)
                    if rec is not None:
                        assert rec["id"] == 3 and rec["v"] >= last and 3 in members(rec["v"])
                        last = rec["v"]
                    recs = list(reader.scan_values(tr, None, None))
                    v = recs[0]["v"]
                    assert v >= last and [r["id"] for r in recs] == members(v)
                    assert all(r == rec_of(r["id"], ALTS[(r["id"] + v) % len(ALTS)], v, (r["id"] * 13 + v) % 60)
                               for r in recs)
                    last = v
                    found = tr.find(1, encode_str("a"), 0, "a")
                    assert len({r["v"] for r in found}) <= 1
                    if found:
                        fv = found[0]["v"]
                        assert [r["id"] for r in found] == [k for k in members(fv) if ALTS[(k + fv) % 4] == "a"]
                    pin = reader.pin()
                    try:
                        at = tr.at(pin.version)
                        first = at.get(1)
                        recs = list(reader.scan_values(at, None, None))
                        assert {r["v"] for r in recs} == {recs[0]["v"]}
                        assert first is None or first["v"] == recs[0]["v"]
                        at.close()
                    finally:
                        pin.close()
                    rounds[0] += 1
            except BaseException as exc:  # reported by the main thread
                failures.append(exc)

        threads = [threading.Thread(target=read_loop, args=(s.attach_reader(),)) for _ in range(2)]
        for th in threads:
            th.start()
        try:
            for v in range(2, 60):
                s.begin()
                batch(v, model)
                s.publish()
        finally:
            done.set()
            for th in threads:
                th.join()
        assert not failures, failures[0]
        assert rounds[0] > 0
        check_native(s, native_reader(s.reader, t), model)


class TestNativeBadInput:
    def test_wrong_keys_are_typed_errors(self, stores):
        """A key of the wrong type, outside i64 or too long raises the client's typed error; a
        str key with NUL and non-ASCII characters is found."""
        s = stores(block_size=4096)
        t = table_schema({"k": "str", "v": "int"}, pk="k", block_size=4096)
        tr = native_reader(s.reader, t)
        s.begin()
        for k in ["", "a\x00b", "日本", "\U0001F600"]:
            s.writer.put(0, encode_str(k), t.encode({"k": k, "v": len(k)}, encode_str(k)), INSERT)
        s.publish()
        assert [tr.get(k) for k in ["", "a\x00b", "日本", "\U0001F600", "a"]] == [
            {"k": "", "v": 0}, {"k": "a\x00b", "v": 3}, {"k": "日本", "v": 2}, {"k": "\U0001F600", "v": 1}, None]
        with pytest.raises(errors.WrongTypeError, match=r"t\.k: key must be a str, not int"):
            tr.get(5)
        with pytest.raises(errors.KeyTooLongError):
            tr.get("x" * 2000)
        n = native_reader(s.reader, table_schema({"id": "int"}))
        with pytest.raises(errors.WrongTypeError, match="key must be an int, not bool"):
            n.get(True)
        with pytest.raises(errors.WrongTypeError, match="outside the signed 64-bit range"):
            n.get(1 << 64)
        assert n.get(99, "none") == n.get(99, default="none") == "none" and n.get(99) is None
        with pytest.raises(TypeError):
            n.get()
        with pytest.raises(TypeError):
            n.get(1, other=2)
        with pytest.raises(TypeError):
            n.scan("lo", True, None, 0, 100)
        with pytest.raises(TypeError):
            n.find(1, "prefix", 0, None)

    def test_closed_readers_and_views_raise_closed_error(self, stores):
        """A snapshot's reader once closed, and any reader of a closed attachment, raise
        ClosedError on every read and touch no memory."""
        s = stores(nfiles=2)
        t = bank_schema()
        model: dict = {}
        s.begin()
        put(s, t, model, rec_of(1, "a", 1))
        s.publish()
        reader = s.attach_reader()
        tr = native_reader(reader, t)
        pin = reader.pin()
        at = tr.at(pin.version)
        assert at.get(1) == model[1] and not at.closed and at.version == pin.version
        at.close()
        for read in (lambda: at.get(1), lambda: at.scan(None, True, None, 0, 100),
                     lambda: at.find(1, encode_str("a"), 0, "a")):
            with pytest.raises(errors.ClosedError):
                read()
        pin.close()
        reader.att.close()
        for read in (lambda: tr.get(1), lambda: tr.scan(None, True, None, 0, 100),
                     lambda: tr.find(1, encode_str("a"), 0, "a")):
            with pytest.raises(errors.ClosedError):
                read()
        assert tr.get is not None and native_reader(s.reader, t).get(1) == model[1]

    def test_a_damaged_record_image_is_a_corruption_error(self, stores):
        """Bytes in the store that are not an image of the table's layout make get, scan and find
        raise CorruptionError; the other records still read."""
        s = stores(nfiles=2)
        t = bank_schema()
        tr = native_reader(s.reader, t)
        model: dict = {}
        s.begin()
        put(s, t, model, rec_of(1, "a", 1))
        put(s, t, model, rec_of(2, "a", 1))
        s.writer.put(0, encode_int(2), b"\x00\x01garbage", UPSERT)
        s.publish()
        for read in (lambda: tr.get(2), lambda: tr.scan(None, True, None, 0, 100),
                     lambda: tr.find(1, encode_str("a"), 0, "a")):
            with pytest.raises(errors.CorruptionError, match="record image of 9 bytes is damaged"):
                read()
        assert tr.get(1) == model[1]
