"""The client library's tables: a Table is a MutableMapping over shared memory.

Every test runs against a real controller process (tests/conftest.py); reads
come from the mapped segments, writes go through the controller.
"""
from __future__ import annotations

import collections.abc
import math
import os
import random
import threading
import time

import pytest

from appliance import errors
from conftest import write_config

I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1

#: a table per key type, and one with every field type, nullable and default fields
TYPED_TABLES = """
[tables.words]
primary_key = "w"
alternate_keys = ["tag"]
fields = { w = "str", tag = "bytes", n = { type = "int", default = 7 }, f = "float", ok = { type = "bool", nullable = true }, note = { type = "str", nullable = true } }

[tables.blobs]
primary_key = "k"
fields = { k = "bytes", v = "int" }

[tables.nums]
primary_key = "k"
alternate_keys = ["grp"]
fields = { k = "int", grp = { type = "int", nullable = true } }

[tables.dflt]
primary_key = "id"
fields = { id = "int", x = { type = "float", default = 0 }, b = { type = "bytes", default = "ab" }, s = { type = "str", default = "hello" }, flag = { type = "bool", default = true } }
"""

#: str keys whose order exercises UTF-8, NUL escaping and prefixes
STR_KEYS = ["", "\x00", "\x00\x00", "\x01", "a", "a\x00", "a\x00\x00", "a\x00b", "a\x01", "ab", "b", "\x7f",
            "\x80", "é", "ÿ", "Ā", "日本", "日本語", "\uffff", "\U0001F600", "z" * 200]
BYTES_KEYS = [b"", b"\x00", b"\x00\x00", b"\x00\x01", b"\x00\xff", b"\x01", b"a", b"a\x00", b"ab", b"\xfe",
              b"\xff", b"\xff\x00", b"\xff\xff"]


def acct(i: int, branch: str = "main", balance: int = 0) -> dict:
    return {"id": i, "branch": branch, "balance": balance}


@pytest.fixture
def accounts(db):
    """accounts 1..5 in branches north (odd) and south (even), balance 10*id."""
    t = db.table("accounts")
    for i in range(1, 6):
        t[i] = acct(i, "north" if i % 2 else "south", 10 * i)
    return t


@pytest.fixture
def typed(make_appliance):
    """A client of an appliance with TYPED_TABLES."""
    return make_appliance(tables=TYPED_TABLES).start().connect()


class TestMappingReads:
    def test_table_is_a_mutable_mapping(self, db):
        """A Table is registered as a collections.abc.MutableMapping."""
        assert isinstance(db.table("accounts"), collections.abc.MutableMapping)

    def test_get_returns_the_record_or_default(self, accounts):
        """get() returns the stored record, None for a missing key, or the given default."""
        assert accounts.get(3) == acct(3, "north", 30)
        assert accounts.get(99) is None
        assert accounts.get(99, "nothing") == "nothing"

    def test_getitem_missing_raises_keyerror_compatible(self, accounts):
        """t[k] for a missing key raises NoSuchRecordError, which is a KeyError with table and key details."""
        with pytest.raises(KeyError) as ei:
            accounts[99]
        e = ei.value
        assert isinstance(e, errors.NoSuchRecordError)
        assert e.code == "APL_NOTFOUND"
        assert e.details == {"table": "accounts", "key": 99}
        assert str(e) == "accounts[99]: no such record"

    def test_contains(self, accounts):
        """`in` is True for stored keys, False for missing ones and for keys of the wrong type."""
        assert 1 in accounts and 5 in accounts
        assert 0 not in accounts and 6 not in accounts
        assert "1" not in accounts and None not in accounts and 1.5 not in accounts

    def test_get_with_wrong_key_type_raises(self, accounts):
        """get() with a key of the wrong type raises WrongTypeError (a TypeError) naming the key field."""
        with pytest.raises(TypeError) as ei:
            accounts.get("1")
        assert isinstance(ei.value, errors.WrongTypeError)
        assert "accounts.id" in str(ei.value)
        with pytest.raises(errors.WrongTypeError):
            accounts.get(True)  # bool is not an int key

    def test_len(self, db, accounts):
        """len() counts the committed records and follows inserts and deletes."""
        assert len(accounts) == 5
        del accounts[2]
        assert len(accounts) == 4
        accounts[10] = acct(10)
        assert len(accounts) == 5
        assert len(db.table("accounts")) == 5

    def test_iteration_keys_values_items_in_key_order(self, db):
        """iter/keys/values/items list records in primary-key order, whatever the insertion order."""
        t = db.table("accounts")
        order = [5, -3, 9, 0, 2, 100, -50]
        for k in order:
            t[k] = acct(k, balance=k)
        want = sorted(order)
        assert list(t) == want
        assert t.keys() == want
        assert t.values() == [acct(k, balance=k) for k in want]
        assert t.items() == [(k, acct(k, balance=k)) for k in want]

    def test_empty_table(self, db):
        """An empty table has length 0, no keys and an empty range."""
        t = db.table("accounts")
        assert len(t) == 0 and list(t) == [] and list(t.range()) == [] and t.find("branch", "x") == []

    def test_unknown_table(self, db):
        """db.table() of an unknown name raises NoSuchTableError listing the tables."""
        with pytest.raises(errors.NoSuchTableError, match="accounts"):
            db.table("nope")
        assert db.tables == ["accounts"]


class TestAutocommitWrites:
    def test_setitem_inserts_then_updates(self, db):
        """t[k] = rec inserts a missing record and replaces an existing one."""
        t = db.table("accounts")
        t[1] = acct(1, "a", 5)
        assert t[1] == acct(1, "a", 5)
        t[1] = acct(1, "b", 6)
        assert t[1] == acct(1, "b", 6) and len(t) == 1

    def test_setitem_takes_primary_key_from_key(self, db):
        """The record may omit its primary-key field: t[k] fills it in from k."""
        t = db.table("accounts")
        t[7] = {"branch": "x", "balance": 1}
        assert t[7] == acct(7, "x", 1)

    def test_setitem_refuses_record_whose_pk_differs(self, accounts):
        """t[k] = rec with rec's primary key != k is refused and writes nothing."""
        with pytest.raises(errors.WrongTypeError, match="differs from the key"):
            accounts[2] = acct(3, "x", 0)
        assert accounts[2] == acct(2, "south", 20) and accounts[3] == acct(3, "north", 30)

    def test_setitem_validates_the_record(self, accounts):
        """Unknown fields, missing required fields, wrong types and non-dicts are refused; nothing changes."""
        with pytest.raises(errors.NoSuchFieldError, match="'colour'"):
            accounts[1] = {**acct(1), "colour": "red"}
        with pytest.raises(errors.WrongTypeError, match="'balance'.*required"):
            accounts[1] = {"branch": "x"}
        with pytest.raises(errors.WrongTypeError, match=r"accounts\[1\]\.balance: expected int, got str"):
            accounts[1] = acct(1, "x", "lots")
        with pytest.raises(errors.WrongTypeError, match="must be a dict"):
            accounts[1] = [1, "x", 2]
        with pytest.raises(errors.WrongTypeError, match="64-bit"):
            accounts[1] = acct(1, "x", 1 << 63)
        assert accounts[1] == acct(1, "north", 10)

    @pytest.mark.parametrize("value", [1 << 64, -(1 << 63) - 1, 10 ** 40])
    def test_int_too_large_to_send_names_the_field(self, db, accounts, value):
        """An int msgpack cannot carry is refused with WrongTypeError naming the field and the range, in autocommits and in transactions."""
        with pytest.raises(errors.WrongTypeError, match=r"field 'balance': .* out of range for an int") as ei:
            accounts[1] = acct(1, "x", value)
        assert ei.value.details["field"] == "balance"
        with pytest.raises(errors.WrongTypeError, match=r"field 'balance'"):
            with db.transaction() as tx:
                tx.update("accounts", 1, {"balance": value})
        assert accounts[1] == acct(1, "north", 10)

    def test_huge_int_values_refused_as_wrong_type(self, accounts):
        """Ints outside the signed 64-bit range are refused with WrongTypeError however large they are."""
        with pytest.raises(errors.WrongTypeError):
            accounts[1] = acct(1, "x", 1 << 64)
        with pytest.raises(errors.WrongTypeError):
            accounts[I64_MIN - 1] = acct(I64_MIN - 1)
        with pytest.raises(errors.WrongTypeError):
            accounts.insert(acct(2, "x", -(1 << 70)))

    def test_delitem(self, accounts):
        """del t[k] removes the record."""
        del accounts[3]
        assert 3 not in accounts and accounts.get(3) is None and len(accounts) == 4

    def test_delitem_missing_raises_keyerror_compatible(self, accounts):
        """del t[k] of a missing key raises NoSuchRecordError, catchable as KeyError."""
        with pytest.raises(KeyError) as ei:
            del accounts[42]
        assert isinstance(ei.value, errors.NoSuchRecordError)
        assert ei.value.details.get("key") == 42
        assert len(accounts) == 5

    def test_insert(self, db):
        """insert(rec) adds a record and reports the commit (txn, serial, version)."""
        t = db.table("accounts")
        res = t.insert(acct(1, "a", 1))
        assert t[1] == acct(1, "a", 1)
        assert {"txn", "serial", "version"} <= set(res)
        assert res["version"] == db.committed_version()

    def test_insert_duplicate(self, accounts):
        """insert() of an existing key raises DuplicateKeyError and leaves the record unchanged."""
        with pytest.raises(errors.DuplicateKeyError) as ei:
            accounts.insert(acct(1, "x", 0))
        assert ei.value.code == "APL_EXISTS" and ei.value.details["key"] == 1
        assert accounts[1] == acct(1, "north", 10)

    def test_mutable_mapping_mixins(self, accounts):
        """pop, setdefault, update and == behave as for a dict."""
        assert accounts.pop(1) == acct(1, "north", 10) and 1 not in accounts
        assert accounts.pop(1, None) is None
        assert accounts.setdefault(2, acct(2, "x", 0)) == acct(2, "south", 20)
        assert accounts.setdefault(8, acct(8, "x", 0)) == acct(8, "x", 0) and accounts[8] == acct(8, "x", 0)
        accounts.update({9: acct(9, "y", 9)})
        assert accounts[9] == acct(9, "y", 9)
        assert accounts == {k: v for k, v in accounts.items()}


class TestFind:
    def test_find_all_with_alternate_key_in_pk_order(self, db):
        """find(field, value) returns every record with that alternate-key value, in primary-key order."""
        t = db.table("accounts")
        for k in [50, 3, 17, -4, 8]:
            t[k] = acct(k, "east" if k % 2 else "west")
        assert [r["id"] for r in t.find("branch", "east")] == [3, 17]
        assert [r["id"] for r in t.find("branch", "west")] == [-4, 8, 50]

    def test_find_none(self, accounts):
        """find() of a value no record has returns an empty list."""
        assert accounts.find("branch", "nowhere") == []
        assert accounts.find("branch", "") == []

    def test_find_follows_updates_and_deletes(self, accounts):
        """Changing or deleting a record moves it in or out of the alternate-key index."""
        accounts[1] = acct(1, "south", 10)
        del accounts[4]
        assert [r["id"] for r in accounts.find("branch", "south")] == [1, 2]
        assert [r["id"] for r in accounts.find("branch", "north")] == [3, 5]

    def test_find_on_field_that_is_not_an_alternate_key(self, accounts):
        """find() on a plain field or an unknown field raises NoSuchFieldError."""
        with pytest.raises(errors.NoSuchFieldError, match="not an alternate key"):
            accounts.find("balance", 10)
        with pytest.raises(errors.NoSuchFieldError, match="no such field"):
            accounts.find("colour", "red")
        with pytest.raises(errors.NoSuchFieldError):
            accounts.find("id", 1)

    def test_find_with_wrong_value_type(self, accounts):
        """find() with a value of the wrong type raises WrongTypeError."""
        with pytest.raises(errors.WrongTypeError):
            accounts.find("branch", 5)

    def test_find_nullable_int_alternate_key(self, typed):
        """Records whose alternate key is None are in no index entry; int alternate keys sort numerically."""
        t = typed.table("nums")
        for k, g in [(1, 5), (2, None), (3, -5), (4, 5), (5, None)]:
            t[k] = {"grp": g}
        assert [r["k"] for r in t.find("grp", 5)] == [1, 4]
        assert [r["k"] for r in t.find("grp", -5)] == [3]
        assert t.find("grp", 0) == []


class TestRange:
    def test_bounds_lo_inclusive_hi_exclusive(self, accounts):
        """range(lo, hi) yields lo <= key < hi in key order; None leaves a side open."""
        ids = lambda it: [r["id"] for r in it]
        assert ids(accounts.range(2, 4)) == [2, 3]
        assert ids(accounts.range(2, None)) == [2, 3, 4, 5]
        assert ids(accounts.range(None, 3)) == [1, 2]
        assert ids(accounts.range()) == [1, 2, 3, 4, 5]
        assert ids(accounts.range(0, 100)) == [1, 2, 3, 4, 5]
        assert ids(accounts.range(3, 4)) == [3]

    def test_empty_ranges(self, accounts):
        """lo == hi, lo > hi and ranges beyond the data are empty."""
        assert list(accounts.range(3, 3)) == []
        assert list(accounts.range(4, 2)) == []
        assert list(accounts.range(6, None)) == []
        assert list(accounts.range(None, 1)) == []
        assert list(accounts.range(I64_MAX, I64_MIN)) == []

    def test_negative_int_keys(self, db):
        """Negative int keys sort before zero and positive keys, numerically."""
        t = db.table("accounts")
        keys = [-1, -2, -1000, 0, 1, -(1 << 40), 1 << 40, -7]
        for k in keys:
            t[k] = acct(k)
        assert list(t) == sorted(keys)
        assert [r["id"] for r in t.range(-1000, 0)] == [-1000, -7, -2, -1]
        assert [r["id"] for r in t.range(None, -1)] == [-(1 << 40), -1000, -7, -2]

    def test_order_across_many_blocks(self, make_appliance):
        """Thousands of records inserted in random order over many small blocks scan back sorted, for any bounds."""
        a = make_appliance(storage="block_size = 1024").start()
        db = a.connect()
        t = db.table("accounts")
        rng = random.Random(1234)
        keys = rng.sample(range(-50_000, 50_000), 3000)
        db.load("accounts", [acct(k, f"b{k % 13}", k) for k in keys[:2000]], batch=700)
        for k in keys[2000:2300]:
            t[k] = acct(k, f"b{k % 13}", k)
        db.load("accounts", [acct(k, f"b{k % 13}", k) for k in keys[2300:]])
        want = sorted(keys)
        assert db.status()["blocks"]["used"] > 50  # the data really spans many blocks
        assert list(t) == want
        assert [r["id"] for r in t.range()] == want
        assert len(t) == 3000
        for _ in range(25):
            lo, hi = sorted(rng.sample(range(-51_000, 51_000), 2))
            assert [r["id"] for r in t.range(lo, hi)] == [k for k in want if lo <= k < hi]
        assert [r["id"] for r in t.find("branch", "b3")] == [k for k in want if k % 13 == 3]


class TestKeyTypes:
    def test_str_keys_sort_like_python_strings(self, typed):
        """str primary keys (unicode, embedded NULs, prefixes) iterate in Python's str order and read back."""
        t = typed.table("words")
        keys = STR_KEYS[:]
        random.Random(7).shuffle(keys)
        for k in keys:
            t[k] = {"tag": k.encode("utf-8"), "f": 1.0}
        assert list(t) == sorted(STR_KEYS)
        assert "a" < "a\x00" < "ab" and list(t).index("a") < list(t).index("a\x00") < list(t).index("ab")
        for k in STR_KEYS:
            assert t[k]["w"] == k and t[k]["tag"] == k.encode("utf-8")
        assert "a\x00\x00\x00" not in t and "a\x02" not in t

    def test_str_range_with_prefix_bounds(self, typed):
        """range() over str keys respects prefixes: ["a", "b") holds "a", "a\\x00"..., "ab" but not "b"."""
        t = typed.table("words")
        for k in STR_KEYS:
            t[k] = {"tag": b"", "f": 0.0}
        assert [r["w"] for r in t.range("a", "b")] == sorted(k for k in STR_KEYS if "a" <= k < "b")
        assert [r["w"] for r in t.range("a\x00", "ab")] == ["a\x00", "a\x00\x00", "a\x00b", "a\x01"]
        assert [r["w"] for r in t.range(None, "\x01")] == ["", "\x00", "\x00\x00"]

    def test_bytes_keys(self, typed):
        """bytes primary keys (with NUL and 0xFF bytes) iterate in bytes order; bytearray looks them up."""
        t = typed.table("blobs")
        keys = BYTES_KEYS[:]
        random.Random(3).shuffle(keys)
        for i, k in enumerate(keys):
            t[k] = {"v": i}
        assert list(t) == sorted(BYTES_KEYS)
        for i, k in enumerate(keys):
            assert t[k] == {"k": k, "v": i}
        assert t[bytearray(b"ab")]["k"] == b"ab"
        assert [r["k"] for r in t.range(b"\x00", b"\x01")] == [b"\x00", b"\x00\x00", b"\x00\x01", b"\x00\xff"]
        assert b"\x00\x02" not in t and "ab" not in t

    def test_int_keys_at_signed_64_bit_limits(self, db):
        """The smallest and largest signed 64-bit keys are stored, ordered and range-bounded correctly."""
        t = db.table("accounts")
        keys = [I64_MAX, 0, I64_MIN, -1, I64_MIN + 1, I64_MAX - 1]
        for k in keys:
            t[k] = acct(k, balance=k)
        assert list(t) == sorted(keys)
        assert t[I64_MIN]["balance"] == I64_MIN and t[I64_MAX]["balance"] == I64_MAX
        assert [r["id"] for r in t.range(I64_MIN, I64_MIN + 1)] == [I64_MIN]
        assert [r["id"] for r in t.range(I64_MAX - 1, None)] == [I64_MAX - 1, I64_MAX]
        assert [r["id"] for r in t.range(None, I64_MAX)] == sorted(keys)[:-1]

    def test_int_keys_outside_64_bits_refused(self, db):
        """Keys just outside the signed 64-bit range are refused on write and never found."""
        t = db.table("accounts")
        with pytest.raises(errors.WrongTypeError, match="64-bit"):
            t[I64_MAX + 1] = acct(I64_MAX + 1)
        for k in (I64_MAX + 1, I64_MIN - 1, 1 << 100):
            assert k not in t
            with pytest.raises(errors.WrongTypeError, match="64-bit"):
                t.get(k)
        assert len(t) == 0

    def test_overlong_key_refused(self, typed):
        """A primary key too long for a block is refused with KeyTooLongError (a ValueError)."""
        with pytest.raises(ValueError) as ei:
            typed.table("words")["k" * 2000] = {"tag": b"", "f": 0.0}
        assert isinstance(ei.value, errors.KeyTooLongError)

    def test_a_str_key_utf8_cannot_encode_is_a_wrong_type(self, typed):
        """A str key with a lone surrogate: WrongTypeError naming the statement on
        write and the key field on get and range (not a bare UnicodeEncodeError),
        False for `in`, and nothing stored."""
        t = typed.table("words")
        bad = "a\ud800"
        with pytest.raises(errors.WrongTypeError, match=r"^words\[.*\] = \.\.\.: a value cannot be sent: .*surrogates"):
            t[bad] = {"tag": b"", "f": 0.0}
        with pytest.raises(errors.WrongTypeError, match=r"words\.w: key is a str that UTF-8 cannot encode"):
            t.get(bad)
        with pytest.raises(errors.WrongTypeError, match="lone surrogate"):
            list(t.range(bad, None))
        assert bad not in t and len(t) == 0
        t["ok"] = {"tag": b"", "f": 0.0}
        assert list(t) == ["ok"]

    def test_contains_overlong_key_is_false(self, typed):
        """`in` with a key too long to be stored is False, like a key of the wrong type."""
        assert ("x" * 5000) not in typed.table("words")


class TestFieldTypes:
    def test_floats_round_trip_exactly(self, typed):
        """float fields keep every value bit for bit (inf, -0.0, extremes); ints given for floats become floats."""
        t = typed.table("words")
        values = [0.1, -0.0, float("inf"), float("-inf"), 1e308, 5e-324, 2.0 ** 53 + 1, -123.456]
        for i, v in enumerate(values):
            t[f"f{i}"] = {"tag": b"", "f": v}
        for i, v in enumerate(values):
            got = t[f"f{i}"]["f"]
            assert type(got) is float and math.copysign(1, got) == math.copysign(1, v) and got == v
        t["int"] = {"tag": b"", "f": 3}
        assert t["int"]["f"] == 3.0 and type(t["int"]["f"]) is float

    def test_nan_refused(self, typed):
        """NaN is refused for a float field (it could never be found again by equality)."""
        with pytest.raises(errors.WrongTypeError):
            typed.table("words")["nan"] = {"tag": b"", "f": float("nan")}

    def test_nan_refusal_says_why(self, typed):
        """The NaN refusal names the problem (NaN), not a type mismatch of float against float."""
        with pytest.raises(errors.WrongTypeError) as ei:
            typed.table("words")["nan"] = {"tag": b"", "f": float("nan")}
        assert "nan" in str(ei.value).lower() and "got float" not in str(ei.value)

    def test_bool_bytes_nullable_round_trip(self, typed):
        """bool, bytes (any byte values) and nullable fields round-trip with their exact types."""
        t = typed.table("words")
        t["x"] = {"tag": bytes(range(256)), "f": 1.5, "ok": False, "note": "naïve\x00text", "n": -1}
        t["y"] = {"tag": bytearray(b"\x00"), "f": 0.0, "ok": None, "note": None}
        t["z"] = {"tag": b"", "f": 0.0, "ok": True}
        assert t["x"] == {"w": "x", "tag": bytes(range(256)), "n": -1, "f": 1.5, "ok": False,
                          "note": "naïve\x00text"}
        y = t["y"]
        assert y == {"w": "y", "tag": b"\x00", "n": 7, "f": 0.0, "ok": None, "note": None}
        assert type(y["tag"]) is bytes
        assert t["z"]["ok"] is True and t["x"]["ok"] is False

    def test_bool_is_not_an_int(self, typed):
        """A bool is refused for an int field and an int for a bool field."""
        t = typed.table("words")
        with pytest.raises(errors.WrongTypeError):
            t["b"] = {"tag": b"", "f": 0.0, "n": True}
        with pytest.raises(errors.WrongTypeError):
            t["b"] = {"tag": b"", "f": 0.0, "ok": 1}

    def test_non_nullable_field_refuses_none(self, typed):
        """None for a field that is neither nullable nor defaulted is refused."""
        with pytest.raises(errors.WrongTypeError, match="may not be None"):
            typed.table("words")["q"] = {"tag": b"", "f": 0.0, "n": None}

    def test_defaults_fill_missing_fields(self, typed):
        """Fields with defaults may be omitted; the stored record holds the default values."""
        t = typed.table("dflt")
        t[1] = {}
        r = t[1]
        assert set(r) == {"id", "x", "b", "s", "flag"}
        assert r["x"] == 0 and r["s"] == "hello" and r["flag"] is True
        assert r["b"] in (b"ab", "ab")  # the type is test_defaults_have_the_field_type's business
        t[2] = {"x": 2.5, "b": b"\x00", "s": "", "flag": False}
        assert t[2] == {"id": 2, "x": 2.5, "b": b"\x00", "s": "", "flag": False}

    def test_defaults_have_the_field_type(self, typed):
        """A default read back has its field's type: float for float fields, bytes for bytes fields."""
        t = typed.table("dflt")
        t[1] = {}
        r = t[1]
        assert type(r["x"]) is float and type(r["b"]) is bytes

    def test_record_too_large(self, typed):
        """A record that does not fit a block is refused with RecordTooLargeError (a ValueError)."""
        t = typed.table("words")
        with pytest.raises(ValueError) as ei:
            t["big"] = {"tag": b"", "f": 0.0, "note": "x" * 5000}
        assert isinstance(ei.value, errors.RecordTooLargeError)
        assert "big" not in t


class TestLoad:
    """db.load: records given whole in their stored types go the controller's
    lean path (encoded and indexed as given); the others (defaults to fill,
    values to convert) the insert statement's. Either way the result, the
    index entries and the errors are those of inserting the records one by one."""

    WORDS = [
        {"w": "a", "tag": b"t1", "n": 1, "f": 1.5, "ok": True, "note": "x"},         # whole, stored types
        {"w": "b", "tag": b"t2", "n": 2, "f": 2, "ok": None, "note": None},          # an int for the float
        {"w": "c", "tag": b"t1", "f": 0.5},                                           # defaults to fill
        {"w": "d", "tag": b"t3", "n": 4, "f": -0.0, "ok": False, "note": "z" * 300},
        {"w": "e", "tag": b"t2", "n": 5, "f": 5.0, "ok": None, "note": "\x00"},
    ]

    def test_loaded_records_equal_inserted_ones(self, typed):
        """Loaded records read, scan and find by alternate key exactly as the same records inserted one by one."""
        t = typed.table("words")
        assert typed.load("words", self.WORDS) == len(self.WORDS)
        loaded = {r["w"]: r for r in t.values()}
        for r in t.values():
            del t[r["w"]]
        for rec in self.WORDS:
            t[rec["w"]] = rec
        inserted = {r["w"]: r for r in t.values()}
        assert loaded == inserted and len(loaded) == len(self.WORDS)
        assert type(loaded["b"]["f"]) is float and loaded["c"]["n"] == 7
        assert [r["w"] for r in t.find("tag", b"t1")] == ["a", "c"]
        typed.load("nums", [{"k": 1, "grp": 10}, {"k": 2, "grp": None}, {"k": 3, "grp": 10}, {"k": 4}])
        assert [r["k"] for r in typed.table("nums").find("grp", 10)] == [1, 3]
        assert typed.table("nums")[4] == {"k": 4, "grp": None}

    def test_alternate_keys_of_a_load_are_indexed(self, db):
        """Every loaded record is found by its alternate key, and only there."""
        recs = [acct(i, f"br{i % 5}", i) for i in range(3000)]
        random.Random(5).shuffle(recs)
        assert db.load("accounts", recs, batch=3000) == 3000
        t = db.table("accounts")
        for b in range(5):
            assert sorted(r["id"] for r in t.find("branch", f"br{b}")) == list(range(b, 3000, 5))
        assert len(t) == 3000

    @pytest.mark.parametrize("second", ["whole", "to_fill"])
    @pytest.mark.parametrize("first", ["whole", "to_fill"])
    def test_a_key_given_twice_in_a_load_is_a_duplicate(self, typed, first, second):
        """A primary key given twice in one load fails it with DuplicateKeyError at the second one, whichever path each took; nothing is loaded."""
        shapes = {"whole": {"id": 1, "x": 1.0, "b": b"", "s": "", "flag": False}, "to_fill": {"id": 1}}
        recs = [{"id": 0}, shapes[first], {"id": 2}, shapes[second], {"id": 3}]
        with pytest.raises(errors.DuplicateKeyError) as ei:
            typed.load("dflt", recs)
        assert ei.value.details["index"] == 3 and ei.value.details["key"] == 1
        assert len(typed.table("dflt")) == 0
        assert typed.status()["transactions"]["locks_held"] == 0

    def test_a_key_already_stored_is_a_duplicate(self, db):
        """A load holding a key already committed fails with DuplicateKeyError naming its index; nothing of it is loaded."""
        db.table("accounts")[7] = acct(7, "old", 70)
        with pytest.raises(errors.DuplicateKeyError) as ei:
            db.load("accounts", [acct(i) for i in (5, 6, 7, 8)])
        assert ei.value.details["index"] == 2
        assert list(db.table("accounts")) == [7] and db.table("accounts")[7]["branch"] == "old"

    @pytest.mark.parametrize("bad, error, index", [
        ({"id": 3, "branch": "b", "balance": "x"}, errors.WrongTypeError, 1),
        ({"id": 3, "branch": "b", "saldo": 1}, errors.NoSuchFieldError, 1),
        ({"id": "3", "branch": "b", "balance": 1}, errors.WrongTypeError, 1),
        ({"id": 3, "branch": "b" * 1500, "balance": 1}, errors.KeyTooLongError, 1),
        ({"id": 3, "branch": None, "balance": 1}, errors.WrongTypeError, 1),
        ({"id": True, "branch": "b", "balance": 1}, errors.WrongTypeError, 1),
    ], ids=["wrong-type", "unknown-field", "key-type", "alt-key-too-long", "none", "bool-key"])
    def test_a_bad_record_fails_the_load_with_its_error(self, db, bad, error, index):
        """A record the table refuses fails its load with the insert's typed error and the record's index; nothing is loaded."""
        with pytest.raises(error) as ei:
            db.load("accounts", [acct(1), bad, acct(2)])
        assert ei.value.details["index"] == index
        with pytest.raises(error):
            db.table("accounts")[3] = bad
        assert len(db.table("accounts")) == 0

    def test_too_large_and_too_long_are_refused_in_the_insert_order(self, typed):
        """A record too large for a block is RecordTooLargeError; one whose key is too long as well is KeyTooLongError, as its insert says."""
        big = {"w": "big", "tag": b"", "n": 1, "f": 0.0, "ok": None, "note": "x" * 5000}
        both = dict(big, w="w" * 1200)
        for rec, error in ((big, errors.RecordTooLargeError), (both, errors.KeyTooLongError)):
            with pytest.raises(error) as ei:
                typed.load("words", [rec])
            assert ei.value.details["index"] == 0
            with pytest.raises(error):
                typed.table("words")[rec["w"]] = rec
        assert len(typed.table("words")) == 0

    @pytest.mark.parametrize("outcome", ["commit", "cancel"])
    def test_a_load_waits_for_a_key_another_transaction_holds(self, bank, db, outcome):
        """A load reaching a key another transaction has locked waits for it: a duplicate if that one inserts and commits, loaded if it cancels."""
        other = bank.connect()
        tx = other.transaction(pipeline=False)
        tx.insert("accounts", acct(2, "theirs", 2))
        box: list = []

        def load():
            try:
                box.append(db.load("accounts", [acct(1), acct(2), acct(3)]))
            except errors.ApplianceError as e:
                box.append(e)

        th = threading.Thread(target=load)
        th.start()
        deadline = time.monotonic() + 30
        while other.status()["transactions"]["lock_waits"] == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert other.status()["transactions"]["lock_waits"] == 1    # the load waits for key 2
        if outcome == "commit":
            tx.commit()
        else:
            tx.cancel()
        th.join()
        t = db.table("accounts")
        if outcome == "commit":
            assert isinstance(box[0], errors.DuplicateKeyError) and box[0].details["index"] == 1
            assert list(t) == [2] and t[2]["branch"] == "theirs"
        else:
            assert box == [3] and list(t) == [1, 2, 3] and t[2]["branch"] == "main"


SNAP_WRITER = r"""
import sys, appliance
db = appliance.connect(sys.argv[1]); t = db.table("accounts")
t[1] = {"id": 1, "branch": "moved", "balance": 999}
del t[2]
t[100] = {"id": 100, "branch": "north", "balance": 0}
"""


class TestSnapshot:
    def test_writes_through_a_snapshot_are_refused(self, db, accounts):
        """Setting, deleting or inserting through a snapshot's table raises TransactionStateError."""
        with db.snapshot() as snap:
            st = snap.table("accounts")
            with pytest.raises(errors.TransactionStateError):
                st[1] = acct(1)
            with pytest.raises(errors.TransactionStateError):
                del st[1]
            with pytest.raises(errors.TransactionStateError):
                st.insert(acct(77))
        assert accounts[1] == acct(1, "north", 10) and 77 not in accounts

    def test_snapshot_sees_one_state_while_another_process_writes(self, bank, db, accounts):
        """Every read through a snapshot sees the state it pinned, while another process commits changes."""
        snap = db.snapshot()
        st = snap.table("accounts")
        before = {k: accounts[k] for k in accounts}
        writer = bank.spawn(SNAP_WRITER)
        assert writer.wait(60) == 0
        # the live table moved on
        assert accounts[1]["balance"] == 999 and 2 not in accounts and 100 in accounts
        # the snapshot did not
        assert {k: st[k] for k in st} == before
        assert st[1] == acct(1, "north", 10) and st.get(100) is None and 2 in st
        assert len(st) == 5 and list(st) == [1, 2, 3, 4, 5]
        assert [r["id"] for r in st.range(2, None)] == [2, 3, 4, 5]
        assert [r["id"] for r in st.find("branch", "north")] == [1, 3, 5]
        assert snap.version < db.committed_version()
        snap.close()

    def test_closed_snapshot_raises_closed_error(self, db, accounts):
        """After close() every read through the snapshot, and snapshot.table(), raise ClosedError."""
        with db.snapshot() as snap:
            st = snap.table("accounts")
            assert st[1]["id"] == 1
        for read in (lambda: st.get(1), lambda: st[1], lambda: len(st), lambda: list(st),
                     lambda: list(st.range()), lambda: st.find("branch", "north"), lambda: 1 in st):
            with pytest.raises(errors.ClosedError):
                read()
        with pytest.raises(errors.ClosedError):
            snap.table("accounts")
        snap.close()  # idempotent
        assert accounts[1]["id"] == 1  # the client itself is unaffected

    def test_a_dropped_snapshot_releases_its_slot_at_once(self, db, accounts):
        """A snapshot dropped without close(), with a table read through it, frees its reader
        slot as soon as the last reference goes (no cycle waits for the garbage collector);
        while held, snapshot.table() gives the same table."""
        import gc
        from appliance._native import ffi

        def snapshot_slots() -> int:
            att = db._att
            slots = ffi.cast("struct apl_reader *", att.readers.ptr + ffi.sizeof("struct apl_rhdr"))
            return sum(1 for i in range(att.sb.sb_nreaders)
                       if slots[i].rs_pid == os.getpid() and slots[i].rs_kind == 2)

        before = snapshot_slots()
        gc.disable()
        try:
            snap = db.snapshot()
            t = snap.table("accounts")
            assert t is snap.table("accounts") and t.get(2) == acct(2, "south", 20)
            assert snapshot_slots() == before + 1
            del snap, t
            assert snapshot_slots() == before
        finally:
            gc.enable()


class TestClosedClient:
    def test_reads_and_writes_raise_closed_error(self, bank, accounts):
        """After client.close(), reads and writes through its tables raise ClosedError."""
        db = bank.connect()
        t = db.table("accounts")
        assert t[1]["id"] == 1
        db.close()
        ops = [lambda: t.get(1), lambda: t[1], lambda: 1 in t, lambda: len(t), lambda: list(t),
               lambda: list(t.range()), lambda: t.find("branch", "north"), lambda: t.keys(),
               lambda: t.__setitem__(1, acct(1)), lambda: t.__delitem__(1), lambda: t.insert(acct(50))]
        for op in ops:
            with pytest.raises(errors.ClosedError):
                op()
        assert accounts[1] == acct(1, "north", 10) and 50 not in accounts

    def test_client_methods_raise_closed_error(self, bank):
        """table(), snapshot(), transaction(), load(), status() of a closed client raise ClosedError."""
        db = bank.connect()
        db.close()
        for op in (lambda: db.table("accounts"), db.snapshot, db.transaction, db.status,
                   db.committed_version, lambda: db.load("accounts", [acct(1)])):
            with pytest.raises(errors.ClosedError):
                op()
        db.close()  # idempotent
        assert "closed" in repr(db)

    def test_context_manager_closes(self, bank):
        """Leaving `with appliance.connect(...)` closes the client."""
        import appliance
        with appliance.connect(bank.config) as db:
            t = db.table("accounts")
            t[1] = acct(1)
        with pytest.raises(errors.ClosedError):
            t.get(1)

    def test_connect_when_not_running(self, tmp_path):
        """connect() to an appliance that is not running raises UnavailableError (a ConnectionError) once its wait is over."""
        import appliance
        path = write_config(tmp_path)
        with pytest.raises(ConnectionError) as ei:
            appliance.connect(path, wait=0)
        assert isinstance(ei.value, errors.UnavailableError) and "not running" in str(ei.value)

    def test_connect_waits_for_a_controller_that_is_starting(self, make_appliance):
        """connect(timeout=30) called before the controller is up waits for it and returns a working client."""
        import appliance
        import socket
        import sys
        app = make_appliance()
        got = {}
        refused = threading.Event()

        def note_refused(frame, event, arg):      # a connect() to the controller socket that failed
            if event == "c_exception" and getattr(arg, "__name__", "") == "connect" \
                    and isinstance(getattr(arg, "__self__", None), socket.socket):
                refused.set()

        def attach():
            sys.setprofile(note_refused)
            try:
                got["client"] = appliance.connect(app.config, timeout=30)
            except Exception as e:  # noqa: BLE001 - reported below
                got["error"] = e
            finally:
                sys.setprofile(None)

        t = threading.Thread(target=attach)
        t.start()
        assert refused.wait(30), got          # it tried, found no controller, and waits
        assert app.controller.proc is None and "client" not in got and "error" not in got
        app.start()
        t.join(60)
        assert not t.is_alive(), "connect() did not return once the controller was up"
        assert "error" not in got, got.get("error")
        c = got["client"]
        app.clients.append(c)
        c.table("accounts")[1] = acct(1)
        assert c.table("accounts")[1] == acct(1)


class TestProcessesAndThreads:
    def test_client_used_in_forked_child(self, bank, db, accounts):
        """A forked child reads and writes through the parent's client; the parent's connection keeps working."""
        accounts[1] = acct(1, "north", 11)  # the parent's connection exists before the fork
        pid = os.fork()
        if pid == 0:  # child: never return into pytest
            code = 1
            try:
                t = db.table("accounts")
                assert t[1] == acct(1, "north", 11)
                t[200] = acct(200, "child", 1)
                assert t[200]["branch"] == "child"
                with db.transaction(program="child") as tx:
                    r = tx.get("accounts", 1, for_update=True)
                    tx.update("accounts", 1, {"balance": r["balance"] + 1})
                with db.snapshot() as snap:
                    assert len(snap.table("accounts")) == 6
                db.close()
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert accounts[1] == acct(1, "north", 12) and accounts[200] == acct(200, "child", 1)
        accounts[201] = acct(201)
        with db.transaction() as tx:
            tx.update("accounts", 201, {"balance": 5})
        assert accounts[201]["balance"] == 5
        assert db.status()["clients"]["dropped"] == 0

    def test_threads_share_one_client(self, db):
        """Several threads sharing one client read and write concurrently; every write lands exactly once."""
        t = db.table("accounts")
        t[0] = acct(0, "shared", 0)
        failures: list[BaseException] = []
        nthreads, per_thread = 6, 150

        def work(i: int) -> None:
            try:
                for j in range(per_thread):
                    k = (i + 1) * 1000 + j
                    t[k] = acct(k, f"t{i}", j)
                    assert t[k] == acct(k, f"t{i}", j)
                    if j % 10 == 0:
                        with db.transaction(program="incr") as tx:
                            r = tx.get("accounts", 0, for_update=True)
                            tx.update("accounts", 0, {"balance": r["balance"] + 1})
                assert [r["id"] for r in t.find("branch", f"t{i}")] == [(i + 1) * 1000 + j for j in range(per_thread)]
            except BaseException as e:  # reported by the main thread
                failures.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(nthreads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not failures, failures
        assert len(t) == 1 + nthreads * per_thread
        assert t[0]["balance"] == nthreads * (per_thread // 10)
