"""The recovery operations from Python: what ``appliance history``,
``restore``, ``cancel``, ``rerun`` and ``batch`` call (Client.history,
Client.restore, ...). Each long operation gets a connection of its own,
whose reply may take as long as the operation's `timeout` (the controller
answers before it: BusyError, HistoryError ...), so a client's other
threads go on meanwhile.
"""
from __future__ import annotations

from typing import Any

from .. import errors
from ..recovery.restore import Target, parse_target
from ..wire import messages as m
from .session import Session

__all__ = ["history", "restore", "cancel_txn", "batch", "target_of", "key_of"]

#: seconds a reply may take beyond the operation's own bound
_GRACE = 30.0


def target_of(v) -> Target:
    """A Target from a Target, a serial (int) or an operator's text (see parse_target)."""
    if isinstance(v, Target):
        return v
    if type(v) is int:
        return Target(serial=v)
    if isinstance(v, str):
        return parse_target(v)
    raise errors.WrongTypeError(f"a target is a serial, a time text or a Target, not {v!r}")


def key_of(db, table: str, text):
    """A primary-key value from an operator's text, by the table's key type."""
    t = db.schema.table(table)
    if not isinstance(text, str):
        return text
    kind = t.types[t.pk]
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise errors.WrongTypeError(f"{table}: key {text!r} is not an int ({t.pk} is an int)",
                                        table=table) from None
    return text.encode() if kind == "bytes" else text


def _session(db, timeout: float) -> Session:
    cfg = db.config
    s = Session(str(cfg.socket_path), cfg.name, name="appliance-recovery", timeout=timeout + _GRACE,
                max_frame=cfg.controller.max_frame)
    s.connect()
    return s


def _one(db, req: list, what: str, timeout: float):
    s = _session(db, timeout)
    try:
        return s.call(req, what)
    finally:
        s.close()


def history(db, *, program: str | None = None, table: str | None = None, key: Any = None,
            since=None, until=None, limit: int = 1000, images: bool = True, timeout: float = 120.0) -> dict:
    """Committed transactions, oldest first, that changed `table` (or the
    record `key` of it) or ran `program`, between `since` and `until`
    (serials or times); each with txn, serial, time_ns, program, version,
    input and its changes (table, kind, key, b, a). At most `limit`; "next"
    is the serial to ask from for more."""
    q: dict = {"limit": limit, "images": images}
    if program is not None:
        q["program"] = program
    if table is not None:
        q["table"] = table
    if key is not None:
        q["key"] = key
    for name, v in (("since", since), ("until", until)):
        if v is not None:
            t = target_of(v)
            q[name if t.serial is not None else name + "_ns"] = t.serial if t.serial is not None else t.time_ns
    return _one(db, [m.OP_HISTORY, q], "history", timeout)


def restore(db, to, *, table: str | None = None, blocks: list[int] | None = None, dry_run: bool = False,
            timeout: float = 60.0, commit_timeout: float | None = None) -> dict:
    """Point-in-time restore of the whole database, one table or chosen
    blocks, back to `to` (a serial, a time text, or a Target). New writes
    wait while it runs (up to `timeout` for open transactions to end); it
    commits as logged transactions (program "restore"). With `dry_run`
    nothing changes and "changes" lists the records that would."""
    opts: dict = {"dry_run": dry_run, "timeout": timeout}
    if table is not None:
        opts["table"] = table
    if blocks is not None:
        opts["blocks"] = list(blocks)
    if commit_timeout is not None:
        opts["commit_timeout"] = commit_timeout
    return _one(db, [m.OP_RESTORE, target_of(to).wire(), opts], "restore", timeout + (commit_timeout or 0))


def cancel_txn(db, txn: int, *, dry_run: bool = False, timeout: float = 60.0) -> dict:
    """Undo committed transaction `txn` from its B logs, as a logged
    transaction (program "cancel"); ConflictError, listing them, when later
    transactions changed its records."""
    return _one(db, [m.OP_CANCEL_TXN, txn, {"dry_run": dry_run, "timeout": timeout}], "cancel", timeout)


def batch(db, action: str, at=None, timeout: float = 120.0) -> dict:
    """Batch mode on a secondary: "begin" (optionally `at` an earlier serial
    or time), "end", "status"."""
    req = [m.OP_BATCH, action] if at is None else [m.OP_BATCH, action, target_of(at).wire()]
    return _one(db, req, f"batch {action}", timeout)
