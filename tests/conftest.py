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

from procs import APPLIANCE, ROOT, RUN_DIR, die_with_parent as _die_with_parent
from store_helpers import CREATED_NAMES, Store, linked_segments, unique_name, unlink_leftovers

LOG_TAIL_LINES = 25   # of each process log, in a failed test's report
LOG_TAIL_FILES = 12   # process logs, at most, in a failed test's report

# tests/installed runs only against a package installed from the wheel (tests/test_install.py)
collect_ignore_glob = [] if os.environ.get("APPLIANCE_TEST_INSTALLED") else ["installed/*"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report ends with the last lines of every process log
    under its tmp_path (controllers, agents, clients): what CI prints of a
    failure is then enough to tell which process did what."""
    outcome = yield
    rep = outcome.get_result()
    tmp = item.funcargs.get("tmp_path") if hasattr(item, "funcargs") else None
    if not rep.failed or tmp is None:
        return
    for path in sorted(Path(tmp).rglob("*.log"))[:LOG_TAIL_FILES]:
        try:
            lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            continue
        rep.sections.append((f"log {path.relative_to(tmp)}", "\n".join(ln[:400] for ln in lines)))


@pytest.fixture
def stores():
    """Factory of in-process stores (tests/store_helpers.Store), closed and unlinked at the end
    (the store tests of several modules)."""
    made: list[Store] = []

    def make(**kw) -> Store:
        made.append(Store(**kw))
        return made[-1]

    yield make
    for s in made:
        s.close()
    assert not unlink_leftovers()


BANK_TABLES = """
[tables.accounts]
primary_key = "id"
alternate_keys = ["branch"]
fields = { id = "int", branch = "str", balance = "int" }
"""




def write_config(dirpath: Path, *, name: str | None = None, tables: str = BANK_TABLES, storage: str = "",
                 controller: str = "", extra: str = "", segments: int = 2, segment_size: str = "16MiB",
                 filename: str = "appliance.toml", log_size: str = "4MiB") -> Path:
    name = name or unique_name()
    text = f"""
name = "{name}"
[storage]
segments = {segments}
segment_size = "{segment_size}"
log_size = "{log_size}"
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
        self.proc = subprocess.Popen([*APPLIANCE, "controller", "--config", str(self.config)],
                                     stdout=self._logf, stderr=subprocess.STDOUT, env=env, cwd=RUN_DIR,
                                     preexec_fn=_die_with_parent)
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
        p = subprocess.Popen([sys.executable, "-c", code, str(self.config), *args], cwd=RUN_DIR,
                             preexec_fn=_die_with_parent, **popen_kw)
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


@pytest.fixture(scope="session")
def built_dist(tmp_path_factory) -> dict[str, Path]:
    """The sdist and, built from it, the wheel (``python -m build``, isolated
    build environment as on a build server): {"sdist": path, "wheel": path}."""
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], cwd=out,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"python -m build failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def _appliances(base: Path):
    """make(**config_kw) -> an Appliance in its own folder under `base`, and the list of those made."""
    made: list[Appliance] = []

    def make(**kw) -> Appliance:
        sub = base / f"a{len(made)}"
        sub.mkdir()
        a = Appliance(sub, **kw)
        made.append(a)
        return a

    return make, made


@pytest.fixture
def make_appliance(tmp_path):
    """Factory: make_appliance(**config_kw) -> Appliance (not started)."""
    make, made = _appliances(tmp_path)
    yield make
    for a in made:
        a.cleanup()


@pytest.fixture(scope="module")
def make_module_appliance(tmp_path_factory):
    """Factory like make_appliance, for appliances every test of a module
    shares (a booted cluster per module keeps the suite fast); torn down, and
    their segments unlinked, after the module's last test."""
    make, made = _appliances(tmp_path_factory.mktemp("shared"))
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


@pytest.fixture(autouse=True)
def _no_leaked_segments():
    """After each test (and every other fixture's finalizer), no segment under a
    name the test made is left in /dev/shm; a leak fails the test that made it."""
    before = set(CREATED_NAMES)
    yield
    leaked = linked_segments(CREATED_NAMES - before)
    for name in {n.split(".")[1] for n in leaked}:
        unlink_all(name)
    assert not leaked, f"this test leaked shared-memory segments: {leaked}"


# ---------------------------------------------------------------------------
# Replication: a primary and secondaries, each a controller and an agent
# ---------------------------------------------------------------------------

#: ports free_port hands out: below the kernel's ephemeral range (32768 and up), so no outgoing connection
#: or port-0 listener takes one between the test choosing it and a process binding it (a secondary's listen
#: port may be bound only minutes later, at a rejoin), and a slice per xdist worker, so two workers never
#: hand out the same one
PORTS = range(20000, 32000)
PORT_SLICES = 8                   # xdist workers with a slice of their own (more share gwN % 8's)
_handed_out: set[int] = set()     # by this process: never handed out twice


def free_port() -> int:
    import random
    import socket
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    width = len(PORTS) // PORT_SLICES
    start = PORTS.start + (index % PORT_SLICES) * width
    mine = range(start, start + width)
    for _ in range(200):
        port = random.choice(mine)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {mine} for worker {worker}")


class AgentProcess(ControllerProcess):
    """A real `appliance agent` child process (same handling as the controller's)."""

    def start(self, wait: bool = True) -> "AgentProcess":
        self._logf = open(self.log_path, "ab")
        self._mark = self.log_path.stat().st_size
        env = {**os.environ, "APPLIANCE_LOG_JSON": "1", "APPLIANCE_LOG_LEVEL": "debug"}
        self.proc = subprocess.Popen([*APPLIANCE, "agent", "--config", str(self.config)],
                                     stdout=self._logf, stderr=subprocess.STDOUT, env=env, cwd=RUN_DIR,
                                     preexec_fn=_die_with_parent)
        if wait:
            self.wait_event("agent_started")
        return self

    def wait_event(self, event: str, timeout: float = 20.0, **match) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events():
                if e.get("event") == event and all(e.get(k) == v for k, v in match.items()):
                    return e
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {event} {match} after {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.02)


class Node:
    """One appliance of a cluster: its Appliance (controller) and its agent."""

    def __init__(self, app: Appliance) -> None:
        self.app = app
        self.agent = AgentProcess(app.config, app.dir / f"{app.name}.agent.log")

    @property
    def name(self) -> str:
        return self.app.name

    def start(self) -> "Node":
        self.app.start()
        return self

    def cleanup(self) -> None:
        self.agent.kill()
        self.app.cleanup()


class Cluster:
    """A primary and secondaries on loopback, with a shared secret.

    secondaries: list of (mode, extra TOML lines for that secondary's
    [[replication.secondaries]] entry on the primary)."""

    def __init__(self, make_appliance, tmp_path: Path, secondaries=(("sync", ""), ("async", "")),
                 quorum: str | int | None = None, secondary_replication: str = "", primary_replication: str = "",
                 tables: str = BANK_TABLES, segment_size: str = "16MiB", log_size: str = "4MiB",
                 segments: int = 2) -> None:
        self.secret = tmp_path / "secret"
        self.secret.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
        self.secret.chmod(0o600)
        pname = unique_name("tp")
        snames = [unique_name("ts") for _ in secondaries]
        self.ports = [free_port() for _ in secondaries]
        entries = "".join(
            f'\n[[replication.secondaries]]\nname = "{n}"\naddress = "127.0.0.1:{p}"\nmode = "{mode}"\n{more}\n'
            for n, p, (mode, more) in zip(snames, self.ports, secondaries))
        q = f"sync_quorum = {quorum!r}".replace("'", '"') if quorum is not None else ""
        prim_extra = (f'[replication]\nrole = "primary"\nsecret_file = "{self.secret}"\nheartbeat = 0.2\n{q}\n'
                      f'{primary_replication}\n{entries}')
        self.primary = Node(make_appliance(name=pname, extra=prim_extra, tables=tables, segment_size=segment_size,
                                           log_size=log_size, segments=segments))
        self.secondaries = []
        for n, p in zip(snames, self.ports):
            extra = (f'[replication]\nrole = "secondary"\nsecret_file = "{self.secret}"\nheartbeat = 0.2\n'
                     f'listen = "127.0.0.1:{p}"\nprimary = "{pname}"\n{secondary_replication}\n')
            self.secondaries.append(Node(make_appliance(name=n, extra=extra, tables=tables, segment_size=segment_size,
                                                        log_size=log_size, segments=segments)))
        self.nodes = [self.primary, *self.secondaries]

    def start(self, wait_streaming: bool = True) -> "Cluster":
        for node in self.nodes:
            node.app.start()
        for node in self.secondaries:
            node.agent.start()
        self.primary.agent.start()
        if wait_streaming:
            for s in self.secondaries:
                self.wait_state(s.name, "streaming")
        return self

    def status(self) -> dict:
        from appliance.wire import messages as m
        sess = Session(str(self.primary.app.cfg.socket_path), self.primary.name, timeout=10)
        try:
            sess.connect()
            return sess.call([m.OP_STATUS], "status")
        finally:
            sess.close()

    def wait_state(self, secondary: str, state: str, timeout: float = 30.0, **cond) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()["replication"]["secondaries"][secondary]
            if st["state"] == state and all(st.get(k) == v for k, v in cond.items()):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"{secondary} not {state} {cond} after {timeout}s: {st}")
            time.sleep(0.05)

    def wait_replication(self, predicate, what: str, timeout: float = 30.0) -> dict:
        """Poll the primary's status until predicate(status["replication"]) is true; return
        that part of the status (its "waiting" commits and "secondaries" come from one moment)."""
        deadline = time.monotonic() + timeout
        while True:
            rep = self.status()["replication"]
            if predicate(rep):
                return rep
            if time.monotonic() > deadline:
                raise AssertionError(f"not {what} after {timeout}s: waiting {rep['waiting']}, acked "
                                     f"{ {k: v['acked_serial'] for k, v in rep['secondaries'].items()} }")
            time.sleep(0.02)

    def wait_waiting(self, count: int = 1, timeout: float = 30.0) -> dict:
        """Wait until the primary lists `count` commits waiting for their backup (status
        replication.waiting); returns the replication status of that moment."""
        return self.wait_replication(lambda rep: len(rep["waiting"]) == count,
                                     f"{count} commit(s) waiting for their backup", timeout)

    def wait_caught_up(self, timeout: float = 30.0) -> int:
        """Every secondary has acknowledged everything committed so far."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            serial = st["log"]["serial"]
            secs = st["replication"]["secondaries"]
            if all(v["acked_serial"] >= serial for v in secs.values()):
                return serial
            if time.monotonic() > deadline:
                raise AssertionError(f"secondaries not caught up to {serial}: "
                                     f"{ {k: v['acked_serial'] for k, v in secs.items()} }")
            time.sleep(0.05)

    def verify(self) -> tuple[int, dict]:
        import json as _json
        r = subprocess.run([*APPLIANCE, "verify", "--json", "--timeout", "60",
                            "--config", str(self.primary.app.config)], capture_output=True, text=True, cwd=RUN_DIR)
        try:
            return r.returncode, _json.loads(r.stdout)
        except ValueError:
            return r.returncode, {"stdout": r.stdout, "stderr": r.stderr}

    def cleanup(self) -> None:
        for node in self.nodes:
            node.agent.kill()
        for node in self.nodes:
            node.app.cleanup()


@pytest.fixture
def make_cluster(make_appliance, tmp_path):
    made: list[Cluster] = []

    def make(**kw) -> Cluster:
        c = Cluster(make_appliance, tmp_path, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.cleanup()
