"""The public surface: what `import appliance` promises applications.

Applications import only appliance, appliance.errors and appliance.client;
these names are pinned so that a change to them is a deliberate one.
"""
from __future__ import annotations

import sys

import appliance
import appliance.client
import appliance.client.api
import appliance.errors

TOP_LEVEL = {"connect", "Client", "Table", "Snapshot", "Transaction", "errors", "__version__"}
CLIENT = {"connect", "Client", "Table", "Snapshot", "Transaction"}
ERRORS = {
    "ApplianceError", "ConfigError", "UnavailableError", "AccessDeniedError", "ProtocolError", "ClosedError",
    "NoSuchTableError", "NoSuchFieldError", "WrongTypeError", "KeyTooLongError", "NoSuchRecordError",
    "DuplicateKeyError", "RecordTooLargeError", "TransactionCancelledError", "LockTimeoutError", "DeadlockError",
    "StaleReadError",
    "TransactionStateError", "CommitUnknownError", "BackupTimeoutError", "DiskError", "DiskFullError", "MemoryFullError", "ReadersFullError", "SnapshotTooOldError", "FormatError",
    "CorruptionError", "StaleEpochError", "BusyError", "ReadOnlyError", "NotServingReadsError", "LimitError", "InternalError", "error_for",
    "DamagedBlockError", "NotPrimaryError", "RoleError", "DeviceUnavailableError",
    "HistoryError", "ConflictError", "ProgramError",
}


class TestAll:
    def test_appliance_all(self):
        """appliance.__all__ is exactly the pinned set, without duplicates, and every name exists."""
        assert set(appliance.__all__) == TOP_LEVEL and len(appliance.__all__) == len(TOP_LEVEL)
        assert all(hasattr(appliance, n) for n in appliance.__all__)

    def test_client_all(self):
        """appliance.client.__all__ (and the api module's) is exactly the pinned set."""
        assert set(appliance.client.__all__) == CLIENT and len(appliance.client.__all__) == len(CLIENT)
        assert set(appliance.client.api.__all__) == CLIENT
        assert all(hasattr(appliance.client, n) for n in CLIENT)

    def test_errors_all(self):
        """appliance.errors.__all__ is exactly the pinned set, and every name exists."""
        assert set(appliance.errors.__all__) == ERRORS and len(appliance.errors.__all__) == len(ERRORS)
        assert all(hasattr(appliance.errors, n) for n in ERRORS)

    def test_star_import(self):
        """`from appliance import *` binds exactly the names of __all__."""
        ns: dict = {}
        exec("from appliance import *", ns)
        assert set(ns) - {"__builtins__"} == TOP_LEVEL


class TestReExports:
    def test_same_objects(self):
        """appliance re-exports the client library's very objects, not copies or wrappers."""
        for name in CLIENT:
            obj = getattr(appliance, name)
            assert obj is getattr(appliance.client, name) is getattr(appliance.client.api, name)

    def test_errors_module(self):
        """appliance.errors is the errors module itself."""
        assert appliance.errors is sys.modules["appliance.errors"]

    def test_version(self):
        """__version__ is a dotted version string."""
        parts = appliance.__version__.split(".")
        assert len(parts) == 3 and all(p.isdigit() for p in parts)
