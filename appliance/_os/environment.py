"""What a service process checks about the environment it was started in,
before it touches anything: its log settings (``APPLIANCE_LOG_*``, a unit's
``Environment=``) and, under systemd, its user.

Why the user: the segments outlive the controller, and logind's
``RemoveIPC=`` (on by default) deletes every System V and POSIX IPC object —
/dev/shm included — of a *non-system* user when that user's last session
ends. A controller run by such a user (a unit without ``User=appliance``, a
``systemd-run --user``) would lose the database the moment its owner logs
out, so it is refused at start (EX_NOUSER) unless logind is configured with
``RemoveIPC=no``. Outside systemd (a terminal, a test) the operator is
there to see what runs; nothing is refused.

Each refusal is an ApplianceError with ``cause`` (errors.START_CAUSES) and a
message naming the setting and the fix.
"""
from __future__ import annotations

import glob
import os
import pwd
from pathlib import Path

from .. import errors
from . import logs

__all__ = ["configure_logs", "check_user", "sys_uid_max", "logind_removes_ipc"]


def configure_logs(process: str, *, json: bool | None, level: str | None):
    """logs.configure() for a process's start; its logger. A bad
    ``APPLIANCE_LOG_LEVEL``/``APPLIANCE_LOG_JSON`` configures the defaults and
    raises ConfigError (cause "environment") naming the variable and the fix."""
    try:
        logs.configure(json=json, level=level)
    except ValueError as exc:
        _defaults(json, level)   # so the refusal itself is logged
        var = "APPLIANCE_LOG_JSON" if "APPLIANCE_LOG_JSON" in str(exc) else "APPLIANCE_LOG_LEVEL"
        raise errors.ConfigError(
            f"environment: {exc} in ${var}; fix the variable (a unit's Environment=: `systemctl edit "
            f"appliance-{process}@<instance>`) or leave it unset", file=None, key=var, problem=str(exc),
            cause="environment") from None
    return logs.get_logger(process=process)


def _defaults(json: bool | None, level: str | None) -> None:
    """logs.configure() with the arguments and without the environment's values."""
    saved = {k: os.environ.pop(k) for k in ("APPLIANCE_LOG_JSON", "APPLIANCE_LOG_LEVEL") if k in os.environ}
    try:
        logs.configure(json=json, level=level)
    finally:
        os.environ.update(saved)


def sys_uid_max(login_defs: str = "/etc/login.defs") -> int:
    """The highest system uid: SYS_UID_MAX of login.defs, else 999 (systemd's default)."""
    try:
        for line in Path(login_defs).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "SYS_UID_MAX" and parts[1].isdigit():
                return int(parts[1])
    except OSError:
        pass
    return 999


def logind_removes_ipc(root: str = "/") -> bool:
    """Whether logind's RemoveIPC= is on (its default) in logind.conf and its drop-ins."""
    files = [os.path.join(root, "etc/systemd/logind.conf")]
    for d in ("usr/lib/systemd/logind.conf.d", "run/systemd/logind.conf.d", "etc/systemd/logind.conf.d"):
        files += sorted(glob.glob(os.path.join(root, d, "*.conf")))
    value = True
    for f in files:
        try:
            text = Path(f).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, sep, v = line.strip().partition("=")
            if sep and key.strip() == "RemoveIPC":
                value = v.strip().lower() not in ("no", "false", "0", "off")
    return value


def check_user() -> None:
    """Under systemd, refuse a user whose IPC objects logind would remove (the module docstring)."""
    if not logs._under_systemd():
        return
    uid = os.geteuid()
    if uid == 0 or uid <= sys_uid_max() or not logind_removes_ipc():
        return
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    raise errors.AccessDeniedError(
        f"user {name} (uid {uid}) is not a system user: logind's RemoveIPC= would delete this appliance's "
        f"shared memory (all its data) when {name}'s last session ends; run it as the appliance system "
        "user (User=appliance, `appliance install`), or set RemoveIPC=no in /etc/systemd/logind.conf",
        uid=uid, user=name, key="User", cause="user")
