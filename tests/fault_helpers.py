"""Helpers for tests/test_faults.py: waiting for outcomes, raw protocol
connections, controller log events, and running code as another user.

Nothing here mocks the appliance: raw connections speak real frames to the
real controller socket, and `run_as` forks a real process that drops root.
"""
from __future__ import annotations

import os
import pickle
import pwd
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

from appliance import errors
from appliance.wire import framing
from appliance.wire import messages as m

from procs import APPLIANCE, RUN_DIR
NOBODY = pwd.getpwnam("nobody")


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def events(app, name: str, **match) -> list[dict]:
    """The controller's log events called `name` whose fields equal `match`."""
    return [e for e in app.controller.events()
            if e.get("event") == name and all(e.get(k) == v for k, v in match.items())]


def wait_event(app, name: str, count: int = 1, timeout: float = 10.0, **match) -> list[dict]:
    """Wait until the controller has logged at least `count` matching events; return them."""
    return wait_for(lambda: (lambda evs: evs if len(evs) >= count else None)(events(app, name, **match)),
                    timeout, what=f"{count} controller event(s) {name} {match}")


def records(table) -> dict:
    """primary key -> record, read through range()."""
    return {r["id"]: r for r in table.range()}


def check_indexes(table, field: str = "branch") -> list[dict]:
    """Assert len(), range() and the alternate-key index agree; return the records."""
    recs = list(table.range())
    assert len(table) == len(recs)
    assert [r["id"] for r in recs] == sorted(r["id"] for r in recs)
    values = {r[field] for r in recs}
    found = []
    for v in sorted(values):
        hits = table.find(field, v)
        assert hits == [r for r in recs if r[field] == v], f"find({field!r}, {v!r}) disagrees with range()"
        found.extend(hits)
    assert len(found) == len(recs)
    return recs


def out_lines(path: Path) -> list[list[str]]:
    """The complete lines a child wrote to `path`, split into words."""
    text = path.read_text() if path.exists() else ""
    return [line.split() for line in text.splitlines(keepends=True) if line.endswith("\n")]


def spawn_ready(app, code: str, *args: str, timeout: float = 15.0) -> subprocess.Popen:
    """Spawn a child (see Appliance.spawn) that prints "ready" once set up; wait for that line."""
    p = app.spawn(code, *args, stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    line = p.stdout.readline().strip() if ready else ""
    assert line == "ready", f"child not ready (exit {p.poll()}, said {line!r})"
    return p


def kill_child(p: subprocess.Popen) -> int:
    """SIGKILL a child we started and reap it; its return code."""
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    return p.wait()


class RawConn:
    """A client connection that speaks frames by hand (no client library)."""

    def __init__(self, path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.reader = framing.FrameReader(self.sock)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, req):
        """Send one request frame and return the reply payload."""
        self.send(framing.encode(req))
        return self.reader.read()

    def hello(self):
        return self.request([m.OP_HELLO, m.PROTOCOL_VERSION, "raw"])

    def wait_closed(self, timeout: float = 10.0) -> bool:
        """True once the controller has closed the connection (EOF/reset), False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not self.sock.recv(65536):
                    return True
            except (ConnectionResetError, BrokenPipeError):
                return True
            except socket.timeout:
                return False
        return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawConn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def reply_error(reply) -> type[errors.ApplianceError] | None:
    """The error class of an [ERR, code, message, details] reply, None for [OK, result]."""
    assert type(reply) is list and reply, f"malformed reply {reply!r}"
    if reply[0] == m.OK:
        assert len(reply) == 2, f"malformed OK reply {reply!r}"
        return None
    assert reply[0] == m.ERR and len(reply) == 4, f"malformed reply {reply!r}"
    assert isinstance(reply[1], str) and isinstance(reply[2], str) and isinstance(reply[3], dict), reply
    return errors.class_for(reply[1])


def run_as(uid: int, gid: int, fn, *args, timeout: float = 20.0):
    """Run fn(*args) in a forked child with the given uid/gid (and no supplementary
    groups). Returns ("ok", value) or ("raised", exception)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        status = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            try:
                out = ("ok", fn(*args))
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                out = ("raised", exc)
            try:
                data = pickle.dumps(out)
            except Exception:
                data = pickle.dumps(("raised", RuntimeError(repr(out))))
            with os.fdopen(w, "wb") as f:
                f.write(data)
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        with os.fdopen(r, "rb") as f:
            while True:
                ready, _, _ = select.select([f], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise AssertionError(f"child running as uid {uid} did not finish within {timeout}s")
                chunk = os.read(f.fileno(), 65536)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
    assert chunks, f"child running as uid {uid} reported nothing"
    return pickle.loads(b"".join(chunks))


def start_controller(config: Path, log_path: Path) -> subprocess.Popen:
    """Start one more controller process for `config`, its output to `log_path`."""
    env = {**os.environ, "APPLIANCE_LOG_JSON": "1"}
    with open(log_path, "ab") as logf:
        return subprocess.Popen([*APPLIANCE, "controller", "--config", str(config)],
                                stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=RUN_DIR)


def rec(k: int) -> dict:
    """The record the crash-test writers store under key k (children import this too)."""
    return {"id": k, "branch": f"b{k % 5}", "balance": 3 * k}
