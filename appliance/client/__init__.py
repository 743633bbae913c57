"""The client library, imported into application processes.

Re-exported by :mod:`appliance`; see :mod:`appliance.client.api`.
"""
from .api import Client, Snapshot, Table, Transaction, connect

__all__ = ["connect", "Client", "Table", "Snapshot", "Transaction"]
