"""What the controller tells systemd while it serves: the ``STATUS=`` line
(``systemctl status``) and the watchdog pings (``WatchdogSec=``).

The line says who serves what and how far behind replication is::

    serving bank as primary at version 812, epoch 1; lag: bank-dr 0 serials (0.0 s), bank-async 41 serials (0.3 s)
    serving bank-dr as secondary at version 799, epoch 1; 3 serials (0.01 s) behind bank
    serving bank as standalone at version 812, epoch 1

It is sent at READY=1, after a reload, and at each housekeeping round
(once a second) when its text changed. Lag on a primary is per secondary
(log serials published here and not acknowledged there, and the age of the
oldest unacknowledged commit); on a secondary, the primary's latest serial
its agent heard of less the serial applied here.

The watchdog: :meth:`Health.turn` runs on every turn of the loop (from
``serve()``) and pings when a third of the interval has passed, so the pings
stop when the loop stops turning — a request stuck in a tight loop, a
deadlocked C call, SIGSTOP — and systemd restarts the controller. Nothing
here runs on another thread.
"""
from __future__ import annotations

from .. import config as config_mod, errors
from .._os import sdnotify
from ..wire import messages as m
from .ops import handler
from .status import secondary_lag, serials_behind

__all__ = ["Health", "status_line", "reload"]


def status_line(ctl) -> str:
    role = ctl.role
    head = (f"serving {ctl.cfg.name} as {role.name} at version {ctl.att.sb.sb_version}, "
            f"epoch {role.epoch}")
    if role.is_primary and ctl.sync.enabled:
        behind = serials_behind(ctl)
        parts = []
        for name in ctl.sync.secondaries:
            seconds = ctl.sync.lag(name)["seconds"]
            down = "" if ctl.sync.state.get(name, {}).get("connected") else ", not connected"
            parts.append(f"{name} {behind[name]} serials ({seconds:g} s{down})")
        if not ctl.agents.attached():
            parts.append("agent not attached")
        return f"{head}; lag: {', '.join(parts)}"
    if role.is_secondary:
        lag = secondary_lag(ctl)
        primary = " or ".join(ctl.cfg.replication.primaries) if ctl.cfg.replication else "its primary"
        if not ctl.agents.attached():
            return f"{head}; agent not attached"
        if lag["serials"] is None:
            return f"{head}; not heard from {primary} yet"
        secs = f" ({lag['seconds']:g} s)" if lag["seconds"] is not None else ""
        down = "" if lag["connected"] else f", {primary} not connected"
        return f"{head}; {lag['serials']} serials{secs} behind {primary}{down}"
    return head


def reload(ctl) -> dict:
    """Read the config file again and take what the controller may change
    running (SIGHUP, or OP_RELOAD from `appliance reload`): RELOADING=1, the
    reload, READY=1 with the status line. Returns what
    config.reload_logged reports (file, applied, needs_restart, error, key)."""
    sdnotify.reloading()
    report: dict = {}
    config_mod.reload_logged(ctl.cfg, "controller", ctl.log, ctl.reconfigure, report)
    sdnotify.ready(status_line(ctl))
    return report


@handler(m.OP_RELOAD)
def reload_op(ctl, sess):
    """`appliance reload`: answers once the reload is done, so systemd's
    ExecReload (which runs it) ends when the new settings are in force."""
    report = reload(ctl)
    if report["error"] is not None:
        raise errors.ConfigError(f"reload refused, nothing changed: {report['error']}", file=report["file"],
                                 key=report["key"])
    return {k: report[k] for k in ("file", "applied", "needs_restart")}


class Health:
    """The controller's notifications to systemd (see the module docstring)."""

    def __init__(self, ctl) -> None:
        self.ctl = ctl
        self.notifier = sdnotify.Notifier()

    def ready(self) -> None:
        """READY=1 with the status line: serving (first start, or after a reload)."""
        self.notifier.ready(status_line(self.ctl))

    def turn(self, now: float) -> None:
        """Once per loop turn: the watchdog ping, when due."""
        self.notifier.ping(now)

    def wait_s(self, now: float) -> float:
        """How long the loop may wait in poll before the next ping is due."""
        return self.notifier.wait_s(now)

    def housekeeping(self) -> None:
        """Once a second: the status line, if it changed."""
        self.notifier.status(status_line(self.ctl))
