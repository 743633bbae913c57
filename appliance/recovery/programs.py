"""Programs: the callables whose transactions can be run again ([0014], [0086]).

A program is ``"module:function"``: ``function(tx, input)`` reads and
writes only through `tx` (a transaction) and takes everything else it needs
— amounts, the clock, random choices — from `input`, so that running it
again on the same input against the same data does the same thing. Its
version is its ``__version__`` attribute when it declares one, else a hash
of its source (of its compiled code when the source is not available).
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import marshal
import sys
import textwrap
from typing import Callable

from .. import errors

__all__ = ["resolve", "version_of", "check_name"]


def check_name(name) -> tuple[str, str]:
    """("module", "function") of a program name; ProgramError when it is not one."""
    if not isinstance(name, str) or name.count(":") != 1:
        raise errors.ProgramError(f"program {name!r}: a program is named 'module:function'", program=str(name))
    mod, fn = name.split(":")
    if not mod or not fn or not all(p.isidentifier() for p in mod.split(".")) or not fn.isidentifier():
        raise errors.ProgramError(f"program {name!r}: a program is named 'module:function'", program=name)
    return mod, fn


def resolve(name: str, path: tuple[str, ...] = ()) -> Callable:
    """The callable `name` designates (imported; `path`: folders searched first)."""
    mod, fn = check_name(name)
    for p in reversed(path):
        if p not in sys.path:
            sys.path.insert(0, p)
    try:
        module = importlib.import_module(mod)
    except Exception as exc:   # ImportError, or the module failing as it loads
        raise errors.ProgramError(f"program {name!r}: cannot import module {mod!r}: "
                                  f"{type(exc).__name__}: {exc}", program=name) from None
    obj = getattr(module, fn, None)
    if obj is None or not callable(obj):
        raise errors.ProgramError(f"program {name!r}: module {mod!r} has no callable {fn!r}", program=name)
    return obj


def version_of(fn: Callable) -> str:
    """The function's declared ``__version__``, else ``"sha256:<16 hex digits>"``
    of its source (or of its code object when there is no source)."""
    declared = getattr(fn, "__version__", None)
    if declared is not None:
        return str(declared)
    try:
        text = textwrap.dedent(inspect.getsource(fn)).encode()
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        text = marshal.dumps(code) if code is not None else repr(fn).encode()
    return "sha256:" + hashlib.sha256(text).hexdigest()[:16]
