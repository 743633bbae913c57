"""The appliance under test, driven through its public client API.

Start: a config TOML in a temporary directory, ``python -m appliance controller
--config PATH`` as a subprocess, then ``appliance.connect(PATH)`` retried until
the controller answers. Stop: SIGTERM (SIGKILL after 10 s), ``python -m
appliance destroy --yes --config PATH`` to unlink the shared-memory segments,
and ``appliance.store.segment.unlink_all(name)`` as a last resort.

:class:`AppliancePair` is a primary with one secondary on loopback: two
controllers, each with its replication agent (``python -m appliance agent
--config PATH``), and a shared secret file (mode 0600).
"""
from __future__ import annotations

import itertools
import json
import os
import pwd
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from pathlib import Path

from data import next_write
from systems import (Client, System, Unavailable, free_port, log_tail, ram_tempdir, remove_tree, spawn_server,
                     stop_process)

REPO = Path(__file__).resolve().parent.parent
TABLE = "accounts"
START_TIMEOUT = 30.0
_instances = itertools.count()

CONFIG = """\
name = "{name}"

[storage]
block_size = 4096
segments = 4
segment_size = "{segment_mib}MiB"
max_overflow = 1
log_size = "{log_size}"
max_readers = 256

[controller]
socket = "{socket}"

[access]
users = ["{user}"]
{replication}
[tables.accounts]
primary_key = "id"
alternate_keys = ["branch"]
fields = {{ id = "int", branch = "str", balance = "int", note = "str" }}
"""

PRIMARY = """
[replication]
role = "primary"
secret_file = "{secret}"
{secondaries}"""

PRIMARY_SECONDARY = """
[[replication.secondaries]]
name = "{secondary}"
address = "127.0.0.1:{port}"
mode = "{mode}"
"""

SECONDARY = """
[replication]
role = "secondary"
secret_file = "{secret}"
listen = "127.0.0.1:{port}"
primary = "{primary}"
serve_reads = {serve_reads}
"""


def _api():
    """``(appliance module, UnavailableError)``, or :class:`Unavailable` saying why not.

    Development-time fallback only: the appliance's client API is written in
    parallel with this benchmark, and until ``appliance.connect`` exists the
    appliance rows are reported as "not available" while the peers still run.
    """
    try:
        import appliance
        from appliance.errors import UnavailableError
    except ImportError as e:
        raise Unavailable(f"cannot import appliance ({e})") from None
    if not callable(getattr(appliance, "connect", None)):
        raise Unavailable("appliance.connect is not implemented yet")
    return appliance, UnavailableError


def segment_mib(n: int) -> int:
    """Per-segment size: about 512 bytes a record over the 4 segments, >= 64 MiB."""
    mib = 64
    while (mib << 20) < n * 512:
        mib *= 2
    return mib


def _env(**extra) -> dict:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _retry(attempt, proc, log: Path, what: str, errors: tuple):
    """``attempt()`` until it stops raising ``errors`` (START_TIMEOUT), or :class:`Unavailable`."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise Unavailable(f"{what} exited with code {proc.returncode}:\n{log_tail(log)}")
        try:
            return attempt()
        except errors as e:
            if time.monotonic() > deadline:
                raise Unavailable(f"{what} not reachable after {START_TIMEOUT:.0f} s: {e}\n"
                                  f"{log_tail(log)}") from None
            time.sleep(0.01)   # an attempt is a connect() that fails at once; the cold-start row times this


class Node:
    """One appliance: its config file, its controller process, its segments."""

    def __init__(self, directory: Path, name: str, n: int, log_size: str = "64MiB", replication: str = "",
                 mib: int | None = None) -> None:
        self.dir, self.name = directory, name
        self.config = directory / f"{name}.toml"
        self.log = directory / f"{name}.controller.log"
        self.proc = None
        self._session = None
        self.segment_mib = mib or segment_mib(n)     # MiB a device segment
        self.config.write_text(CONFIG.format(
            name=name, segment_mib=self.segment_mib, log_size=log_size, socket=directory / f"{name}.sock",
            user=pwd.getpwuid(os.getuid()).pw_name, replication=replication))

    def cli(self, command: str, *args: str) -> list[str]:
        return [sys.executable, "-m", "appliance", command, *args, "--config", str(self.config)]

    def start(self) -> None:
        _, unavailable_error = _api()
        self.proc = spawn_server(self.cli("controller"), self.log, cwd=REPO, env=_env())
        _retry(self.status, self.proc, self.log, "controller", (unavailable_error, ConnectionError))

    def wait_prefault(self) -> None:
        """Part of a system's start: the controller's background mapping of
        every page (storage.prefault) is done before anything is measured,
        so no row shares the cores with it (the cold-start row does not
        wait: it times the start to the first answer)."""
        deadline = time.monotonic() + START_TIMEOUT
        while not (self.status()["memory"]["prefault"] or {"done": True})["done"]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: pages not all mapped after {START_TIMEOUT:g} s")
            time.sleep(0.05)

    def connect(self):
        appliance, unavailable_error = _api()
        return _retry(partial(appliance.connect, str(self.config)), self.proc, self.log, "controller",
                      (unavailable_error, ConnectionError, FileNotFoundError))

    def status(self) -> dict:
        """What ``appliance status --json`` shows (works on a secondary that serves no reads)."""
        from appliance.client.session import Session
        from appliance.wire import messages as m
        if self._session is None:
            self._session = Session(str(self.dir / f"{self.name}.sock"), self.name, timeout=30)
        return self._session.call([m.OP_STATUS], "status")

    def stop(self) -> None:
        if self._session is not None:
            self._session.close()
        if self.proc is None:
            return
        stop_process(self.proc)
        try:
            done = subprocess.run(self.cli("destroy", "--yes"), cwd=REPO, env=_env(), timeout=60,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True)
            if done.returncode:
                print(f"appliance destroy exited with {done.returncode}: {done.stderr.strip()[-500:]}",
                      file=sys.stderr)
        except subprocess.TimeoutExpired:
            print("appliance destroy timed out", file=sys.stderr)
        try:   # last resort, whatever destroy did
            from appliance.store.segment import unlink_all
            left = unlink_all(self.name)
            if left:
                print(f"unlinked leftover segments: {', '.join(left)}", file=sys.stderr)
        except Exception as e:  # noqa: BLE001
            print(f"unlink_all({self.name}) failed: {e}", file=sys.stderr)


def _event(line: str):
    try:
        return json.loads(line)
    except ValueError:      # a traceback line, or a line still being written
        return None


def event_time(event: dict) -> float:
    """An agent log event's wall-clock time (seconds since the epoch)."""
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


class Agent:
    """One replication agent process of a node, logging JSON lines to a file."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.log = node.dir / f"{node.name}.agent.log"
        self.proc = None
        self.mark = 0            # log offset at the last start: events() reads from there

    def start(self) -> float:
        """Start the agent; returns the wall-clock time just before."""
        self.skip_events()
        started = time.time()
        self.proc = spawn_server(self.node.cli("agent"), self.log, cwd=REPO, env=_env(APPLIANCE_LOG_JSON="1"))
        return started

    def skip_events(self) -> None:
        """From now on, events() reads only what is logged after this call."""
        self.mark = self.log.stat().st_size if self.log.exists() else 0

    def events(self) -> list[dict]:
        """The JSON events logged since the last start (or skip_events)."""
        with open(self.log, "rb") as f:
            f.seek(self.mark)
            lines = f.read().decode(errors="replace").splitlines()
        return [e for e in map(_event, lines) if isinstance(e, dict)]

    def wait_event(self, event: str, timeout: float = START_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events():
                if e.get("event") == event:
                    return e
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent of {self.node.name} exited with {self.proc.returncode}:\n"
                                   f"{log_tail(self.log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {event} from the agent of {self.node.name} after {timeout:.0f} s:\n"
                                   f"{log_tail(self.log)}")
            time.sleep(0.02)

    def stop(self) -> None:
        stop_process(self.proc)


class ApplianceClient(Client):
    def __init__(self, config: str, range_len: int) -> None:
        appliance, _ = _api()
        self.db = appliance.connect(config)
        self.t = self.db.table(TABLE)
        self.get = self.t.get          # the bound method itself: no wrapper is timed
        self.range_len = range_len
        self.cancelled = appliance.errors.TransactionCancelledError

    @contextmanager
    def _snapshot(self):
        with self.db.snapshot() as snap:
            yield snap.table(TABLE).get

    def session(self, op: str):
        if op == "snapshot_get":       # every get of the run in one snapshot
            return self._snapshot()
        return super().session(op)

    def find(self, branch):
        return self.t.find("branch", branch)

    def range(self, lo):
        return list(self.t.range(lo, lo + self.range_len))

    def write(self, arg):
        k, rec = next_write(arg)
        self.t[k] = rec

    def _tx_write(self, arg, pipeline: bool):
        k, rec = next_write(arg)
        with self.db.transaction(program="bench", input={"id": k}, pipeline=pipeline) as tx:
            tx.update(TABLE, k, {"balance": rec["balance"]})

    def tx_write(self, arg):
        """Pipelined: the update is held until the commit, and both go as one request."""
        self._tx_write(arg, True)

    def tx_write_waiting(self, arg):
        """The update waits for its reply (with its BEGIN), then the commit: two round trips."""
        self._tx_write(arg, False)

    def _transfer(self, arg, pipeline: bool, optimistic: bool = False):
        """Two reads for update, two updates, commit; a deadlock victim (two
        transfers locking the same accounts in opposite orders) or a stale
        optimistic read is retried, so each call is one transfer done."""
        src, dst, amount = arg
        while True:
            try:
                with self.db.transaction(program="transfer", input={"src": src, "dst": dst, "amount": amount},
                                         pipeline=pipeline, optimistic=optimistic) as tx:
                    a = tx.get(TABLE, src, for_update=True)
                    b = tx.get(TABLE, dst, for_update=True)
                    tx.update(TABLE, src, {"balance": a["balance"] - amount})
                    tx.update(TABLE, dst, {"balance": b["balance"] + amount})
                return
            except self.cancelled:
                continue

    def transfer(self, arg):
        """Pipelined: BEGIN + first get, second get, then the updates and the commit in one send."""
        self._transfer(arg, True)

    def transfer_optimistic(self, arg):
        """Optimistic: both gets read shared memory; their checked locks, the updates and the
        commit go as one request (a stale read runs the transfer again, as Redis's EXEC abort does)."""
        self._transfer(arg, True, optimistic=True)

    def transfer_waiting(self, arg):
        """Every statement waits for its reply: five round trips."""
        self._transfer(arg, False)

    def close(self) -> None:
        self.db.close()


class ApplianceSystem(System):
    name = "appliance"
    SPECIAL = {"snapshot-get": ("appliance (snapshot)", "snapshot_get"), "tx-write": [("appliance", "tx_write"), ("appliance (not pipelined)", "tx_write_waiting")],
               "transfer": [("appliance (optimistic)", "transfer_optimistic"), ("appliance", "transfer"),
                            ("appliance (not pipelined)", "transfer_waiting")]}

    def __init__(self, data, segment_mib: int | None = None) -> None:
        super().__init__(data)
        self.segment_mib = segment_mib       # MiB a device segment (None: segment_mib(N))

    def start(self) -> None:
        appliance, _ = _api()
        self.dir = ram_tempdir("bench-appliance-")
        self.nodes: list[Node] = []
        self.agents: list[Agent] = []
        self.node = self._node("", mib=self.segment_mib)
        self.node.start()
        self.node.wait_prefault()
        self.db = self.node.connect()
        mem = self.node.status()["memory"]
        hp, huge = mem["huge_pages"], (mem["prefault"] or {}).get("huge_bytes")   # measured once mapped
        self.info = {"appliance": getattr(appliance, "__version__", "?"), "huge_pages": dict(hp, mapped_bytes=huge)}
        pages = (f"{huge / 2**20:,.0f} MiB of them in 2 MiB pages (/dev/shm huge={hp['dev_shm']})" if huge
                 else f"4 KiB pages (/dev/shm huge={hp['dev_shm']})")
        self.notes = [
            f"appliance: {self.node.segment_mib} MiB x 4 segments of POSIX shared memory in {pages}, "
            "block_size 4096; reads map shared memory in the client process, writes are a round "
            "trip to the controller over its Unix socket",
        ]

    def _node(self, suffix: str, **kw) -> Node:
        node = Node(self.dir, f"bench{os.getpid()}x{next(_instances)}{suffix}", self.data.n, **kw)
        self.nodes.append(node)
        return node

    def record_bytes(self) -> dict:
        """Shared memory in use (block slots x block size, status ``memory``)
        against the raw bytes of what it holds: each record's encoded key and
        stored image, and each alternate-key index entry (encoded alternate
        key + primary key), computed with the table's own codec; and the
        change log's bytes so far (status ``log.head``: on a fresh system,
        what its load logged)."""
        t = self.db.schema.table(TABLE)
        table = index = 0
        for chunk in self.data.chunks("key"):
            for rec in chunk:
                pk = t.key(rec["id"])
                table += len(pk) + len(t.encode(rec, pk))
                index += sum(len(k) for _, k in t.alt_entries(rec, pk))
        n = self.data.n
        status = self.node.status()
        used = status["memory"]["bytes_used"]
        return {"bytes_used": used, "records": n, "raw_bytes_per_record": (table + index) / n,
                "table_bytes_per_record": table / n, "index_bytes_per_record": index / n,
                "log_bytes": status["log"]["head"]}

    @property
    def config(self) -> Path:
        return self.node.config

    def load_chunk(self, records: list[dict]) -> None:
        loaded = self.db.load(TABLE, records, batch=len(records))
        if loaded != len(records):
            raise RuntimeError(f"db.load loaded {loaded} of {len(records)} records")

    def client_spec(self):
        return partial(ApplianceClient, str(self.config), self.data.range_len)

    def stop(self) -> None:
        db, self.db = getattr(self, "db", None), None
        try:
            if db is not None:
                db.close()
        finally:
            try:
                for agent in getattr(self, "agents", ()):
                    agent.stop()
            finally:
                for node in getattr(self, "nodes", ()):
                    node.stop()
                remove_tree(getattr(self, "dir", None))


class AppliancePair(ApplianceSystem):
    """A primary with one secondary (or ``secondaries`` of them) on loopback
    (free ports), ``mode`` "sync" or "async"; the secondaries serve reads
    (uncompressed blocks) or keep lz4 backup blocks (``serve_reads = false``).
    :meth:`start` starts the controllers; :meth:`start_agents` starts
    replication."""

    BENCHES = ()

    def __init__(self, data, mode: str = "sync", serve_reads: bool = True, log_size: str = "64MiB",
                 secondaries: int = 1, history: bool = False) -> None:
        super().__init__(data)
        self.mode, self.serve_reads, self.log_size, self.history = mode, serve_reads, log_size, history
        self.kind = "uncompressed" if serve_reads else "lz4"
        self.count = secondaries
        self.name = f"appliance ({mode})" if secondaries == 1 else f"appliance ({mode}, {secondaries} secondaries)"
        self.SPECIAL = {f"{mode}-write": (self.name, "write"), f"{mode}-tx-write": (self.name, "tx_write")}

    def start(self) -> None:
        _api()
        self.dir = ram_tempdir("bench-pair-")
        self.nodes, self.agents = [], []
        secret = self.dir / "secret"
        secret.write_bytes(os.urandom(32).hex().encode())
        secret.chmod(0o600)
        base = f"bench{os.getpid()}x{next(_instances)}"
        names = [base + "s" + ("" if i == 0 else str(i)) for i in range(self.count)]
        ports = [free_port() for _ in names]
        hist = (lambda who: f'history_dir = "{self.dir / (who + "-history")}"\n') if self.history else (lambda who: "")
        primary = PRIMARY.replace("{secondaries}", hist("p") + "{secondaries}", 1)
        self.node = Node(self.dir, base + "p", self.data.n, self.log_size, primary.format(
            secret=secret, secondaries="".join(PRIMARY_SECONDARY.format(secondary=n, port=p, mode=self.mode)
                                               for n, p in zip(names, ports))))
        self.secondaries = [Node(self.dir, n, self.data.n, self.log_size, SECONDARY.format(
            secret=secret, port=p, primary=base + "p", serve_reads=str(self.serve_reads).lower()) + hist(n))
            for n, p in zip(names, ports)]
        self.secondary = self.secondaries[0]
        self.nodes = [self.node, *self.secondaries]
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_prefault()
        self.db = self.node.connect()
        self.primary_agent = Agent(self.node)
        self.secondary_agents = [Agent(n) for n in self.secondaries]
        self.secondary_agent = self.secondary_agents[0]
        self.agents = [*self.secondary_agents, self.primary_agent]
        self.notes = [
            f"appliance pairs: a primary and one secondary (two for the row that says so) on 127.0.0.1, each "
            f"a controller and a replication agent (HMAC secret, no TLS, "
            f"{'a log history on both' if self.history else 'no log history'}, heartbeat 0.5 s); "
            f"same segments ({segment_mib(self.data.n)} MiB x 4) on both",
        ]

    def start_agents(self) -> float:
        """Start the secondaries' agents, then (once they listen) the primary's;
        returns the wall-clock time the primary's agent was started."""
        for agent in self.secondary_agents:
            agent.start()
        for agent in self.secondary_agents:
            agent.wait_event("agent_started")
        return self.primary_agent.start()

    def cpu_processes(self) -> dict[str, int]:
        """The pid of each server process of the pair, by role."""
        procs = {"primary_controller": self.node.proc.pid, "primary_agent": self.primary_agent.proc.pid}
        for i, (node, agent) in enumerate(zip(self.secondaries, self.secondary_agents)):
            tag = "secondary" if i == 0 else f"secondary{i + 1}"
            procs[f"{tag}_agent"] = agent.proc.pid
            procs[f"{tag}_controller"] = node.proc.pid
        return procs

    def replica(self) -> dict:
        """The secondary as the primary's status shows it."""
        return next(iter(self.node.status()["replication"]["secondaries"].values()))

    def wait_caught_up(self, timeout: float = 120.0, poll: float = 0.02) -> float:
        """Wait until every secondary is streaming and has acknowledged every
        change the primary has logged so far; returns the wall-clock time it was seen."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.node.status()
            secs = list(st["replication"]["secondaries"].values())
            if all(sec["state"] == "streaming" and sec["acked_serial"] >= st["log"]["serial"] for sec in secs):
                return time.time()
            if time.monotonic() > deadline:
                raise RuntimeError(f"secondaries not caught up after {timeout:.0f} s: {secs}; log serial "
                                   f"{st['log']['serial']}\n{log_tail(self.primary_agent.log)}")
            time.sleep(poll)
