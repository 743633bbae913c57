"""Records against a table's schema: validation, canonical encoding, keys.

A record is stored in the table's fixed layout (cext/apl_rec.h: a null
bitmap, fixed-width int/float/bool slots, then the str/bytes values, fields in
schema order), written and read by the table's :class:`RecordCodec` (C), so a
read builds its dict in one native call and every process hands back the same
dict. Validation says what and where: ``accounts[7].balance: expected int,
got str``; the codec's encoder sends any record that is not canonical through
:meth:`TableSchema.full`, so its errors are these.
"""
from __future__ import annotations

import math
from typing import Any

from .. import errors
from .._native import RecordCodec
from ..config import Config, TableConfig
from .keys import KeyCodec

__all__ = ["Schema", "TableSchema"]

_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_MISSING = object()


def _check_int(v):
    return type(v) is int and _I64_MIN <= v <= _I64_MAX


_CHECKS = {
    "int": _check_int,
    "str": lambda v: type(v) is str,
    "bytes": lambda v: isinstance(v, (bytes, bytearray, memoryview)),
    "float": lambda v: (type(v) is float and not math.isnan(v)) or type(v) is int,
    "bool": lambda v: type(v) is bool,
}
_CONVERT = {"bytes": bytes, "float": float}
#: the Python type a field's value has once stored (what a read hands back)
_STORED = {"int": int, "str": str, "bytes": bytes, "float": float, "bool": bool}


def _stored_default(c):
    """A field's default as it is stored: a float field's 0 is 0.0, a bytes
    field's "ab" is b"ab"."""
    d = c.default
    if d is None:
        return None
    if c.type == "float":
        return float(d)
    if c.type == "bytes" and isinstance(d, str):
        return d.encode("utf-8")
    return d


class TableSchema:
    """One table: its fields, keys and file ids."""

    __slots__ = ("name", "cfg", "file", "fields", "types", "required", "defaults", "pk", "pk_codec",
                 "alt", "max_record", "codec", "decode", "_order", "_spec", "_alt_list",
                 "pk_stored", "alt_stored")

    def __init__(self, name: str, cfg: TableConfig, file: int, alt_files: dict[str, int],
                 max_record: int) -> None:
        self.name = name
        self.cfg = cfg
        self.file = file
        self.fields = tuple(cfg.fields)
        self.types = {f: c.type for f, c in cfg.fields.items()}
        self.required = frozenset(f for f, c in cfg.fields.items() if c.required)
        self.defaults = {f: _stored_default(c) for f, c in cfg.fields.items() if not c.required}
        self.pk = cfg.primary_key
        self.pk_codec = KeyCodec(self.types[self.pk], f"{name}.{self.pk}")
        #: alternate key field -> (index file id, codec)
        self.alt = {f: (alt_files[f], KeyCodec(self.types[f], f"{name}.{f}")) for f in cfg.alternate_keys}
        self.max_record = max_record
        self._order = {f: i for i, f in enumerate(self.fields)}
        #: (field, type check, conversion or None, required, default, nullable) in schema order
        self._spec = tuple((f, _CHECKS[c.type], _CONVERT.get(c.type), c.required, _stored_default(c), c.nullable)
                           for f, c in cfg.fields.items())
        self._alt_list = tuple((f, fid, codec.encode_raw) for f, (fid, codec) in self.alt.items())
        #: the primary key's stored type; per alternate key (field, index file id, encode_raw,
        #: stored type): a value of exactly that type is canonical as given (bulk load)
        self.pk_stored = _STORED[self.types[self.pk]]
        self.alt_stored = tuple((f, fid, enc, _STORED[self.types[f]]) for f, fid, enc in self._alt_list)
        #: the table's records as images and back (cext/apl_rec.h)
        self.codec = RecordCodec([(f, c.type, c.nullable) for f, c in cfg.fields.items()], self.full,
                                 self._codec_error)
        #: decode(image) -> the record (a dict); CorruptionError for a damaged image
        self.decode = self.codec.decode

    # -- keys --------------------------------------------------------------------

    def key(self, value) -> bytes:
        return self.pk_codec.encode(value)

    def alt_key(self, field: str, value) -> bytes:
        try:
            return self.alt[field][1].encode(value)
        except KeyError:
            if field in self.types:
                raise errors.NoSuchFieldError(
                    f"{self.name}.find({field!r}): {field!r} is not an alternate key "
                    f"(alternate keys: {', '.join(self.alt) or 'none'})", table=self.name, field=field) from None
            raise errors.NoSuchFieldError(f"{self.name}: no such field {field!r}", table=self.name,
                                          field=field) from None

    def alt_entries(self, rec: dict, pk: bytes) -> list[tuple[int, bytes]]:
        """Index entries of a record: (index file id, encode(alt value) + encode(pk))."""
        return [(fid, enc(rec[f]) + pk) for f, fid, enc in self._alt_list if rec.get(f) is not None]

    # -- validation ----------------------------------------------------------------

    def _where(self, key) -> str:
        r = repr(key)
        return f"{self.name}[{r if len(r) <= 60 else r[:60] + '...'}]"

    def _check_value(self, field: str, v: Any, where: str):
        if v is None:
            if self.cfg.fields[field].nullable:
                return None
            raise errors.WrongTypeError(f"{where}.{field}: may not be None", table=self.name, field=field)
        t = self.types[field]
        if not _CHECKS[t](v):
            if t == "int" and type(v) is int:
                extra = " (outside the signed 64-bit range)"
            elif type(v) is float and math.isnan(v):
                raise errors.WrongTypeError(f"{where}.{field}: NaN is not a storable float", table=self.name,
                                            field=field, expected=t)
            else:
                extra = ""
            raise errors.WrongTypeError(f"{where}.{field}: expected {t}, got {type(v).__name__}{extra}",
                                        table=self.name, field=field, expected=t)
        conv = _CONVERT.get(t)
        return conv(v) if conv else v

    def _unknown(self, rec: dict, where: str):
        for f in rec:
            if f not in self._order:
                raise errors.NoSuchFieldError(f"{where}: no such field {f!r} (fields: {', '.join(self.fields)})",
                                              table=self.name, field=f)

    def full(self, rec: Any, key=None) -> dict:
        """A complete, canonical record (insert / put). `key` must match the
        primary-key field when both are given."""
        if type(rec) is not dict:
            if not isinstance(rec, dict):
                raise errors.WrongTypeError(f"{self.name}: a record must be a dict, not {type(rec).__name__}",
                                            table=self.name)
            rec = dict(rec)
        if key is not None:
            if self.pk in rec and rec[self.pk] != key:
                raise errors.WrongTypeError(
                    f"{self._where(key)}: the record's {self.pk}={rec[self.pk]!r} differs from the key",
                    table=self.name, field=self.pk)
        out = {}
        found = 0
        get = rec.get
        for f, check, conv, required, default, nullable in self._spec:
            v = get(f, _MISSING)
            if v is _MISSING:
                if f == self.pk and key is not None:
                    v = key
                elif required:
                    where = self._where(key if key is not None else get(self.pk))
                    self._unknown(rec, where)
                    raise errors.WrongTypeError(f"{where}: field {f!r} ({self.types[f]}) is required",
                                                table=self.name, field=f)
                else:
                    out[f] = default
                    continue
            else:
                found += 1
            if v is None:
                if not nullable:
                    raise errors.WrongTypeError(
                        f"{self._where(key if key is not None else get(self.pk))}.{f}: may not be None",
                        table=self.name, field=f)
            elif not check(v):
                self._check_value(f, v, self._where(key if key is not None else get(self.pk)))
            elif conv is not None:
                v = conv(v)
            out[f] = v
        if found != len(rec):
            self._unknown(rec, self._where(key if key is not None else get(self.pk)))
        return out

    def merge(self, old: dict, changes: Any, key) -> dict:
        """`old` updated with `changes` (update). The primary key cannot change."""
        if not isinstance(changes, dict):
            raise errors.WrongTypeError(f"{self._where(key)}: changes must be a dict, not {type(changes).__name__}",
                                        table=self.name)
        where = self._where(key)
        self._unknown(changes, where)
        if self.pk in changes and changes[self.pk] != old[self.pk]:
            raise errors.WrongTypeError(f"{where}: the primary key {self.pk!r} cannot change "
                                        "(delete the record and insert a new one)", table=self.name, field=self.pk)
        new = dict(old)
        for f, v in changes.items():
            new[f] = self._check_value(f, v, where)
        return new

    def encode(self, rec: dict, pk: bytes) -> bytes:
        """The stored image of a record (validated and made canonical first
        if it is not); checks that slot + key + record fit a block."""
        return self.codec.encode(rec, max(0, self.max_record - 16 - len(pk)))

    def _codec_error(self, kind: str, *args) -> errors.ApplianceError:
        """The error the codec raises: a record too large for a block, a value
        the format cannot hold, a damaged image."""
        if kind == "too_large":
            rec, size, limit = args
            return errors.RecordTooLargeError(
                f"{self._where(rec.get(self.pk))}: record of {size} bytes exceeds the maximum of "
                f"{limit} for this block size", table=self.name, size=size, limit=limit)
        if kind == "invalid":
            field, reason = args
            return errors.WrongTypeError(f"{self.name}.{field}: {reason}", table=self.name, field=field)
        detail, size = args
        return errors.CorruptionError(f"{self.name}: a record image of {size} bytes is damaged: {detail}",
                                      table=self.name, size=size)

    def check_keys(self, pk: bytes, entries: list[tuple[int, bytes]], max_key: int) -> None:
        if len(pk) > max_key:
            raise errors.KeyTooLongError(f"{self.name}: primary key of {len(pk)} encoded bytes exceeds {max_key}",
                                         table=self.name)
        for fid, k in entries:
            if len(k) > max_key:
                raise errors.KeyTooLongError(
                    f"{self.name}: alternate key plus primary key of {len(k)} encoded bytes exceeds {max_key}",
                    table=self.name)


class Schema:
    """Every table of a configuration, with file ids in the order the store uses."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        files = cfg.files()
        ids = {name: i for i, (name, _t, _f) in enumerate(files)}
        bsize = cfg.storage.block_size
        # a leaf record takes slot (16) + key + value <= (block - header 64) / 2
        max_rec_total = (bsize - 64) // 2
        self.tables: dict[str, TableSchema] = {}
        for tname, t in cfg.tables.items():
            alt_files = {f: ids[f"{tname}.{f}"] for f in t.alternate_keys}
            self.tables[tname] = TableSchema(tname, t, ids[tname], alt_files, max_rec_total)
        self.files = files
        #: primary file id -> its table (change-log entries name files)
        self.by_file: dict[int, TableSchema] = {t.file: t for t in self.tables.values()}
        self.max_key = min(1024, (bsize - 64) // 4 - 16)

    def table(self, name: str) -> TableSchema:
        try:
            return self.tables[name]
        except (KeyError, TypeError):
            raise errors.NoSuchTableError(
                f"no such table {name!r} (tables: {', '.join(self.tables)})", table=str(name)) from None
