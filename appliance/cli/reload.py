"""``appliance reload``: the controller reads its config file again and
takes what it can change running, and the command returns once it has
(systemd's ExecReload= runs it, so ``systemctl reload`` ends when the new
settings are in force); callable from Python as :func:`reload`."""
from __future__ import annotations

from ..config import Config

__all__ = ["reload"]


def reload(cfg: Config, *, timeout: float = 30.0) -> dict:
    """Ask the controller of `cfg` to reload its config; returns
    {file, applied, needs_restart} (the keys taken now; the changed keys
    that only a restart takes). Raises UnavailableError (not running) and
    ConfigError (the file is refused as a whole: the key, and nothing
    changed)."""
    from ..client.session import Session
    from ..wire import messages as m
    s = Session(str(cfg.socket_path), cfg.name, name="appliance-reload", timeout=timeout)
    try:
        s.connect()
        return s.call([m.OP_RELOAD], "reload")
    finally:
        s.close()
