"""The one importer of the compiled C helpers (``appliance._cext``).

``ffi`` and ``lib`` are the cffi module; ``RecordCodec`` and ``TableReader``
are the read path's CPython types (cext/apl_py.c), which the module installs
into itself on first import. ``check(rc, what)`` turns a negative APL_*
return code into the exception of ``appliance.errors`` and records the
failing operation in the message, as ``"<what>: <reason>"``.
"""
from __future__ import annotations

from typing import Any

from . import errors

try:
    from ._cext import ffi, lib
except ImportError as exc:  # pragma: no cover - a broken install
    raise ImportError(
        "appliance's C helpers are not built; install the package with "
        "`pip install .` (or run the README's set-up command)"
    ) from exc

if lib.apl_py_install(b"appliance._cext") != 0:   # pragma: no cover - a broken build
    raise ImportError("appliance's C helpers could not install their read types (RecordCodec, TableReader)")
from ._cext import RecordCodec, TableReader  # noqa: E402

__all__ = ["ffi", "lib", "RecordCodec", "TableReader", "check", "code_name", "raise_for", "CODES", "view_address"]

#: APL_* name -> number, read from the one table in cext/apl_errors.h
CODES: dict[str, int] = {
    name: getattr(lib, name) for name in dir(lib) if name.startswith("APL_E") or name == "APL_NOTFOUND"
    if isinstance(getattr(lib, name), int) and getattr(lib, name) < 0
}
_NAMES: dict[int, str] = {v: k for k, v in CODES.items()}


def code_name(rc: int) -> str:
    """The APL_* name of a code; APL_EINTERNAL for a code not in the table
    (an internal fault: never a code that tells the caller to retry)."""
    return _NAMES.get(rc, "APL_EINTERNAL")


def reason(rc: int) -> str:
    if rc not in _NAMES:
        return f"internal error: unknown error code {rc}"
    text = ffi.string(lib.apl_strerror(rc)).decode()
    return text.split(": ", 1)[1] if ": " in text else text


def detached(sb) -> list[int]:
    """The device segments out of service (sb_detached of a superblock)."""
    mask = sb.sb_detached
    return [i for i in range(64) if mask >> i & 1]


def raise_for(rc: int, what: str, *, sb=None, **details: Any) -> None:
    """Raise the exception of `rc`; `sb` (the appliance's superblock) names
    the detached devices of an APL_EDEVICE."""
    text = reason(rc)
    if rc == lib.APL_EDEVICE and sb is not None:
        devs = details.setdefault("devices", ",".join(map(str, detached(sb))))
        text += f" (device {devs or '?'})"
    raise errors.error_for(code_name(rc), f"{what}: {text}", **details)


def check(rc: int, what: str, *, sb=None, **details: Any) -> int:
    """Return rc when it is >= 0, else raise the matching exception."""
    if rc < 0:
        raise_for(rc, what, sb=sb, **details)
    return rc


def view_address(view) -> int:
    """The address of a C view (``apl_view *``), as TableReader takes it."""
    return int(ffi.cast("uintptr_t", view))
