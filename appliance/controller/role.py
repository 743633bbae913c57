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

A primary that learns of a newer epoch (a secondary refused its stream
with it, or an operator said so) is *fenced* (:meth:`Role.fence`): it stays a
primary for reads and status but takes no writes (NotPrimaryError), so two
appliances never both take writes after a failover. The fence is kept in
the superblock (``sb_fenced_epoch``, ``sb_fenced_by``) and outlives a
restart; it ends when the appliance rejoins as a secondary.

Shared: sb_role, sb_epoch and the fence in the meta segment. Written by the
controller only, from its loop thread; read by clients and the agent, which
only report them (a client's writes go through the controller, which checks).
"""
from __future__ import annotations

from typing import Callable

from .. import errors
from .._native import ffi, lib

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
        self.writable = self._takes_writes()

    def _takes_writes(self) -> bool:
        return self.name != "secondary" and not self._sb.sb_fenced_epoch

    def rebind(self, writer) -> None:
        """The store was made anew (an lz4 secondary's promote): its superblock
        is this one's now; role and epoch carry over to it."""
        epoch, code = self.epoch, self._sb.sb_role
        self._writer, self._sb = writer, writer.att.sb
        writer.set_epoch(epoch)
        self._sb.sb_role = code

    @property
    def epoch(self) -> int:
        return self._sb.sb_epoch

    @property
    def fenced(self) -> dict | None:
        """{"epoch": the newer epoch, "by": the new primary or None} while fenced."""
        sb = self._sb
        if not sb.sb_fenced_epoch or self.name == "secondary":
            return None
        by = ffi.string(sb.sb_fenced_by).decode(errors="replace") or None
        return {"epoch": sb.sb_fenced_epoch, "by": by}

    def fence(self, epoch: int, by: str | None) -> bool:
        """This primary learnt that `by` is primary at `epoch`, newer than its
        own: it takes no writes from now on. True when that is news (the
        caller logs it and answers what waits); an epoch not newer than its
        own is refused (StaleEpochError)."""
        if self.name != "primary":
            raise errors.RoleError(f"fence: appliance is {self.name}, not a primary; only a primary is fenced",
                                   role=self.name)
        if type(epoch) is not int or epoch <= self.epoch:
            raise errors.StaleEpochError(f"fence: epoch {epoch!r} is not newer than this appliance's "
                                         f"epoch {self.epoch}", epoch=str(epoch), current=self.epoch)
        sb = self._sb
        if sb.sb_fenced_epoch >= epoch:
            return False
        name = (by or "").encode()[:47]
        ffi.memmove(sb.sb_fenced_by, name + b"\0" * (48 - len(name)), 48)
        sb.sb_fenced_epoch = epoch
        self.writable = False
        return True

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
        if role == "secondary" or epoch >= self._sb.sb_fenced_epoch:
            self._sb.sb_fenced_epoch = 0     # a secondary is read-only anyway; a newer primary not fenced
            ffi.memmove(self._sb.sb_fenced_by, b"\0" * 48, 48)
        self.name = role
        self.writable = self._takes_writes()
        self.log.warning("role_changed", **{"from": old, "to": role}, epoch=epoch)
        for fn in self._listeners:
            fn(old, role)

    def raise_epoch(self, epoch: int) -> bool:
        """A secondary accepted its primary's stream at `epoch`: keep the
        newer epoch (it refuses older ones from then on). True when it rose."""
        if type(epoch) is not int or epoch <= self.epoch:
            return False
        self._writer.set_epoch(epoch)
        self.log.info("epoch_raised", role=self.name, epoch=epoch)
        return True

    def check_write(self, cfg) -> None:
        """Refuse a write where this role takes none: ReadOnlyError on a
        secondary, NotPrimaryError on a fenced primary."""
        if self.writable:
            return
        if self.name == "secondary":
            primary = " or ".join(cfg.replication.primaries) if cfg.replication else None
            raise errors.ReadOnlyError(
                f"appliance {cfg.name!r} is a secondary: it takes changes only from its primary "
                f"{primary!r}; write there")
        raise self.not_primary(cfg.name)

    def not_primary(self, name: str, what: str = "") -> errors.NotPrimaryError:
        """The error a write gets from a fenced primary."""
        f = self.fenced or {"epoch": self.epoch + 1, "by": None}
        who = f"{f['by']!r} is the primary" if f["by"] else "another appliance is the primary"
        return errors.NotPrimaryError(
            f"{what}appliance {name!r} is no longer the primary: {who} at epoch {f['epoch']} (a failover); "
            f"this one (epoch {self.epoch}) takes no writes. Write to the new primary; reads here still "
            "work and show the data as it was when this appliance was deposed",
            epoch=f["epoch"], primary=f["by"] or "")
