"""The `appliance` command, run as a subprocess like an operator runs it.

Exit status (appliance/cli/__main__.py): 0 success; 1 refused; 2 usage; 3 not
running; 69 busy; 78 bad configuration.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import write_config
from procs import APPLIANCE, RUN_DIR
from test_client import acct


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "APPLIANCE_PROGRESS"}
    return subprocess.run([*APPLIANCE, *args], capture_output=True, text=True, cwd=RUN_DIR,
                          env=env, input=stdin, timeout=120)


def write_jsonl(path, lines: list) -> str:
    """Write records (dicts, dumped as JSON) or raw strings, one a line; return the path as str."""
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return str(path)


def segments_of(name: str) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"apl.{name}."))


@pytest.fixture
def stopped(make_appliance):
    """An appliance that ran once (its segments exist) and whose controller has stopped."""
    a = make_appliance().start()
    assert a.controller.stop() == 0
    return a


class TestHelp:
    def test_help(self):
        """`appliance --help` exits 0 and lists every command."""
        r = cli("--help")
        assert r.returncode == 0
        for command in ("controller", "status", "load", "destroy", "demo"):
            assert command in r.stdout

    @pytest.mark.parametrize("command", ["controller", "status", "load", "destroy", "demo"])
    def test_command_help(self, command):
        """Every command's --help exits 0 and shows its usage."""
        r = cli(command, "--help")
        assert r.returncode == 0 and "Usage:" in r.stdout

    def test_version(self):
        """--version prints the package version."""
        import appliance
        r = cli("--version")
        assert r.returncode == 0 and appliance.__version__ in r.stdout

    def test_usage_errors_exit_2(self):
        """An unknown command or a missing --config is a usage error (exit 2)."""
        assert cli("frobnicate").returncode == 2
        r = cli("status")
        assert r.returncode == 2 and "--config" in r.stderr


class TestStatus:
    def test_human_status_when_running(self, bank, db):
        """`status` of a running appliance exits 0 with a readable summary of segments, tables and transactions."""
        db.load("accounts", [acct(i) for i in range(1, 8)])
        r = cli("status", "--config", str(bank.config))
        assert r.returncode == 0, r.stderr
        out = r.stdout
        assert bank.name in out and "running" in out
        for word in ("segments", "tables", "accounts", "transactions", "change log"):
            assert word in out

    def test_json_status_when_running(self, bank, db):
        """`status --json` prints one JSON object with segments, blocks, tables and transactions."""
        db.load("accounts", [acct(i) for i in range(1, 8)])
        r = cli("status", "--json", "--config", str(bank.config))
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["running"] is True and st["name"] == bank.name and st["pid"] == bank.controller.pid
        assert len(st["segments"]) == bank.cfg.storage.segments
        assert {"used", "max", "slots_total", "slots_free"} <= set(st["blocks"])
        assert st["tables"] == [{"name": "accounts", "records": 7, "primary_key": "id",
                                 "alternate_keys": ["branch"]}]
        assert st["transactions"]["committed"] == 1 and st["transactions"]["active"] == 0

    @pytest.mark.parametrize("as_json", [False, True], ids=["human", "json"])
    def test_not_running_exits_3(self, tmp_path, stopped, as_json):
        """`status` exits 3 with a clear message when the appliance was never started or has stopped."""
        never = write_config(tmp_path)
        for config in (never, stopped.config):
            r = cli("status", *(["--json"] if as_json else []), "--config", str(config))
            assert r.returncode == 3
            if as_json:
                doc = json.loads(r.stdout)
                assert doc["running"] is False and "not running" in doc["error"]
            else:
                assert "not running" in r.stderr and "Traceback" not in r.stderr


class TestLoad:
    def test_load_jsonl(self, bank, db, tmp_path):
        """`load` inserts every line of a JSONL file, prints the count, and a client sees the records."""
        records = [acct(i, f"b{i % 3}", i * 10) for i in range(1, 251)]
        path = write_jsonl(tmp_path / "data.jsonl", records + [""])  # a blank line is skipped
        r = cli("load", "--config", str(bank.config), "accounts", path)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "loaded 250 records into accounts"
        t = db.table("accounts")
        assert len(t) == 250 and t.values() == records

    def test_load_from_stdin_in_batches(self, bank, db):
        """`load ... -` reads standard input; --batch splits it into several transactions."""
        text = "".join(json.dumps(acct(i)) + "\n" for i in range(1, 11))
        r = cli("load", "--config", str(bank.config), "--batch", "3", "accounts", "-", stdin=text)
        assert r.returncode == 0, r.stderr
        assert "loaded 10 records" in r.stdout
        assert list(db.table("accounts")) == list(range(1, 11))
        assert db.status()["transactions"]["committed"] == 4

    def test_bad_json_line_fails_naming_the_line(self, bank, db, tmp_path):
        """A line that is not JSON fails with exit 1 and file:line in the message; nothing of its batch is loaded."""
        path = write_jsonl(tmp_path / "bad.jsonl", [acct(1), acct(2), "{oops", acct(4)])
        r = cli("load", "--config", str(bank.config), "accounts", path)
        assert r.returncode == 1
        assert f"{path}:3" in r.stderr and "not a JSON object" in r.stderr and "Traceback" not in r.stderr
        assert len(db.table("accounts")) == 0

    def test_earlier_batches_stay_failing_batch_does_not(self, bank, db, tmp_path):
        """With --batch 2 and line 4 bad, lines 1-2 (a committed batch) stay and line 3 (the failing batch) is not loaded."""
        path = write_jsonl(tmp_path / "bad.jsonl", [acct(1), acct(2), acct(3), "not json", acct(5)])
        r = cli("load", "--config", str(bank.config), "--batch", "2", "accounts", path)
        assert r.returncode == 1 and f"{path}:4" in r.stderr
        assert list(db.table("accounts")) == [1, 2]

    def test_invalid_record_fails_and_loads_nothing(self, bank, db, tmp_path):
        """A record that breaks the schema fails with exit 1, names the field, and nothing of the batch is loaded."""
        path = write_jsonl(tmp_path / "bad.jsonl", [acct(1), {"id": 2, "branch": "x", "balance": "lots"}, acct(3)])
        r = cli("load", "--config", str(bank.config), "accounts", path)
        assert r.returncode == 1
        assert "balance" in r.stderr and "expected int" in r.stderr and "Traceback" not in r.stderr
        assert len(db.table("accounts")) == 0

    @pytest.mark.parametrize("bad", [{"id": 2, "branch": "x", "balance": "lots"}, "[2, \"x\", 3]", acct(1)],
                             ids=["wrong-type", "not-an-object", "duplicate"])
    def test_invalid_record_message_names_the_line(self, bank, tmp_path, bad):
        """Whatever is wrong with line 2, the message names file:2."""
        path = write_jsonl(tmp_path / "bad.jsonl", [acct(1), bad, acct(3)])
        r = cli("load", "--config", str(bank.config), "accounts", path)
        assert r.returncode == 1 and f"{path}:2" in r.stderr

    def test_unknown_table_refused(self, bank, tmp_path):
        """Loading into an unknown table exits 1 naming the table."""
        path = write_jsonl(tmp_path / "d.jsonl", [acct(1)])
        r = cli("load", "--config", str(bank.config), "nosuch", path)
        assert r.returncode == 1 and "no such table 'nosuch'" in r.stderr

    def test_load_cut_short_says_what_committed_and_how_to_resume(self, bank, db, tmp_path):
        """A load whose controller is killed part-way exits 3 saying how many records (up to which line) were committed and the command that resumes it; that command (--skip-existing) loads the rest, none twice."""
        import re
        import signal
        import time
        n = 200_000
        path = write_jsonl(tmp_path / "big.jsonl", [acct(i, f"b{i % 7}", i) for i in range(1, n + 1)])
        p = subprocess.Popen([*APPLIANCE, "load", "--config", str(bank.config), "--batch", "1000", "accounts", path],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=RUN_DIR)
        try:
            t = db.table("accounts")
            while len(t) < 5000:
                assert p.poll() is None, p.communicate()
                time.sleep(0.01)
            bank.controller.signal(signal.SIGKILL)
            out, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 3, err
        said = re.search(r"(\d+) records were committed \(up to line (\d+) of (\S+)\)", err)
        assert said and said.group(3) == path, err
        committed, line = int(said.group(1)), int(said.group(2))
        assert committed % 1000 == 0 and line == committed and "Traceback" not in err
        resume = re.search(r"resume with: (appliance load .*)$", err.strip())
        assert resume and "--skip-existing" in resume.group(1), err
        bank.controller.start()
        have = len(bank.connect().table("accounts"))
        assert committed <= have <= committed + 1000          # the batch in flight may have committed
        argv = resume.group(1).split()[1:]
        r = cli(*argv)
        assert r.returncode == 0, r.stderr
        c = bank.connect()
        assert len(c.table("accounts")) == n
        assert c.table("accounts")[n] == acct(n, f"b{n % 7}", n) and c.table("accounts")[1] == acct(1, "b1", 1)

    def test_load_when_not_running_exits_3(self, stopped, tmp_path):
        """`load` exits 3 when the appliance is not running."""
        path = write_jsonl(tmp_path / "d.jsonl", [acct(1)])
        r = cli("load", "--config", str(stopped.config), "accounts", path)
        assert r.returncode == 3 and "not running" in r.stderr


class TestDestroy:
    def test_refuses_while_controller_runs(self, bank, db):
        """`destroy --yes` exits 69 while a controller serves the appliance and removes nothing."""
        db.table("accounts")[1] = acct(1)
        before = segments_of(bank.name)
        r = cli("destroy", "--yes", "--config", str(bank.config))
        assert r.returncode == 69
        assert "stop it first" in r.stderr and str(bank.controller.pid) in r.stderr
        assert segments_of(bank.name) == before and len(before) == 3 + bank.cfg.storage.segments
        assert db.table("accounts")[1] == acct(1)

    def test_removes_segments_after_stop(self, stopped):
        """After the controller stopped, `destroy --yes` removes every segment of the appliance."""
        assert len(segments_of(stopped.name)) == 3 + stopped.cfg.storage.segments  # + the controller lock
        r = cli("destroy", "--yes", "--config", str(stopped.config))
        assert r.returncode == 0, r.stderr
        assert f"removed {2 + stopped.cfg.storage.segments} segment(s)" in r.stdout
        assert segments_of(stopped.name) == []
        r = cli("destroy", "--yes", "--config", str(stopped.config))
        assert r.returncode == 0 and "removed 0 segment(s)" in r.stdout


class TestController:
    @pytest.mark.parametrize("command", ["controller", "status"])
    def test_bad_config_exits_78_naming_file_and_key(self, tmp_path, command):
        """`controller` (and `status`) with a bad config exit 78; the output names the file and the bad key."""
        path = write_config(tmp_path, storage="blok_size = 4096")
        r = cli(command, "--config", str(path))
        assert r.returncode == 78
        out = r.stdout + r.stderr
        assert str(path) in out and "storage.blok_size" in out and "unknown key" in out
        assert "Traceback" not in out

    def test_missing_config_exits_78(self, tmp_path):
        """`controller` with a config file that does not exist exits 78 naming it."""
        path = tmp_path / "missing.toml"
        r = cli("controller", "--config", str(path))
        assert r.returncode == 78 and str(path) in r.stdout + r.stderr

    def test_second_controller_exits_69(self, bank, db):
        """A second controller for an appliance that is already served exits 69; the first keeps serving."""
        r = cli("controller", "--config", str(bank.config))
        assert r.returncode == 69 and "already served" in r.stdout + r.stderr
        db.table("accounts")[1] = acct(1)
        assert db.table("accounts")[1] == acct(1)
