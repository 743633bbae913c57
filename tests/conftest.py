"""Fixtures that start real controller processes on unique shared-memory names.

Every appliance a test makes gets a unique name (so its /dev/shm segments
never collide) and is torn down by a finalizer: its processes are killed by
PID and its segments unlinked, whatever the test did. A leaked segment eats
RAM for everyone after us; a leftover child can hang CI.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from appliance import errors
from appliance.client.session import Session
from appliance.store.segment import unlink_all

ROOT = Path(__file__).resolve().parent.parent

BANK_TABLES = """
[tables.accounts]
primary_key = "id"
alternate_keys = ["branch"]
fields = { id = "int", branch = "str", balance = "int" }
"""


#: every appliance name this test session made (checked for leaks at the end)
CREATED_NAMES: set[str] = set()


def unique_name(prefix: str = "t") -> str:
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    CREATED_NAMES.add(name)
    return name


def write_config(dirpath: Path, *, name: str | None = None, tables: str = BANK_TABLES, storage: str = "",
                 controller: str = "", extra: str = "", segments: int = 2, segment_size: str = "16MiB",
                 filename: str = "appliance.toml") -> Path:
    name = name or unique_name()
    text = f"""
name = "{name}"
[storage]
segments = {segments}
segment_size = "{segment_size}"
log_size = "4MiB"
max_readers = 128
{storage}
[controller]
socket = "{dirpath / (name + '.sock')}"
lock_timeout = 2.0
{controller}
{extra}
{tables}
"""
    path = dirpath / filename
    path.write_text(text)
    return path


class ControllerProcess:
    """A real `appliance controller` child process."""

    def __init__(self, config: Path, log_path: Path) -> None:
        from appliance.config import load
        self.config = config
        self.cfg = load(config)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "ControllerProcess":
        self._logf = open(self.log_path, "ab")
        env = {**os.environ, "APPLIANCE_LOG_JSON": "1", "APPLIANCE_LOG_LEVEL": "debug"}
        self.proc = subprocess.Popen([sys.executable, "-m", "appliance", "controller", "--config", str(self.config)],
                                     stdout=self._logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        if wait:
            self.wait_ready()
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"controller exited with {self.proc.returncode}:\n{self.log()}")
            s = Session(str(self.cfg.socket_path), self.cfg.name, timeout=2.0)
            try:
                s.connect()
                return
            except errors.UnavailableError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"controller not ready after {timeout}s:\n{self.log()}")
                time.sleep(0.02)
            finally:
                s.close()

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._logf.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def events(self) -> list[dict]:
        import json
        out = []
        for line in self.log().splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out


class Appliance:
    """Config + controller process + cleanup, for one test."""

    def __init__(self, tmp_path: Path, **config_kw) -> None:
        self.dir = tmp_path
        config_kw.setdefault("name", unique_name())
        CREATED_NAMES.add(config_kw["name"])
        self.config = write_config(tmp_path, **config_kw)
        from appliance.config import load
        self.cfg = load(self.config)
        self.name = self.cfg.name
        self.controller = ControllerProcess(self.config, tmp_path / f"{self.name}.controller.log")
        self.children: list[subprocess.Popen] = []
        self.clients = []

    def start(self) -> "Appliance":
        self.controller.start()
        return self

    def restart(self) -> None:
        self.controller.kill()
        self.controller.start()

    def connect(self, **kw):
        import appliance
        c = appliance.connect(self.config, **kw)
        self.clients.append(c)
        return c

    def spawn(self, code: str, *args: str, **popen_kw) -> subprocess.Popen:
        """A child Python process running `code` (argv: config path, *args)."""
        p = subprocess.Popen([sys.executable, "-c", code, str(self.config), *args], cwd=ROOT, **popen_kw)
        self.children.append(p)
        return p

    def cleanup(self) -> None:
        for c in self.clients:
            try:
                c.close()
            except Exception:
                pass
        for p in self.children:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.controller.kill()
        unlink_all(self.name, self.cfg.storage.segments)


@pytest.fixture
def make_appliance(tmp_path):
    """Factory: make_appliance(**config_kw) -> Appliance (not started)."""
    made: list[Appliance] = []

    def make(**kw) -> Appliance:
        sub = tmp_path / f"a{len(made)}"
        sub.mkdir()
        a = Appliance(sub, **kw)
        made.append(a)
        return a

    yield make
    for a in made:
        a.cleanup()


@pytest.fixture
def bank(make_appliance) -> Appliance:
    """A running appliance with the bank schema (accounts: id, branch, balance)."""
    return make_appliance().start()


@pytest.fixture
def db(bank):
    """A client of `bank`."""
    return bank.connect()


@pytest.fixture(autouse=True, scope="session")
def _no_leaked_segments():
    """After the whole run, no segment of ours is left in /dev/shm."""
    yield
    leaked = [n for n in os.listdir("/dev/shm") if n.startswith("apl.") and n.split(".")[1] in CREATED_NAMES]
    for n in leaked:
        unlink_all(n.split(".")[1])
    assert not leaked, f"tests leaked shared-memory segments: {leaked}"
