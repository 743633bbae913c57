"""``appliance top`` driven in a pseudo-terminal of 80x24 (pexpect), its
screen read back through a terminal emulator (pyte), against a real primary
and asynchronous secondary (each a controller and an agent) that the whole
module shares.
"""
from __future__ import annotations

import json
import re
import subprocess
import threading
import time

import pexpect
import pyte
import pytest

from conftest import Cluster
from procs import APPLIANCE, RUN_DIR

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(make_module_appliance, tmp_path_factory):
    c = Cluster(make_module_appliance, tmp_path_factory.mktemp("top"), secondaries=(("async", ""),),
                secondary_replication='history_dir = "history"')
    try:
        c.start()
        yield c
    finally:
        c.cleanup()


class Terminal:
    """`appliance top` in an 80x24 pseudo-terminal, and what its screen shows."""

    def __init__(self, config, *args: str) -> None:
        self.screen = pyte.Screen(80, 24)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = b""
        self.child = pexpect.spawn(APPLIANCE[0], [*APPLIANCE[1:], "top", "--config", str(config), *args],
                                   dimensions=(24, 80), cwd=RUN_DIR, env={"TERM": "xterm-256color",
                                                                          "PATH": "/usr/bin:/bin"})

    def pump(self, timeout: float = 0.2) -> None:
        try:
            data = self.child.read_nonblocking(1 << 16, timeout=timeout)
        except (pexpect.TIMEOUT, pexpect.EOF):
            return
        self.raw += data
        self.stream.feed(data)

    def text(self) -> str:
        return "\n".join(self.screen.display)

    def wait(self, pred, what: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            self.pump()
            if pred(self.text()):
                return self.text()
            if time.monotonic() > deadline:
                raise AssertionError(f"screen never showed {what}:\n{self.text()}")

    def finish(self, timeout: float = 15.0) -> int:
        """Wait for the command to end (reading what it still draws); its exit status."""
        deadline = time.monotonic() + timeout
        while self.child.isalive():
            self.pump()
            if time.monotonic() > deadline:
                raise AssertionError(f"top did not exit:\n{self.text()}")
        self.child.close()
        return self.child.exitstatus

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)


@pytest.fixture
def terminal():
    made: list[Terminal] = []

    def open_(config, *args) -> Terminal:
        t = Terminal(config, *args)
        made.append(t)
        return t

    yield open_
    for t in made:
        t.close()


def commits_per_second(screen: str) -> float:
    m = re.search(r"commits/s\s+([\d,]+)", screen)
    return float(m.group(1).replace(",", "")) if m else 0.0


class TestLiveView:
    def test_primary_view_fits_80x24_and_q_leaves(self, pair, terminal):
        """The primary's view: name and role, health OK, its secondary streaming, the devices; commits/s moves
        while clients commit; `q` exits 0 and leaves the alternate screen."""
        t = terminal(pair.primary.app.config, "--interval", "0.5")
        sec = pair.secondaries[0].name
        screen = t.wait(lambda s: f"appliance {pair.primary.name}" in s and "health: OK" in s
                        and re.search(rf"{sec}\s+async\s+streaming", s), "the primary, healthy, streaming")
        assert re.search(r"devices *\n +dev0 +[█░]+ +\d+%  \d+/\d+ blocks *\n +dev1 ", screen), screen
        assert "no snapshot held" in screen
        stop = threading.Event()

        def load() -> None:   # bounded: at most 20,000 commits, until the screen showed them
            db = pair.primary.app.connect()
            acc = db.table("accounts")
            for i in range(20_000):
                if stop.is_set():
                    return
                acc[i] = {"branch": "top", "balance": i}

        th = threading.Thread(target=load)
        th.start()
        try:
            screen = t.wait(lambda s: commits_per_second(s) > 0, "commits per second above 0")
        finally:
            stop.set()
            th.join(30)
        assert re.search(r"commits/s\s+[\d,]+ [▁▂▃▄▅▆▇█]+", screen)
        t.child.send("q")
        assert t.finish() == 0
        assert b"\x1b[?1049l" in t.raw          # the alternate screen was left
        assert b"Traceback" not in t.raw

    def test_ctrl_c_exits_cleanly(self, pair, terminal):
        """Ctrl-C in the live view: exit status 0, no traceback, the terminal given back."""
        t = terminal(pair.primary.app.config)
        t.wait(lambda s: f"appliance {pair.primary.name}" in s, "the header")
        t.child.sendintr()
        assert t.finish() == 0
        assert b"Traceback" not in t.raw and b"\x1b[?1049l" in t.raw

    def test_secondary_shows_its_primary_and_lag(self, pair, terminal):
        """On the secondary: its primary connected and the lag in serials (0 once caught up)."""
        pair.wait_caught_up()
        t = terminal(pair.secondaries[0].app.config, "--interval", "0.5")
        screen = t.wait(lambda s: re.search(rf"primary {pair.primary.name}: connected, streaming, lag 0 serials", s),
                        "the primary connected, lag 0")
        assert "secondary" in screen.splitlines()[0]
        t.child.send("q")
        assert t.finish() == 0


    def test_secondary_shows_batch_mode_while_it_lasts(self, pair, terminal):
        """batch begin on the secondary: its view says applying is suspended; batch end: off again."""
        import appliance
        pair.wait_caught_up()
        sec = pair.secondaries[0].app.config
        t = terminal(sec, "--interval", "0.5")
        t.wait(lambda s: "batch mode: off" in s, "batch mode off")
        with appliance.connect(sec) as db:
            db.batch("begin")
            try:
                t.wait(lambda s: "batch mode: applying suspended" in s, "batch mode shown")
            finally:
                db.batch("end")
        t.wait(lambda s: "batch mode: off" in s or "catching up" in s, "batch mode ended")
        t.child.send("q")
        assert t.finish() == 0


class TestOnce:
    def test_json_frame(self, pair):
        """--json: one frame's figures, rates over one interval, per-secondary lag, devices and the oldest snapshot."""
        r = subprocess.run([*APPLIANCE, "top", "--config", str(pair.primary.app.config), "--json", "--interval", "0.2"],
                           capture_output=True, text=True, cwd=RUN_DIR, timeout=60)
        assert r.returncode == 0, r.stderr
        frame = json.loads(r.stdout)
        assert frame["running"] is True and frame["role"] == "primary"
        assert {row["secondary"] for row in frame["replication"]} == {pair.secondaries[0].name}
        assert "commits_s" in frame["rates"] and len(frame["devices"]) == 2
        assert set(frame["oldest_snapshot"]) == {"pid", "age_s", "pins"}

    def test_not_running_exits_3(self, make_appliance):
        """--once for an appliance that is not running prints so and exits 3."""
        app = make_appliance()
        r = subprocess.run([*APPLIANCE, "top", "--config", str(app.config), "--once"], capture_output=True,
                           text=True, cwd=RUN_DIR, timeout=60)
        assert r.returncode == 3
        assert "not running" in r.stdout and app.name in r.stdout
