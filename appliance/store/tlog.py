"""The T log ([0008], [0086]): what a transaction's BEGIN entry carries —
which program ran, with what input, and which version of it.

One msgpack array: ``[program, input]``, or ``[program, input, version]``
when the transaction was run by a program callable (``db.run``): `program`
is then ``"module:function"`` and `version` the function's declared
``__version__`` or a hash of its code (appliance.recovery.programs). A
program name without a version (``db.transaction(program="transfer")``)
names a program but no callable: it cannot be run again, only its A images
re-applied. The controller writes it (controller/txn.py); history, restore
and rerun read it.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import msgpack

__all__ = ["TLog", "encode", "decode"]

_packb = msgpack.Packer(use_bin_type=True).pack


class TLog(NamedTuple):
    program: str | None
    input: Any
    version: str | None


def encode(program: str | None, input: Any, version: str | None = None) -> bytes:
    return _packb([program, input] if version is None else [program, input, version])


def decode(raw: bytes) -> TLog:
    """The T log of a BEGIN entry; an unreadable one gives TLog(None, None, None)."""
    try:
        v = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return TLog(None, None, None)
    if type(v) is not list or len(v) not in (2, 3):
        return TLog(None, None, None)
    program = v[0] if isinstance(v[0], str) else None
    version = v[2] if len(v) == 3 and isinstance(v[2], str) else None
    return TLog(program, v[1], version)
