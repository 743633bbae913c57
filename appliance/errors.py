"""Every error appliance raises, in one tree.

The codes live in one table, ``cext/apl_errors.h`` (C helpers, controller,
client library and wire share it). Each code maps to exactly one class here,
through the class attribute ``codes``; :func:`error_for` builds the exception
for a code, and the controller sends ``(code, message, details)`` on the wire
so a client raises the same class the controller saw.

Names describe what happened: :class:`ClosedError` means *your* code closed a
handle; :class:`UnavailableError` means the controller is not there.
Exceptions that callers treat as standard ones also derive from them:
:class:`NoSuchRecordError` is a ``KeyError`` (tables are mappings),
:class:`WrongTypeError` a ``TypeError``, :class:`RecordTooLargeError` a
``ValueError``, :class:`AccessDeniedError` a ``PermissionError``.
"""
from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "ApplianceError",
    "ConfigError",
    "UnavailableError",
    "AccessDeniedError",
    "ProtocolError",
    "ClosedError",
    "NoSuchTableError",
    "NoSuchFieldError",
    "WrongTypeError",
    "KeyTooLongError",
    "NoSuchRecordError",
    "DuplicateKeyError",
    "RecordTooLargeError",
    "TransactionCancelledError",
    "LockTimeoutError",
    "DeadlockError",
    "StaleReadError",
    "TransactionStateError",
    "CommitUnknownError",
    "BackupTimeoutError",
    "DiskError",
    "DiskFullError",
    "MemoryFullError",
    "ReadersFullError",
    "SnapshotTooOldError",
    "FormatError",
    "CorruptionError",
    "DamagedBlockError",
    "DeviceUnavailableError",
    "StaleEpochError",
    "BusyError",
    "ReadOnlyError",
    "NotPrimaryError",
    "RoleError",
    "NotServingReadsError",
    "LimitError",
    "HistoryError",
    "ConflictError",
    "ProgramError",
    "InternalError",
    "error_for",
]

# Exit statuses of the processes and the CLI (sysexits.h where one fits), in one place.
# systemd shows them by these names (`systemctl status`: "status=66/NOINPUT").
EXIT_OK = 0
EXIT_REFUSED = 1     # the CLI: a refused operation (a typed error, its message on stderr)
EXIT_USAGE = 2       # the CLI: bad arguments (click's own)
EXIT_NOT_RUNNING = 3 # the CLI: the appliance is not running
EXIT_ENVIRONMENT = 64  # EX_USAGE: the process's environment is refused (APPLIANCE_LOG_LEVEL ..., a unit's Environment=)
EXIT_NOINPUT = 66    # EX_NOINPUT: a file the configuration names is missing (secret_file, tls_cert, tls_key, tls_ca)
EXIT_NOUSER = 67     # EX_NOUSER: run by a user whose segments logind's RemoveIPC= would delete (not a system user)
EXIT_BUSY = 69       # EX_UNAVAILABLE: another controller serves this appliance (or its socket); an address in use
EXIT_NOSPACE = 73    # EX_CANTCREAT: shared memory cannot hold the segments (/dev/shm too small)
EXIT_IOERR = 74      # EX_IOERR: the durability files cannot be used (a cold start refused, the directory unusable)
EXIT_TEMPFAIL = 75   # EX_TEMPFAIL: try again later (systemd restarts an agent on it)
EXIT_NOPERM = 77     # EX_NOPERM: a file or directory the process needs is not its to read or write
                     # (the socket's directory, a secret readable by others)
EXIT_CONFIG = 78     # EX_CONFIG: the configuration is refused
EXIT_SOFTWARE = 70   # EX_SOFTWARE: the controller stopped itself rather than publish a batch it could not
                     # finish; the restarted controller rolls that batch back

#: Why a process was refused at start, as an error's ``details["cause"]``, and
#: the exit status that says so. An error without a cause exits by its class
#: (:func:`exit_status`).
START_CAUSES = {
    "environment": EXIT_ENVIRONMENT,
    "missing_file": EXIT_NOINPUT,
    "user": EXIT_NOUSER,
    "address_in_use": EXIT_BUSY,
    "permission": EXIT_NOPERM,
}


class ApplianceError(Exception):
    """Base of every appliance error.

    ``str(err)`` is ``"<what>: <reason>"``; ``err.code`` is the APL_* name and
    ``err.details`` a dict with the structured facts (table, key, file ...).
    """

    codes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or (self.codes[0] if self.codes else "APL_EINTERNAL")
        self.details = details

    def __str__(self) -> str:  # KeyError's str() would repr the message
        return self.message

    def __reduce__(self):  # picklable across processes, details included
        return (_rebuild, (type(self), self.message, self.code, self.details))


def _rebuild(cls, message, code, details):
    return cls(message, code=code, **details)


class ConfigError(ApplianceError):
    """The configuration file is missing, unreadable or invalid.

    ``details``: ``file``, ``key`` (dotted path) and ``problem``.
    """

    codes = ("APL_ECONFIG",)


class UnavailableError(ApplianceError, ConnectionError):
    """The appliance is not running or its controller cannot be reached.

    Writes raise it while the controller is down; the client reconnects by
    itself on the next call once the controller is back.
    """

    codes = ("APL_EUNAVAIL",)


class AccessDeniedError(ApplianceError, PermissionError):
    """The controller refused the connecting user (not in the config's access list)."""

    codes = ("APL_EACCESS",)


class ProtocolError(ApplianceError):
    """A peer sent something that is not a valid frame or message."""

    codes = ("APL_EPROTO",)


class ClosedError(ApplianceError):
    """The handle (client, snapshot, transaction) was closed by its owner."""

    codes = ("APL_ECLOSED",)


class NoSuchTableError(ApplianceError, LookupError):
    codes = ("APL_ENOTABLE",)


class NoSuchFieldError(ApplianceError, LookupError):
    codes = ("APL_ENOFIELD",)


class WrongTypeError(ApplianceError, TypeError):
    """A field's value does not have the type the schema gives it."""

    codes = ("APL_ETYPE",)


class KeyTooLongError(ApplianceError, ValueError):
    codes = ("APL_EKEY",)


class NoSuchRecordError(ApplianceError, KeyError):
    codes = ("APL_NOTFOUND",)


class DuplicateKeyError(ApplianceError):
    codes = ("APL_EXISTS",)


class RecordTooLargeError(ApplianceError, ValueError):
    codes = ("APL_ETOOBIG",)


class TransactionCancelledError(ApplianceError):
    """The transaction was cancelled and everything it did was undone."""

    codes = ("APL_ECANCELLED",)


class LockTimeoutError(TransactionCancelledError):
    """A lock wait exceeded the configured timeout; the transaction was cancelled."""

    codes = ("APL_ELOCKTIMEOUT",)


class DeadlockError(TransactionCancelledError):
    """The transaction closed a cycle of lock waits and was cancelled as the victim."""

    codes = ("APL_EDEADLOCK",)


class StaleReadError(TransactionCancelledError):
    """An optimistic transaction's get for update read a record that another
    transaction changed before this one's lock on it was taken; the
    transaction was cancelled (nothing it did remains): run it again.
    ``details``: ``table``, ``key``."""

    codes = ("APL_ESTALEREAD",)


class TransactionStateError(ApplianceError):
    """An operation on a transaction that is not open (committed, cancelled, unknown)."""

    codes = ("APL_ETXN",)


class CommitUnknownError(UnavailableError):
    """The controller stopped between the commit request and its answer, and
    the outcome could not be recovered afterwards."""

    codes = ("APL_EUNKNOWN",)


class BackupTimeoutError(ApplianceError):
    """A commit is done on the primary, but its synchronous secondaries did
    not confirm the backup within the commit's wait bound (``commit_timeout``).

    The transaction is committed and visible there; its records stay locked
    until the backup is confirmed (or the secondary's ``on_unreachable``
    policy degrades it). Do not retry it: it would run twice. ``details``:
    ``txn``, ``serial``, ``version``, ``waiting_for`` (the secondaries not
    confirmed), ``after_s``.
    """

    codes = ("APL_EBACKUP",)


class DiskError(ApplianceError):
    """The durability files (``[durability] dir``: log files, checkpoints)
    could not be written or read: an I/O error, a file that is not the
    appliance's, a directory it may not use. ``details``: ``path``, and for a
    commit ``txn`` and ``committed`` (True: applied in memory, its log not yet
    on disk; False: refused, nothing changed)."""

    codes = ("APL_EDISK",)


class DiskFullError(DiskError):
    """No space left on the disk of ``[durability] dir``. While it lasts,
    commits are refused (nothing changed; retry once space returns) and the
    appliance writes the log it holds as soon as space returns."""

    codes = ("APL_ENOSPC",)


class MemoryFullError(ApplianceError, MemoryError):
    """No free block slot is left in the appliance's segments."""

    codes = ("APL_EFULL",)


class ReadersFullError(ApplianceError):
    """Every reader slot is taken (raise ``max_readers`` in the config)."""

    codes = ("APL_EREADERS",)


class SnapshotTooOldError(ApplianceError):
    """A read at a snapshot's version found that version freed: its reader
    slot was cleared by the controller (its process had no session) or
    overwritten through the readers segment. Nothing wrong was returned; open
    a new snapshot."""

    codes = ("APL_ESNAPSHOT",)


class FormatError(ApplianceError):
    """Existing segments do not match this build or this configuration."""

    codes = ("APL_EVERSION", "APL_EMAGIC", "APL_EGEOMETRY")


class CorruptionError(ApplianceError):
    codes = ("APL_ECORRUPT",)


class DamagedBlockError(CorruptionError):
    """A change needs a block whose content no longer matches its checksum
    (its memory was damaged): it is refused and nothing changes. ``appliance
    verify`` names the damaged blocks, ``appliance repair`` copies them again
    from a peer."""

    codes = ("APL_EDAMAGED",)


class DeviceUnavailableError(ApplianceError):
    """A read or a change needs a block that lies on a storage device (a
    device segment) taken out of service (``appliance device detach``) and
    not refilled yet; everything else keeps working. ``details["devices"]``:
    the detached devices ("1", or "1,3"). ``appliance device replace`` refills them from a
    peer; a change refused with it changed nothing."""

    codes = ("APL_EDEVICE",)


class StaleEpochError(ApplianceError):
    """A message from an epoch older than one already seen (a deposed primary)."""

    codes = ("APL_ESTALE",)


class ReadOnlyError(ApplianceError):
    """A write sent to a secondary appliance (it only takes its primary's changes)."""

    codes = ("APL_EREADONLY",)


class NotPrimaryError(ApplianceError):
    """A write sent to a primary that was deposed: it learnt that another
    appliance became primary at a newer epoch (a failover), so it takes no
    writes any more ("fenced"); reads still work. ``details``: ``epoch`` (the
    newer one), ``primary`` (its name, when known). Write to the new primary;
    do not retry here. A commit answered with it while waiting for its
    synchronous backup was never confirmed by a secondary: the new primary
    does not have it, and it is undone here when this appliance rejoins."""

    codes = ("APL_ENOTPRIMARY",)


class RoleError(ApplianceError):
    """An operator's operation that does not fit the appliance's role or
    state now (promote a secondary whose block copy is not complete, rejoin
    an appliance that is already a secondary ...); nothing was changed."""

    codes = ("APL_EROLE",)


class NotServingReadsError(ApplianceError):
    """A client attached to a secondary that keeps lz4 backup blocks
    (``replication.serve_reads = false``): it serves no reads."""

    codes = ("APL_ENOREAD",)


class BusyError(ApplianceError):
    """The resource is in use (e.g. another controller serves these segments)."""

    codes = ("APL_EBUSY",)


class LimitError(ApplianceError, ValueError):
    """A request exceeds a configured limit (the message names the setting),
    e.g. more records in one OP_LOAD than ``controller.max_load_records``."""

    codes = ("APL_ELIMIT",)


class HistoryError(ApplianceError):
    """The log history does not hold what an operation needs: it does not
    reach back to the point asked for (trimmed by ``history_period`` or
    ``history_disk``, a gap after a block copy), it was kept without B
    images, or the appliance keeps none. ``details``: what it does cover
    (``earliest_serial``, ``earliest_time_ns``) where known."""

    codes = ("APL_ENOHISTORY",)


class ConflictError(ApplianceError):
    """A recovery operation was refused, nothing changed: later transactions
    changed the records it would change (cancel), or the state a re-run
    meets is not the one a transaction recorded (rerun). ``details``:
    ``conflicts``, a text listing each transaction and record."""

    codes = ("APL_ECONFLICT",)


class ProgramError(ApplianceError):
    """A program named ``module:function`` cannot be imported, or (rerun) is
    not the version its transactions recorded. ``details``: ``program``."""

    codes = ("APL_EPROGRAM",)


class InternalError(ApplianceError):
    """A fault inside appliance itself, not the caller's: retrying does not help.
    ``APL_EINTERNAL`` is what an error code this build does not know becomes."""

    codes = ("APL_EINTERNAL", "APL_EINVAL", "APL_ENOMEM", "APL_EBATCH", "APL_EBUFSIZE", "APL_ELOGFULL",
             "APL_EFILE", "APL_EUNDO")


def exit_status(e: BaseException) -> int:
    """The exit status of a process (controller, agent, CLI command) that
    stops on `e` at start: by its ``cause`` (START_CAUSES), else by its class."""
    cause = getattr(e, "details", {}).get("cause")
    if cause in START_CAUSES:
        return START_CAUSES[cause]
    if isinstance(e, BusyError):
        return EXIT_BUSY
    if isinstance(e, MemoryFullError):
        return EXIT_NOSPACE
    if isinstance(e, DiskError):
        return EXIT_IOERR
    if isinstance(e, UnavailableError):
        return EXIT_TEMPFAIL
    if isinstance(e, (ConfigError, FormatError, AccessDeniedError)):
        return EXIT_CONFIG
    return EXIT_REFUSED


def _all_classes(cls=ApplianceError):
    yield cls
    for sub in cls.__subclasses__():
        yield from _all_classes(sub)


_BY_NAME: dict[str, type[ApplianceError]] = {}
for _cls in _all_classes():
    for _name in _cls.codes:
        if _name in _BY_NAME:  # pragma: no cover - guarded by tests/test_errors.py
            raise RuntimeError(f"error code {_name} mapped twice")
        _BY_NAME[_name] = _cls


def class_for(code_name: str) -> type[ApplianceError]:
    """The class of an APL_* name; ApplianceError itself for a name not in the
    table (never a class that tells the caller to retry)."""
    return _BY_NAME.get(code_name, ApplianceError)


def error_for(code_name: str, message: str, **details: Any) -> ApplianceError:
    """The exception for an APL_* name, e.g. from a wire reply."""
    return class_for(code_name)(message, code=code_name, **details)
