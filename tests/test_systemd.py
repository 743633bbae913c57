"""The appliance as systemd services, under a real systemd (PID 1 of a container).

Each container boots a minimal Debian (tests/nspawn.py) with the built wheel
and its dependencies bind-mounted as a wheelhouse; inside, as an operator
would: ``python3 -m venv /opt/appliance``, ``pip install`` the wheel,
``appliance install --instance ...``, ``systemctl start appliance@<i>.target``.
The containers share the host's network (the pair talks over 127.0.0.1) and
each has its own /dev/shm.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid

import pytest

import nspawn
from conftest import free_port

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(nspawn.unavailable() is not None, reason=str(nspawn.unavailable()))]

PY = "/opt/appliance/bin/python"
APPLIANCE = "/opt/appliance/bin/appliance"


def _mirror_reachable() -> bool:
    try:
        urllib.request.urlopen(nspawn.MIRROR + "/dists/" + nspawn.SUITE + "/Release", timeout=10).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def rootfs():
    try:
        return nspawn.rootfs()
    except RuntimeError:
        if not _mirror_reachable():
            pytest.skip(f"the Debian mirror {nspawn.MIRROR} cannot be reached to build the container")
        raise


@pytest.fixture(scope="module")
def wheelhouse(built_dist, tmp_path_factory):
    """The wheel and every dependency as wheels, for an offline pip inside the containers."""
    wh = tmp_path_factory.mktemp("wheelhouse")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wh), str(built_dist["wheel"])],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return wh


@pytest.fixture(scope="module")
def boot(rootfs, wheelhouse, tmp_path_factory):
    """boot(label) -> a container with the package installed in /opt/appliance."""
    made: list[nspawn.Container] = []
    logs = tmp_path_factory.mktemp("nspawn")

    def make(label: str) -> nspawn.Container:
        c = nspawn.Container(rootfs, f"apl-{label}-{uuid.uuid4().hex[:6]}", logs, binds={wheelhouse: "/opt/wheelhouse"})
        made.append(c)
        c.boot()
        c.run(["python3", "-m", "venv", "/opt/appliance"])
        c.run([PY, "-m", "pip", "install", "-q", "--no-index", "--find-links", "/opt/wheelhouse", "appliance"])
        return c

    yield make
    for c in made:
        c.stop()


def client(c: nspawn.Container, instance: str, code: str) -> str:
    """Run client code inside the container (db = the instance's client); its stdout."""
    prog = f"import appliance, json, sys\ndb = appliance.connect('/etc/appliance/{instance}.toml')\n" \
           + textwrap.dedent(code)
    return c.run([PY, "-c", prog]).stdout


SINGLE = """
name = "bank"
[storage]
segments = 2
segment_size = "16MiB"
log_size = "4MiB"
[tables.accounts]
primary_key = "id"
alternate_keys = ["branch"]
fields = { id = "int", branch = "str", balance = "int" }
"""


@pytest.fixture(scope="module")
def single(boot):
    c = boot("single")
    c.write("/root/bank.toml", SINGLE)
    out = c.run([APPLIANCE, "install", "--instance", "bank", "--config", "/root/bank.toml", "--json"]).stdout
    return c, json.loads(out)


class TestInstall:
    def test_install_puts_everything_in_place(self, single):
        """Units (ExecStart at the installed command), user, config, state directory, target wants."""
        c, rep = single
        unit = c.run(["cat", "/etc/systemd/system/appliance-controller@.service"]).stdout
        assert f"ExecStart={APPLIANCE} controller --config /etc/appliance/%i.toml" in unit
        assert c.run(["id", "-u", "appliance"]).stdout.strip().isdigit()
        st = c.run(["stat", "-c", "%a %U %G", "/etc/appliance/bank.toml"]).stdout.split()
        assert st == ["640", "root", "appliance"]
        assert c.run(["stat", "-c", "%U", "/var/lib/appliance/bank"]).stdout.strip() == "appliance"
        wants = c.run(["ls", "/etc/systemd/system/appliance@bank.target.wants"]).stdout.split()
        assert wants == ["appliance-controller@bank.service"]   # no [replication]: no agent
        again = json.loads(c.run([APPLIANCE, "install", "--instance", "bank", "--config", "/root/bank.toml",
                                  "--json"]).stdout)
        assert not [p for p in again["written"] if p.endswith(".toml")]   # idempotent

    def test_a_different_config_is_refused_without_force(self, single):
        """`install` with another config for an installed instance exits 78 saying it differs; the installed config stays."""
        c, _ = single
        c.write("/root/other.toml", SINGLE.replace('segments = 2', 'segments = 3'))
        r = c.run([APPLIANCE, "install", "--instance", "bank", "--config", "/root/other.toml"], check=False)
        assert r.returncode == 78 and "differs" in r.stderr
        assert "segments = 2" in c.run(["cat", "/etc/appliance/bank.toml"]).stdout

    def test_shipped_units_verify_cleanly(self, single):
        """systemd-analyze verify of every installed unit: exit 0 and not one warning."""
        c, _ = single
        units = ["appliance-controller@bank.service", "appliance-agent@bank.service", "appliance@bank.target",
                 "appliance.service"]
        r = c.run(["systemd-analyze", "verify", "--man=no", *(f"/etc/systemd/system/{u}" for u in units)],
                  check=False)
        assert r.returncode == 0, r.stderr
        assert r.stderr.strip() == "", r.stderr


class TestService:
    def test_start_returns_once_ready(self, single):
        """`systemctl start` returns after READY=1: the appliance answers at once, STATUS= is shown."""
        c, _ = single
        c.run(["systemctl", "start", "appliance@bank.target"])
        st = json.loads(c.run([APPLIANCE, "status", "--config", "/etc/appliance/bank.toml", "--json"]).stdout)
        assert st["running"] is True and st["name"] == "bank"
        show = c.show("appliance-controller@bank.service", "ActiveState", "SubState", "StatusText", "User")
        assert show["ActiveState"] == "active" and show["User"] == "appliance"
        assert "serving bank" in show["StatusText"]
        status = c.run(["systemctl", "status", "--no-pager", "appliance-controller@bank.service"],
                       check=False).stdout
        assert "Status: \"serving bank" in status
        assert c.run(["stat", "-c", "%U", "/dev/shm/apl.bank.meta"]).stdout.strip() == "appliance"

    def test_killed_controller_is_restarted_and_keeps_the_data(self, single):
        """kill -9: systemd restarts the controller, the segments (and the data) survive."""
        c, _ = single
        c.run(["systemctl", "start", "appliance@bank.target"])
        client(c, "bank", "db.table('accounts')[7] = {'branch': 'tokyo', 'balance': 700}")
        before = int(c.show("appliance-controller@bank.service", "NRestarts")["NRestarts"])
        pid = c.show("appliance-controller@bank.service", "MainPID")["MainPID"]
        c.run(["systemctl", "kill", "-s", "KILL", "appliance-controller@bank.service"])
        st = c.wait_unit("appliance-controller@bank.service", ActiveState="active", SubState="running",
                         NRestarts=str(before + 1))
        assert c.show("appliance-controller@bank.service", "MainPID")["MainPID"] != pid
        assert st["NRestarts"] == str(before + 1)
        out = client(c, "bank", "print(json.dumps(db.table('accounts').get(7)))")
        assert json.loads(out) == {"id": 7, "branch": "tokyo", "balance": 700}

    def test_clean_stop(self, single):
        """Stopping the target stops the controller with status 0; the segments stay."""
        c, _ = single
        c.run(["systemctl", "start", "appliance@bank.target"])
        c.run(["systemctl", "stop", "appliance@bank.target"])
        st = c.wait_unit("appliance-controller@bank.service", ActiveState="inactive")
        show = c.show("appliance-controller@bank.service", "ExecMainStatus", "Result")
        assert show["Result"] == "success" and show["ExecMainStatus"] == "0", (st, show)
        assert "apl.bank.meta" in c.run(["ls", "/dev/shm"]).stdout
        c.run(["systemctl", "start", "appliance@bank.target"])
        out = client(c, "bank", "print(json.dumps(db.table('accounts').get(7)))")
        assert json.loads(out)["balance"] == 700


class TestOperations:
    """Reload, watchdog and a refused start, on the single instance (started by TestService)."""

    def test_reload_changes_a_reloadable_key_and_says_what_it_could_not(self, single):
        """`systemctl reload`: access.users taken at once (a refused user connects afterwards, same process);
        controller.max_frame reported in the journal as needing a restart."""
        c, _ = single
        c.run(["systemctl", "start", "appliance@bank.target"])
        c.run(["useradd", "--no-create-home", "--groups", "appliance", "teller"])
        as_teller = ["runuser", "-u", "teller", "--", PY, "-c",
                     "import appliance, json; db = appliance.connect('/etc/appliance/bank.toml', wait=0); "
                     "print(json.dumps(db.table('accounts').get(7)))"]
        r = c.run(as_teller, check=False)
        assert r.returncode != 0 and "AccessDeniedError" in r.stderr and "teller" in r.stderr
        pid = c.show("appliance-controller@bank.service", "MainPID")["MainPID"]
        text = c.run(["cat", "/etc/appliance/bank.toml"]).stdout
        c.write("/etc/appliance/bank.toml", text.replace("[tables.accounts]", '[controller]\nmax_frame = "32MiB"\n'
                                                         '[access]\nusers = ["teller"]\n[tables.accounts]'),
                mode="0640")
        c.run(["chgrp", "appliance", "/etc/appliance/bank.toml"])
        c.run(["systemctl", "reload", "appliance-controller@bank.service"])
        journal = c.run(["journalctl", "-u", "appliance-controller@bank.service", "-o", "cat", "--no-pager"]).stdout
        events = [json.loads(x) for x in journal.splitlines() if x.startswith("{")]
        applied = [e for e in events if e.get("event") == "config_reloaded"]
        restart = [e for e in events if e.get("event") == "config_reload_needs_restart"]
        assert applied and applied[-1]["applied"] == ["access.users"]
        assert restart and restart[-1]["keys"] == ["controller.max_frame"]
        assert c.show("appliance-controller@bank.service", "MainPID")["MainPID"] == pid
        assert json.loads(c.run(as_teller).stdout)["id"] == 7

    def test_watchdog_restarts_a_stopped_controller(self, single):
        """WatchdogSec=2s in a drop-in: pings arrive while the loop turns; SIGSTOP stops them and systemd
        restarts the controller by its watchdog; the data is still there."""
        c, _ = single
        unit = "appliance-controller@bank.service"
        c.write(f"/etc/systemd/system/{unit}.d/watchdog.conf", "[Service]\nWatchdogSec=2s\nTimeoutAbortSec=2s\n")
        try:
            c.run(["systemctl", "daemon-reload"])
            c.run(["systemctl", "restart", unit])
            assert c.show(unit, "WatchdogUSec")["WatchdogUSec"] == "2s"
            first = c.show(unit, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]
            deadline = time.monotonic() + 10
            while c.show(unit, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"] == first:
                assert time.monotonic() < deadline, "no WATCHDOG=1 within 10 s"
                time.sleep(0.1)
            before = int(c.show(unit, "NRestarts")["NRestarts"])
            pid = c.show(unit, "MainPID")["MainPID"]
            c.run(["systemctl", "kill", "-s", "STOP", unit])
            c.wait_unit(unit, timeout=30, ActiveState="active", SubState="running", NRestarts=str(before + 1))
            assert c.show(unit, "MainPID")["MainPID"] != pid
            journal = c.run(["journalctl", "-u", unit, "--no-pager", "-o", "cat"]).stdout
            assert "Watchdog timeout" in journal
            out = client(c, "bank", "print(json.dumps(db.table('accounts').get(7)))")
            assert json.loads(out)["balance"] == 700
        finally:
            c.run(["rm", "-rf", f"/etc/systemd/system/{unit}.d"])
            c.run(["systemctl", "daemon-reload"])
            c.run(["systemctl", "restart", unit])

    def test_refused_start_shows_its_exit_status(self, single):
        """A missing secret file: the controller exits 66, `systemctl status` shows status=66/NOINPUT, the
        journal names the key, the file and the fix, and systemd does not retry it."""
        c, _ = single
        c.write("/root/vault.toml", PAIR.format(name="vault", role='role = "primary"\n[[replication.secondaries]]\n'
                                                'name = "vault-dr"\naddress = "127.0.0.1:1"\n').replace(
                                                    "/etc/appliance/bank.secret", "/etc/appliance/vault.secret"))
        c.run([APPLIANCE, "install", "--instance", "vault", "--config", "/root/vault.toml"])
        c.run(["rm", "/etc/appliance/vault.secret"])
        unit = "appliance-controller@vault.service"
        r = c.run(["systemctl", "start", unit], check=False)
        assert r.returncode != 0
        st = c.wait_unit(unit, ActiveState="failed")
        show = c.show(unit, "ExecMainStatus", "Result", "NRestarts")
        assert show["ExecMainStatus"] == "66" and show["Result"] == "exit-code" and show["NRestarts"] == "0", (st, show)
        status = c.run(["systemctl", "status", "--no-pager", unit], check=False).stdout
        assert "status=66/NOINPUT" in status
        journal = c.run(["journalctl", "-u", unit, "--no-pager", "-o", "cat"]).stdout
        refused = [json.loads(x) for x in journal.splitlines() if x.startswith("{") and "config_invalid" in x]
        assert refused and refused[-1]["key"] == "replication.secret_file"
        assert "/etc/appliance/vault.secret does not exist" in refused[-1]["error"]
        assert "apl.vault.meta" not in c.run(["ls", "/dev/shm"]).stdout


PAIR = """
name = "{name}"
[storage]
segments = 2
segment_size = "16MiB"
log_size = "4MiB"
[replication]
secret_file = "/etc/appliance/bank.secret"
heartbeat = 0.2
{role}
[tables.accounts]
primary_key = "id"
alternate_keys = ["branch"]
fields = {{ id = "int", branch = "str", balance = "int" }}
"""


@pytest.fixture(scope="module")
def pair(boot):
    """A primary (bank) and a synchronous secondary (bank-dr), each in its own container, started."""
    port = free_port()
    prim, sec = boot("prim"), boot("sec")
    secret = uuid.uuid4().hex + uuid.uuid4().hex
    roles = {
        prim: ("bank", f'role = "primary"\n[[replication.secondaries]]\nname = "bank-dr"\n'
                       f'address = "127.0.0.1:{port}"\nmode = "sync"\n'),
        sec: ("bank-dr", f'role = "secondary"\nlisten = "127.0.0.1:{port}"\nprimary = "bank"\n'
                         'history_dir = "/var/lib/appliance/bank-dr/history"\n'),
    }
    for c, (name, role) in roles.items():
        c.write("/root/cfg.toml", PAIR.format(name=name, role=role))
        c.run(["mkdir", "-p", "/etc/appliance"])
        c.write("/etc/appliance/bank.secret", secret + "\n", mode="0600")
        c.run([APPLIANCE, "install", "--instance", name, "--config", "/root/cfg.toml"])
        c.run(["chgrp", "appliance", "/etc/appliance/bank.secret"])
        c.run(["chmod", "0640", "/etc/appliance/bank.secret"])
        assert c.run(["ls", f"/etc/systemd/system/appliance@{name}.target.wants"]).stdout.split() == \
            [f"appliance-agent@{name}.service", f"appliance-controller@{name}.service"]
    sec.run(["systemctl", "start", "appliance@bank-dr.target"])
    prim.run(["systemctl", "start", "appliance@bank.target"])
    return prim, sec


def wait_status(c: nspawn.Container, unit: str, pattern: str, timeout: float = 30.0) -> str:
    """Poll the unit's STATUS= text until it matches `pattern` (a regex)."""
    deadline = time.monotonic() + timeout
    while True:
        text = c.show(unit, "StatusText")["StatusText"]
        if re.search(pattern, text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{c.name}: {unit} status never matched {pattern!r}: {text!r}")
        time.sleep(0.1)


class TestPair:
    def test_primary_and_secondary_in_two_containers_replicate(self, pair):
        """A primary and a synchronous secondary, each its own systemd, replicate; verify exits 0."""
        prim, sec = pair
        for c, name in ((prim, "bank"), (sec, "bank-dr")):
            assert c.show(f"appliance-agent@{name}.service", "ActiveState")["ActiveState"] == "active"
        out = client(prim, "bank", """
            acc = db.table("accounts")
            for i in range(1, 101):
                with db.transaction() as tx:
                    tx.insert("accounts", {"id": i, "branch": "b%d" % (i % 4), "balance": i})
            print(tx.result["serial"])
        """)
        serial = int(out)
        got = client(sec, "bank-dr", f"""
            db.wait_applied({serial}, timeout=20)
            acc = db.table("accounts")
            print(json.dumps([len(acc), acc.get(100)]))
        """)
        assert json.loads(got) == [100, {"id": 100, "branch": "b0", "balance": 100}]
        r = prim.run([APPLIANCE, "verify", "--config", "/etc/appliance/bank.toml", "--json"], check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["identical"] is True

    def test_status_line_carries_the_lag(self, pair):
        """STATUS= on both sides: 0 serials behind while streaming; with the secondary's agent stopped, the
        primary shows it not connected and serials behind (local-durability commits go on), the secondary
        its agent gone; once it is back, 0 again on both."""
        prim, sec = pair
        punit, sunit = "appliance-controller@bank.service", "appliance-controller@bank-dr.service"
        wait_status(prim, punit, r"^serving bank as primary at version \d+, epoch \d+; lag: bank-dr 0 serials")
        wait_status(sec, sunit, r"^serving bank-dr as secondary .*; 0 serials \([\d.e-]+ s\) behind bank$")
        sec.run(["systemctl", "stop", "appliance-agent@bank-dr.service"])
        client(prim, "bank", """
            for i in range(200, 210):
                with db.transaction(durability="local") as tx:
                    tx.insert("accounts", {"id": i, "branch": "lag", "balance": i})
        """)
        # the line is sent once a second when it changed: one sent while the ten commits ran says fewer
        text = wait_status(prim, punit, r"lag: bank-dr [1-9]\d+ serials \([\d.]+ s, not connected\)")
        assert int(re.search(r"bank-dr (\d+) serials", text).group(1)) >= 10
        wait_status(sec, sunit, r"; agent not attached$")
        sec.run(["systemctl", "start", "appliance-agent@bank-dr.service"])
        wait_status(prim, punit, r"lag: bank-dr 0 serials \([\d.]+ s\)$")
        wait_status(sec, sunit, r"; 0 serials \([\d.e-]+ s\) behind bank$")
        agent = sec.show("appliance-agent@bank-dr.service", "StatusText")["StatusText"]
        assert agent.startswith("listening at 127.0.0.1:") and "for bank" in agent
