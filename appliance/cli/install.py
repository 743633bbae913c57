"""``appliance install``: put an instance in place for systemd.

What it writes (the installed layout of appliance/_os/files.py), under
``root`` (``/`` on a server; another directory to stage a package):

- the units (``systemd/`` of the package) in ``etc/systemd/system``, their
  ``ExecStart=`` pointing at this installation's ``appliance`` command;
- the sysusers and tmpfiles snippets in ``usr/lib/sysusers.d`` and
  ``usr/lib/tmpfiles.d``, and, on a live system, the ``appliance`` system user
  and ``/run/appliance`` made from them;
- the instance's config ``etc/appliance/<instance>.toml`` (the file given, or
  the bank example named after the instance), checked before it is written;
- its replication secret when the config names one that does not exist yet;
- its state directory ``var/lib/appliance/<instance>``;
- ``appliance@<instance>.target`` wanting the controller, and the agent when
  the config has a [replication] section.

Nothing is overwritten that differs from what would be written, except units
and snippets (an upgrade replaces them); a different config or secret is
refused unless ``force``.
"""
from __future__ import annotations

import base64
import grp
import os
import pwd
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .. import errors
from .._os import files as layout

__all__ = ["install", "command_path"]

_EXEC = re.compile(r"^(Exec(?:Start|Reload)=)(\S*appliance)(?=\s|$)", re.M)


def command_path() -> str:
    """This installation's ``appliance`` command: the console script beside
    the interpreter, else the interpreter running the package as a module."""
    script = Path(sys.executable).with_name("appliance")
    if script.is_file() and os.access(script, os.X_OK):
        return str(script)
    return f"{sys.executable} -m appliance"


@dataclass
class Report:
    instance: str
    root: str
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"instance": self.instance, "root": self.root, "written": self.written,
                "unchanged": self.unchanged, "ran": self.ran, "notes": self.notes}


def _live(root: Path) -> bool:
    """Installing into the running system (not staging into a directory)."""
    return root.resolve() == Path("/")


def _write(rep: Report, path: Path, data: bytes, mode: int, *, replace: bool, force: bool,
           group: int | None = None) -> None:
    if path.exists():
        if path.read_bytes() == data:
            rep.unchanged.append(str(path))
            if group is not None:
                os.chown(path, -1, group)
            return
        if not (replace or force):
            raise errors.ConfigError(
                f"install: {path} exists and differs from what would be written; "
                "keep it, or pass --force to replace it", file=str(path), key=None, problem="exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    if group is not None:
        os.chown(tmp, -1, group)
    os.replace(tmp, path)
    rep.written.append(str(path))


def _run(rep: Report, argv: list[str]) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise errors.ConfigError(f"install: {' '.join(argv)} failed: {(r.stderr or r.stdout).strip()}",
                                 file=None, key=None, problem="command failed")
    rep.ran.append(" ".join(argv))


def _config_text(instance: str, config: Path | None) -> bytes:
    if config is not None:
        try:
            return Path(config).read_bytes()
        except OSError as exc:
            raise errors.ConfigError(f"install: cannot read {config}: {exc.strerror}", file=str(config),
                                     key=None, problem=str(exc.strerror)) from None
    example = (layout.shipped_dir("config") / "bank.toml").read_text()
    return re.sub(r'^name = "[^"]*"', f'name = "{instance}"', example, count=1, flags=re.M).encode()


def _check_config(instance: str, text: bytes, dest: Path):
    """The config as the installed instance will read it (relative paths
    resolve against /etc/appliance, as the units run it)."""
    from ..config import from_dict
    import tomllib
    try:
        doc = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise errors.ConfigError(f"install: {dest}: not valid TOML: {exc}", file=str(dest), key=None,
                                 problem=str(exc)) from None
    return from_dict(doc, dest, check_files=False)   # its secret may be made below


def _render_unit(text: str, command: str) -> str:
    return _EXEC.sub(lambda m: m.group(1) + command, text)


def install(instance: str, config: str | os.PathLike | None = None, *, root: str | os.PathLike = "/",
            force: bool = False, command: str | None = None) -> dict:
    """Install instance `instance`; returns what was written and run."""
    from ..config import _NAME
    if not _NAME.match(instance):
        raise errors.ConfigError(f"install: instance name {instance!r} must start with a letter and hold only "
                                 "letters, digits, '_' or '-'", file=None, key="instance", problem="bad name")
    root = Path(root)
    live = _live(root)
    rep = Report(instance, str(root))
    command = command or command_path()
    units = layout.shipped_dir("systemd")
    etc = root / layout.ETC_DIR.relative_to("/")
    dest = etc / f"{instance}.toml"
    text = _config_text(instance, Path(config) if config else None)
    cfg = _check_config(instance, text, layout.ETC_DIR / f"{instance}.toml")

    # the system user first: the files below belong to its group
    _write(rep, root / "usr/lib/sysusers.d/appliance.conf", (units / "appliance.sysusers.conf").read_bytes(),
           0o644, replace=True, force=force)
    _write(rep, root / "usr/lib/tmpfiles.d/appliance.conf", (units / "appliance.tmpfiles.conf").read_bytes(),
           0o644, replace=True, force=force)
    if live:
        if shutil.which("systemd-sysusers"):
            _run(rep, ["systemd-sysusers", "appliance.conf"])
        else:
            try:
                grp.getgrnam(layout.USER)
            except KeyError:
                _run(rep, ["useradd", "--system", "--user-group", "--home-dir", str(layout.STATE_DIR),
                           "--shell", "/usr/sbin/nologin", layout.USER])
        if shutil.which("systemd-tmpfiles"):
            _run(rep, ["systemd-tmpfiles", "--create", "appliance.conf"])
    gid = grp.getgrnam(layout.USER).gr_gid if live else None

    unit_dir = root / "etc/systemd/system"
    for u in sorted(units.iterdir()):
        if u.suffix in (".service", ".target"):
            _write(rep, unit_dir / u.name, _render_unit(u.read_text(), command).encode(), 0o644,
                   replace=True, force=force)
    wants = unit_dir / f"appliance@{instance}.target.wants"
    wanted = [f"appliance-controller@{instance}.service"]
    if cfg.replication is not None:
        wanted.append(f"appliance-agent@{instance}.service")
    for w in wanted:
        link = wants / w
        target = Path("..") / (w.split("@")[0] + "@.service")
        if link.is_symlink() and Path(os.readlink(link)) == target:
            rep.unchanged.append(str(link))
            continue
        wants.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
        rep.written.append(str(link))

    _write(rep, dest, text, 0o640, replace=False, force=force, group=gid)
    if cfg.replication is not None and cfg.replication.secret_file is not None:
        secret = root / cfg.resolve(cfg.replication.secret_file).relative_to("/")
        if not secret.exists():
            _write(rep, secret, base64.b64encode(os.urandom(32)) + b"\n", 0o640, replace=False, force=False,
                   group=gid)
            rep.notes.append(f"made a new replication secret {secret}: every peer of {cfg.name!r} needs the "
                             "same file (copy it, mode 0640, group appliance)")
    state = root / layout.STATE_DIR.relative_to("/") / instance
    if not state.is_dir():
        state.mkdir(parents=True, mode=0o750)
        rep.written.append(str(state))
    if live:
        os.chown(state, pwd.getpwnam(layout.USER).pw_uid, gid)
        if Path("/run/systemd/system").is_dir() and shutil.which("systemctl"):
            _run(rep, ["systemctl", "daemon-reload"])
    return rep.as_dict()
