"""The appliance under test, driven through its public client API.

Start: a config TOML in a temporary directory, ``python -m appliance controller
--config PATH`` as a subprocess, then ``appliance.connect(PATH)`` retried until
the controller answers. Stop: SIGTERM (SIGKILL after 10 s), ``python -m
appliance destroy --config PATH`` to unlink the shared-memory segments, and
``appliance.store.segment.unlink_all(name)`` as a last resort.
"""
from __future__ import annotations

import itertools
import os
import pwd
import subprocess
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from systems import Client, System, Unavailable, log_tail, ram_tempdir, remove_tree, spawn_server, stop_process

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
log_size = "64MiB"
max_readers = 256

[controller]
socket = "{socket}"

[access]
users = ["{user}"]

[tables.accounts]
primary_key = "id"
alternate_keys = ["branch"]
fields = {{ id = "int", branch = "str", balance = "int", note = "str" }}
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


class ApplianceClient(Client):
    def __init__(self, config: str, range_len: int) -> None:
        appliance, _ = _api()
        self.db = appliance.connect(config)
        self.t = self.db.table(TABLE)
        self.get = self.t.get          # the bound method itself: no wrapper is timed
        self.range_len = range_len

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
        k, rec = arg
        self.t[k] = rec

    def tx_write(self, arg):
        k, rec = arg
        with self.db.transaction(program="bench", input={"id": k}) as tx:
            tx.update(TABLE, k, {"balance": rec["balance"]})

    def close(self) -> None:
        self.db.close()


class ApplianceSystem(System):
    name = "appliance"
    SPECIAL = {"snapshot-get": ("appliance (snapshot)", "snapshot_get"), "tx-write": ("appliance", "tx_write")}

    def start(self) -> None:
        appliance, unavailable_error = _api()
        self.dir = ram_tempdir("bench-appliance-")
        self.appliance_name = f"bench{os.getpid()}x{next(_instances)}"
        self.config = self.dir / "bench.toml"
        self.log = self.dir / "controller.log"
        self.config.write_text(CONFIG.format(
            name=self.appliance_name, segment_mib=segment_mib(self.data.n), socket=self.dir / "ctl.sock",
            user=pwd.getpwuid(os.getuid()).pw_name))
        self.proc = spawn_server(self._cli("controller"), self.log, cwd=REPO, env=self._env())
        self.db = self._connect(appliance, unavailable_error)
        self.info = {"appliance": getattr(appliance, "__version__", "?")}
        self.notes = [
            f"appliance: {segment_mib(self.data.n)} MiB x 4 segments of POSIX shared memory, "
            "block_size 4096; reads map shared memory in the client process, writes are a round "
            "trip to the controller over its Unix socket",
        ]

    def _cli(self, command: str) -> list[str]:
        return [sys.executable, "-m", "appliance", command, "--config", str(self.config)]

    @staticmethod
    def _env() -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        return env

    def _connect(self, appliance, unavailable_error):
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise Unavailable(f"controller exited with code {self.proc.returncode}:\n{log_tail(self.log)}")
            try:
                return appliance.connect(str(self.config))
            except (unavailable_error, ConnectionError, FileNotFoundError) as e:
                if time.monotonic() > deadline:
                    raise Unavailable(f"controller not reachable after {START_TIMEOUT:.0f} s: {e}\n"
                                      f"{log_tail(self.log)}") from None
                time.sleep(0.1)

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
            stop_process(getattr(self, "proc", None))
            if hasattr(self, "config"):
                self._destroy()
            remove_tree(getattr(self, "dir", None))

    def _destroy(self) -> None:
        try:
            done = subprocess.run(self._cli("destroy"), cwd=REPO, env=self._env(), timeout=60,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True)
            if done.returncode:
                print(f"appliance destroy exited with {done.returncode}: {done.stderr.strip()[-500:]}",
                      file=sys.stderr)
        except subprocess.TimeoutExpired:
            print("appliance destroy timed out", file=sys.stderr)
        try:   # last resort, whatever destroy did
            from appliance.store.segment import unlink_all
            left = unlink_all(self.appliance_name)
            if left:
                print(f"unlinked leftover segments: {', '.join(left)}", file=sys.stderr)
        except Exception as e:  # noqa: BLE001
            print(f"unlink_all({self.appliance_name}) failed: {e}", file=sys.stderr)
