"""Files the product ships that are not Python modules: the example configs and
the systemd units.

The source tree keeps them in ``config/`` and ``systemd/``; a built package
(wheel, sdist install, ``pip install .``) carries copies under
``appliance/_data/`` (setup.py's build step). :func:`shipped_dir` finds them
either way, so ``appliance files`` and ``appliance install`` work from a
regular install and from a checkout alike.
"""
from __future__ import annotations

from pathlib import Path

from .. import errors

__all__ = ["KINDS", "shipped_dir", "shipped_files"]

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
