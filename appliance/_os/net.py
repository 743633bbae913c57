"""Listening on a configured TCP address, and what a refused bind says.

The secondary's agent (``replication.listen``) and the controller's metrics
endpoint (``metrics.listen``) both bind a host:port from the config at start;
one that cannot be bound refuses the start with the file, the key and the fix,
and the exit status of its cause (errors.START_CAUSES): a port in use is
EX_UNAVAILABLE (69, systemd restarts: the holder may go away), a privileged
port EX_NOPERM (77), an address this host does not have EX_CONFIG (78).
"""
from __future__ import annotations

import errno
from pathlib import Path

from .. import errors

__all__ = ["bind_error"]


def bind_error(config: Path | str, key: str, address: str, exc: OSError) -> errors.ApplianceError:
    """The error for `address` (the value of `key` in `config`) failing to bind with `exc`."""
    where = f"{config}: {key}: cannot listen on {address}"
    if exc.errno == errno.EADDRINUSE:
        return errors.BusyError(f"{where}: the port is in use by another process (`ss -ltnp` names it); "
                                f"stop that process or give {key} another port", file=str(config), key=key,
                                address=address, cause="address_in_use")
    if exc.errno == errno.EACCES:
        return errors.AccessDeniedError(f"{where}: {exc.strerror} (ports below 1024 need privileges); "
                                        f"give {key} a port above 1023", file=str(config), key=key,
                                        address=address, cause="permission")
    return errors.ConfigError(f"{where}: {exc.strerror or exc}; use an address of this host (host:port)",
                              file=str(config), key=key, problem=str(exc.strerror or exc), address=address)
