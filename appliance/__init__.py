"""appliance: an in-memory database appliance with real-time, block-level
backup to peer appliances.

General layout. Applications import only this package, :mod:`appliance.errors`
and :mod:`appliance.client`; everything else is internal and may change:

- ``store/``      the shared-memory data model (segments, blocks, readers, the writer)
- ``wire/``       wire formats: framing and the client <-> controller messages
- ``controller/`` the controller process (sole writer)
- ``client/``     the client library (this package re-exports it)
- ``cli/``        the ``appliance`` command
- ``_os/``        logging, systemd notification, signals
- ``_native``     the one importer of the C helpers (cext/, built by cffi)

Quick start::

    import appliance
    db = appliance.connect("config/bank.toml")
    accounts = db.table("accounts")
    accounts.get(7)
    with db.transaction(program="transfer", input={"src": 1, "dst": 2, "amount": 10}) as tx:
        a = tx.get("accounts", 1, for_update=True)
        tx.update("accounts", 1, {"balance": a["balance"] - 10})
"""
from . import errors
from .client import Client, Snapshot, Table, Transaction, connect

from ._version import __version__

__all__ = ["connect", "Client", "Table", "Snapshot", "Transaction", "errors", "__version__"]
