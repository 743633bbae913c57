"""The appliance's role and epoch: one owner, kept in shared memory.

The config names the role an appliance starts with (``[replication] role``,
or "standalone" without that section). From the first start on, the role
lives in the superblock (``sb_role``) beside the epoch (``sb_epoch``), so a
controller restart keeps what a failover made of it; a config that names
another role then is logged (``role_kept``) and the shared memory wins.

Everything that depends on the role asks this object, never the config: the
op table (writes refused on a secondary: :meth:`Role.check_write`; ops that
exist for one role only), group commit (whether commits wait for
acknowledgements), the agent (which side of replication it runs: it is told
at OP_AGENT), status. Changing role is :meth:`Role.change` and the listeners
it calls, not a fork in every handler.

Shared: sb_role and sb_epoch in the meta segment. Written by the controller
only, from its loop thread; read by clients and the agent, which only report
them (a client's writes go through the controller, which checks).
"""
from __future__ import annotations

from typing import Callable

from .. import errors
from .._native import lib

__all__ = ["Role", "ROLES"]

#: role name -> sb_role value (apl_layout.h, enum apl_role)
ROLES = {"standalone": lib.APL_ROLE_STANDALONE, "primary": lib.APL_ROLE_PRIMARY,
         "secondary": lib.APL_ROLE_SECONDARY}
_NAMES = {v: k for k, v in ROLES.items()}


class Role:
    def __init__(self, writer, cfg, log) -> None:
        self._writer = writer
        self._sb = writer.att.sb
        self.log = log
        self._listeners: list[Callable[[str, str], None]] = []
        code = self._sb.sb_role
        if code not in _NAMES:              # a fresh appliance: the config's role
            code = ROLES[cfg.role]
            self._sb.sb_role = code
        elif _NAMES[code] != cfg.role:
            log.warning("role_kept", role=_NAMES[code], config_role=cfg.role, epoch=self.epoch,
                        reason="the shared memory holds the role a failover gave it; the config names only "
                               "the first one (appliance destroy starts over)")
        self.name = _NAMES[code]

    @property
    def epoch(self) -> int:
        return self._sb.sb_epoch

    @property
    def is_primary(self) -> bool:
        return self.name == "primary"

    @property
    def is_secondary(self) -> bool:
        return self.name == "secondary"

    def on_change(self, fn: Callable[[str, str], None]) -> None:
        """Call fn(old role, new role) after every change."""
        self._listeners.append(fn)

    def change(self, role: str, epoch: int) -> None:
        """Become `role` at `epoch` (never lower than the current one)."""
        if role not in ROLES:
            raise errors.WrongTypeError(f"role: {role!r} is not one of {', '.join(ROLES)}")
        if epoch < self.epoch:
            raise errors.StaleEpochError(f"role: epoch {epoch} is older than this appliance's {self.epoch}",
                                         epoch=epoch, current=self.epoch)
        old = self.name
        self._writer.set_epoch(epoch)
        self._sb.sb_role = ROLES[role]
        self.name = role
        self.log.warning("role_changed", **{"from": old, "to": role}, epoch=epoch)
        for fn in self._listeners:
            fn(old, role)

    def check_write(self, cfg) -> None:
        """Refuse a write where this role takes none (ReadOnlyError on a secondary)."""
        if self.name == "secondary":
            primary = cfg.replication.primary if cfg.replication else None
            raise errors.ReadOnlyError(
                f"appliance {cfg.name!r} is a secondary: it takes changes only from its primary "
                f"{primary!r}; write there")
