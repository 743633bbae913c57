"""Files the product ships that are not Python modules (the example configs and
the systemd units), and where an installed appliance keeps its files.

The source tree keeps them in ``config/`` and ``systemd/``; a built package
(wheel, sdist install, ``pip install .``) carries copies under
``appliance/_data/`` (setup.py's build step). :func:`shipped_dir` finds them
either way, so ``appliance files`` and ``appliance install`` work from a
regular install and from a checkout alike.

The installed layout, shared by the units, ``appliance install`` and the
example configs (one convention, documented in the README):

- ``/etc/appliance/<instance>.toml``   an instance's config (the units assert it)
- ``/etc/appliance/<instance>.secret`` its replication secret, when it has one
- ``/run/appliance/<name>.sock``       the controller's socket (RuntimeDirectory=appliance);
  the default when a config names no ``controller.socket``
- ``/var/lib/appliance/<instance>/``   state on disk: the log history (StateDirectory=appliance)
- ``/dev/shm/apl.<name>.*``            the segments
- the ``appliance`` system user and group run the processes; group members are clients
"""
from __future__ import annotations

from pathlib import Path

from .. import errors

__all__ = ["KINDS", "shipped_dir", "shipped_files", "ETC_DIR", "RUN_DIR", "STATE_DIR", "USER"]

ETC_DIR = Path("/etc/appliance")
RUN_DIR = Path("/run/appliance")
STATE_DIR = Path("/var/lib/appliance")
USER = "appliance"

#: what is shipped, and where the source tree keeps it
KINDS = ("config", "systemd")

_PACKAGE = Path(__file__).resolve().parent.parent


def shipped_dir(kind: str) -> Path:
    """The directory holding the shipped files of `kind` ("config" or "systemd")."""
    if kind not in KINDS:
        raise errors.ConfigError(f"shipped files: unknown kind {kind!r} (one of {', '.join(KINDS)})")
    for d in (_PACKAGE / "_data" / kind, _PACKAGE.parent / kind):
        if d.is_dir():
            return d
    raise errors.ConfigError(f"shipped files: {kind}/ is not in this installation of appliance "
                             f"(looked in {_PACKAGE / '_data' / kind}); reinstall the package")


def shipped_files() -> dict[str, list[Path]]:
    """kind -> the files shipped of that kind, sorted by name."""
    return {k: sorted(p for p in shipped_dir(k).iterdir() if p.is_file()) for k in KINDS}
