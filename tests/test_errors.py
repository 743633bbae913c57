"""The one error table (cext/apl_errors.h) and the exception tree of
appliance.errors agree: each code has exactly one class, and back."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest

from appliance import errors
from appliance._native import CODES, ffi, lib

HEADER = Path(__file__).resolve().parent.parent / "cext" / "apl_errors.h"



def all_classes(cls=errors.ApplianceError):
    """The exception tree of appliance.errors (subclasses elsewhere, e.g. FrameError, inherit a code)."""
    yield cls
    for sub in cls.__subclasses__():
        if sub.__module__ == errors.__name__:
            yield from all_classes(sub)


def header_codes() -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"_\((APL_\w+),\s*(-\d+),", HEADER.read_text())}


def code_params():
    for name in sorted(CODES):
        yield pytest.param(name, id=name)


class TestErrorTable:
    def test_codes_are_the_header_table(self):
        """appliance._native.CODES holds exactly the APL_* names and numbers of cext/apl_errors.h."""
        assert CODES == header_codes()

    def test_codes_are_distinct_and_negative(self):
        """Every code number is negative and used once."""
        assert all(v < 0 for v in CODES.values())
        assert len(set(CODES.values())) == len(CODES)

    @pytest.mark.parametrize("name", sorted(CODES))
    def test_c_strings(self, name):
        """apl_strerror() gives 'NAME: reason' and apl_errname() gives NAME for every code."""
        code = CODES[name]
        assert ffi.string(lib.apl_errname(code)).decode() == name
        text = ffi.string(lib.apl_strerror(code)).decode()
        assert text.startswith(f"{name}: ") and len(text) > len(name) + 2

    @pytest.mark.parametrize("name", list(code_params()))
    def test_every_code_has_exactly_one_class(self, name):
        """class_for(code) is the one class whose `codes` lists the code."""
        owners = [c for c in all_classes() if name in c.codes]
        assert len(owners) == 1, owners
        assert errors.class_for(name) is owners[0]
        assert owners[0] is not errors.ApplianceError

    def test_no_class_claims_a_missing_code(self):
        """Every code a class claims exists in the C table."""
        claimed = {code: cls for cls in all_classes() for code in cls.codes}
        assert set(claimed) - set(CODES) == set()

    def test_every_public_class_is_in_the_tree(self):
        """Every exception named in errors.__all__ derives from ApplianceError and claims at least one code."""
        for name in errors.__all__:
            obj = getattr(errors, name)
            if isinstance(obj, type):
                assert issubclass(obj, errors.ApplianceError)
                assert obj.codes or obj is errors.ApplianceError, name

    def test_unknown_code_gives_base_class(self):
        """class_for() of a name not in the table is ApplianceError itself."""
        assert errors.class_for("APL_NOPE") is errors.ApplianceError
        e = errors.error_for("APL_NOPE", "what: why")
        assert type(e) is errors.ApplianceError and e.code == "APL_NOPE"


class TestErrorFor:
    @pytest.mark.parametrize("name", sorted(CODES))
    def test_builds_the_class_with_code_message_details(self, name):
        """error_for(code, message, **details) builds class_for(code) carrying code, str() and details."""
        e = errors.error_for(name, "accounts.get(7): something", table="accounts", key=7)
        assert type(e) is errors.class_for(name)
        assert e.code == name and str(e) == "accounts.get(7): something" and e.message == str(e)
        assert e.details == {"table": "accounts", "key": 7}

    def test_native_raise_for(self):
        """A negative C return code raises its class with 'what: reason' (appliance._native.raise_for)."""
        from appliance._native import check, raise_for
        with pytest.raises(errors.DuplicateKeyError) as ei:
            raise_for(lib.APL_EXISTS, "t.insert(1)", table="t")
        assert str(ei.value) == "t.insert(1): duplicate primary key" and ei.value.details == {"table": "t"}
        assert check(5, "ok") == 5

    def test_default_code_is_the_first_listed(self):
        """A class built directly gets its first code; a multi-code class keeps the one given."""
        assert errors.DeadlockError("x").code == "APL_EDEADLOCK"
        assert errors.FormatError("x").code == "APL_EVERSION"
        assert errors.error_for("APL_EGEOMETRY", "x").code == "APL_EGEOMETRY"

    @pytest.mark.parametrize("cls, base", [
        (errors.NoSuchRecordError, KeyError), (errors.WrongTypeError, TypeError),
        (errors.RecordTooLargeError, ValueError), (errors.KeyTooLongError, ValueError),
        (errors.AccessDeniedError, PermissionError), (errors.UnavailableError, ConnectionError),
        (errors.MemoryFullError, MemoryError), (errors.NoSuchTableError, LookupError),
        (errors.NoSuchFieldError, LookupError), (errors.LockTimeoutError, errors.TransactionCancelledError),
        (errors.DeadlockError, errors.TransactionCancelledError), (errors.CommitUnknownError, errors.UnavailableError),
    ], ids=lambda c: c.__name__)
    def test_standard_exception_bases(self, cls, base):
        """Errors callers treat as standard ones (or as a family) also derive from them."""
        assert issubclass(cls, base)

    def test_keyerror_str_is_the_message(self):
        """str() of a NoSuchRecordError is the plain message, not KeyError's repr of it."""
        e = errors.NoSuchRecordError("accounts[7]: no such record", table="accounts", key=7)
        assert str(e) == "accounts[7]: no such record"
        with pytest.raises(KeyError):
            raise e


class TestUnknownCodes:
    @pytest.mark.parametrize("rc", [-31999, -30000, -5, -(1 << 31)])
    def test_unknown_c_code_is_an_internal_error_not_a_retry(self, rc):
        """A negative return code not in the table raises InternalError naming the number, never an UnavailableError (which tells the caller to retry)."""
        from appliance._native import check
        with pytest.raises(errors.ApplianceError) as ei:
            check(rc, "t.op(1)")
        assert type(ei.value) is errors.InternalError and ei.value.code == "APL_EINTERNAL"
        assert not isinstance(ei.value, errors.UnavailableError)
        assert str(ei.value) == f"t.op(1): internal error: unknown error code {rc}"

    def test_base_class_code_is_internal(self):
        """ApplianceError built without a code (e.g. raised by the controller and sent on the wire) comes back as InternalError, not CommitUnknownError."""
        e = errors.ApplianceError("something broke")
        assert e.code == "APL_EINTERNAL"
        assert errors.error_for(e.code, e.message).__class__ is errors.InternalError

    def test_commit_unknown_is_only_its_own_code(self):
        """Only APL_EUNKNOWN (a commit whose outcome could not be recovered) maps to CommitUnknownError."""
        assert [n for n in CODES if errors.class_for(n) is errors.CommitUnknownError] == ["APL_EUNKNOWN"]


class TestPickle:
    @pytest.mark.parametrize("cls", sorted(all_classes(), key=lambda c: c.__name__), ids=lambda c: c.__name__)
    def test_round_trip_keeps_class_message_code_details(self, cls):
        """Every exception class pickles and unpickles with its class, message, code and details."""
        code = cls.codes[-1] if cls.codes else "APL_EINTERNAL"
        e = cls("t.op(1): reason", code=code, table="t", key=b"\x00k", nested={"a": [1, 2]})
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is cls
        assert str(back) == "t.op(1): reason" and back.code == code
        assert back.details == {"table": "t", "key": b"\x00k", "nested": {"a": [1, 2]}}
