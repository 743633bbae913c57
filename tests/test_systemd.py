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
import subprocess
import sys
import textwrap
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


class TestPair:
    def test_primary_and_secondary_in_two_containers_replicate(self, boot):
        """A primary and a synchronous secondary, each its own systemd, replicate; verify exits 0."""
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
