"""What every benchmarked system provides, and the process helpers they share.

A *system* (lmdb, Redis, the appliance) lives in the parent process: it starts
whatever it needs (a server, an environment), bulk-loads the data and stops
everything again. A *client* lives in a worker process: the worker rebuilds it
by calling the system's picklable ``client_spec()`` after it has started, so each
process has its own connection or environment.

Operations are client methods taking one argument: ``get(key)``,
``find(branch)``, ``range(lo)``, ``write((key, record))``, ``transfer((src,
dst, amount))`` ... Each returns
what an application would get back (decoded dicts), so every system does the
same work per call. ``session(op)`` is a context manager yielding the callable
to time; most ops need no session, the "many reads in one read transaction"
ones open it there.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from contextlib import nullcontext
from pathlib import Path

SHM = Path("/dev/shm")


class Unavailable(Exception):
    """The system cannot run here; ``str()`` says why, and it is skipped."""


class Client:
    def session(self, op: str):
        return nullcontext(getattr(self, op))

    def close(self) -> None:
        pass


class System:
    name = "?"
    # Benchmarks run with the client method of the same name, labelled with the
    # system's name; SPECIAL gives (label, method), or a list of them, where that is not so.
    BENCHES: tuple[str, ...] = ("get", "find", "range", "write", "transfer")
    SPECIAL: dict[str, tuple[str, str]] = {}

    def __init__(self, data) -> None:
        self.data = data
        self.notes: list[str] = []     # like-for-like settings, printed with the results
        self.info: dict = {}           # versions etc., written to the meta row

    def start(self) -> None:
        raise NotImplementedError

    def load_chunk(self, records: list[dict]) -> None:
        raise NotImplementedError

    def client_spec(self):
        """A picklable callable (a ``functools.partial`` of a client class) that a
        worker process calls to open its own :class:`Client`."""
        raise NotImplementedError

    def variants(self, bench_id: str) -> list[tuple[str, str]]:
        """``(system label, client method)`` pairs this system runs for a benchmark."""
        if bench_id in self.SPECIAL:
            special = self.SPECIAL[bench_id]
            return list(special) if isinstance(special, list) else [special]
        return [(self.name, bench_id)] if bench_id in self.BENCHES else []

    def stop(self) -> None:
        raise NotImplementedError


def ram_tempdir(prefix: str) -> Path:
    """A temporary directory on tmpfs (RAM) when there is one."""
    base = SHM if SHM.is_dir() and os.access(SHM, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def remove_tree(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the benchmark itself dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def spawn_server(cmd: list[str], log_path: Path, **kwargs) -> subprocess.Popen:
    """Start a server process with its output in ``log_path``; it is stopped
    with :func:`stop_process` and dies with us should we be killed."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent, start_new_session=True, **kwargs)


def stop_process(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """SIGTERM, wait ``grace`` seconds, then SIGKILL: by PID, never by name."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])
