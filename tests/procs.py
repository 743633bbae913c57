"""How tests start the product's processes: the installed ``appliance``
command, from a directory outside the checkout.

Children never run with the checkout as their working directory, so
``python -m appliance`` or ``import appliance`` in them resolves to the
installed package (the editable install of ``make test``, or the wheel in a
fresh venv when tests/installed runs), never to the source tree by accident.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

#: the checkout (tests read its config/ examples; nothing runs from it)
ROOT = Path(__file__).resolve().parent.parent

#: the working directory of every child process
RUN_DIR = tempfile.gettempdir()


def _command() -> list[str]:
    script = Path(sys.executable).with_name("appliance")
    return [str(script)] if script.exists() else [sys.executable, "-m", "appliance"]


#: argv prefix of the ``appliance`` command the package installed beside this interpreter
APPLIANCE = _command()


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the test process dies, so a
    killed pytest (a timeout, ^C) cannot leave controllers or agents behind."""
    import ctypes
    import signal as _signal
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, _signal.SIGKILL)  # PR_SET_PDEATHSIG


def cli(*args: str, timeout: float = 300):
    """Run the ``appliance`` command (without a progress bar) from RUN_DIR."""
    import os
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "APPLIANCE_PROGRESS"}
    return subprocess.run([*APPLIANCE, *args], capture_output=True, text=True, cwd=RUN_DIR, env=env,
                          timeout=timeout)


def cli_json(*args: str) -> tuple[int, dict]:
    """(exit status, the parsed --json output, or {"stderr": ...} when there is none)."""
    import json
    r = cli(*args, "--json")
    return r.returncode, (json.loads(r.stdout) if r.stdout.strip() else {"stderr": r.stderr})
