"""Starts that are refused: each with the file, the key and the fix, an exit
status of its own (errors.START_CAUSES, the ones systemd shows), and nothing
made — no segment of the appliance, no process left serving.

A bad config (78), another controller or socket (69), /dev/shm too small
(73) and foreign segments (78) are covered in test_cli, test_limits and
test_faults; these are the rest of the service's start-up: a metrics port or
a replication listen port in use, a missing secret or certificate, a bad
environment variable, a user logind would remove the segments of.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest

from appliance import errors
from procs import APPLIANCE, RUN_DIR, die_with_parent
from store_helpers import linked_segments, unique_name

pytestmark = pytest.mark.slow


def start(*argv: str, env: dict | None = None, timeout: float = 60) -> tuple[int, list[dict], str]:
    """Run `appliance <argv>` to its end: (exit status, its JSON log events, its output)."""
    r = subprocess.run([*APPLIANCE, *argv], capture_output=True, text=True, cwd=RUN_DIR, timeout=timeout,
                       env={**os.environ, "APPLIANCE_LOG_JSON": "1", **(env or {})},
                       preexec_fn=die_with_parent)
    events = []
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return r.returncode, events, r.stdout + r.stderr


def refusal(events: list[dict], name: str) -> dict:
    hits = [e for e in events if e.get("event") == name]
    assert hits, events
    return hits[-1]


@pytest.fixture
def held_port():
    """A TCP port on 127.0.0.1 another process listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    yield s.getsockname()[1]
    s.close()


class TestController:
    def test_metrics_port_in_use(self, make_appliance, held_port):
        """metrics.listen on a port in use: exit 69 naming the file, the key and the fix; no segment is made."""
        app = make_appliance(extra=f'[metrics]\nlisten = "127.0.0.1:{held_port}"\n')
        status, events, _ = start("controller", "--config", str(app.config))
        assert status == errors.EXIT_BUSY == 69
        e = refusal(events, "controller_refused_to_start")
        assert e["key"] == "metrics.listen" and e["cause"] == "address_in_use"
        assert str(app.config) in e["error"] and f"127.0.0.1:{held_port}" in e["error"]
        assert "give metrics.listen another port" in e["error"]
        assert not [s for s in linked_segments([app.name]) if not s.endswith(".lock")]

    def test_missing_secret_file(self, tmp_path):
        """A secret_file that does not exist: exit 66 (EX_NOINPUT) naming the file, the key and how to make it."""
        missing = tmp_path / "nowhere" / "bank.secret"
        name = unique_name()
        cfg = tmp_path / "primary.toml"
        cfg.write_text(f'name = "{name}"\n[replication]\nrole = "primary"\nsecret_file = "{missing}"\n'
                       '[[replication.secondaries]]\nname = "dr"\naddress = "127.0.0.1:1"\n'
                       '[tables.t]\nprimary_key = "id"\nfields = { id = "int" }\n')
        status, events, _ = start("controller", "--config", str(cfg))
        assert status == errors.EXIT_NOINPUT == 66
        e = refusal(events, "config_invalid")
        assert e["key"] == "replication.secret_file" and e["cause"] == "missing_file" and e["file"] == str(cfg)
        assert str(missing) in e["error"] and "appliance install" in e["error"]
        assert linked_segments([name]) == []

    @pytest.mark.parametrize("process", ["controller", "agent"])
    @pytest.mark.parametrize("var, value", [("APPLIANCE_LOG_LEVEL", "verbose"), ("APPLIANCE_LOG_JSON", "maybe")])
    def test_bad_environment_variable(self, make_appliance, process, var, value):
        """A bad APPLIANCE_LOG_* (a unit's Environment=): exit 64 naming the variable and the fix, logged, no traceback."""
        app = make_appliance()
        status, events, out = start(process, "--config", str(app.config), env={var: value})
        assert status == errors.EXIT_ENVIRONMENT == 64, out
        e = refusal(events, f"{process}_refused_to_start")
        assert e["key"] == var and e["cause"] == "environment" and repr(value) in e["error"]
        assert "Environment=" in e["error"] and "Traceback" not in out
        assert linked_segments([app.name]) == []

    def test_user_logind_would_remove_the_segments_of(self, make_appliance):
        """Under systemd ($INVOCATION_ID) as a non-system user: exit 67 (EX_NOUSER) saying why and the fix."""
        import sys
        from fault_helpers import NOBODY
        app = make_appliance()
        if not 999 < NOBODY.pw_uid:
            pytest.skip("nobody is a system user here")
        # the interpreter and the package load as root (nobody may not read them here), then the
        # process becomes nobody and runs the controller's entry point
        code = ("import os, sys, appliance.controller, appliance._os.environment, appliance.config, structlog\n"
                f"os.setgid({NOBODY.pw_gid}); os.setuid({NOBODY.pw_uid})\n"
                "sys.exit(appliance.controller.run(sys.argv[1]))\n")
        r = subprocess.run([sys.executable, "-c", code, str(app.config)], capture_output=True, text=True,
                           cwd=RUN_DIR, timeout=60, preexec_fn=die_with_parent,
                           env={**os.environ, "APPLIANCE_LOG_JSON": "1",
                                "INVOCATION_ID": "0123456789abcdef0123456789abcdef"})
        assert r.returncode == errors.EXIT_NOUSER == 67, r.stdout + r.stderr
        e = refusal([json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")], "controller_refused_to_start")
        assert e["cause"] == "user" and "RemoveIPC" in e["error"] and "User=appliance" in e["error"]
        assert linked_segments([app.name]) == []


class TestAgent:
    def test_missing_certificate(self, make_appliance, tmp_path):
        """tls_cert names a file that does not exist: exit 66 at once (before waiting for a controller), naming it."""
        secret = tmp_path / "secret"
        secret.write_text("s" * 32)
        secret.chmod(0o600)
        missing = tmp_path / "certs" / "bank.pem"
        app = make_appliance(extra=f'[replication]\nrole = "primary"\nsecret_file = "{secret}"\n'
                                   f'tls_cert = "{missing}"\ntls_key = "{tmp_path}/certs/bank.key"\n'
                                   f'tls_ca = "{tmp_path}/certs/ca.pem"\n'
                                   '[[replication.secondaries]]\nname = "dr"\naddress = "127.0.0.1:1"\n')
        status, events, _ = start("agent", "--config", str(app.config))
        assert status == errors.EXIT_NOINPUT == 66
        e = refusal(events, "agent_refused_to_start")
        assert e["key"] == "replication.tls_cert" and e["cause"] == "missing_file"
        assert str(missing) in e["error"] and str(app.config) in e["error"] and "PEM" in e["error"]

    def test_listen_port_in_use(self, make_cluster):
        """A secondary's replication.listen on a port in use: its agent exits 69 naming the key; its controller serves on."""
        c = make_cluster(secondaries=(("async", ""),))
        sec = c.secondaries[0]
        sec.app.start()
        holder = socket.create_server(("127.0.0.1", c.ports[0]))
        try:
            status, events, _ = start("agent", "--config", str(sec.app.config))
        finally:
            holder.close()
        assert status == errors.EXIT_BUSY == 69
        e = refusal(events, "agent_failed")
        assert e["key"] == "replication.listen" and e["cause"] == "address_in_use"
        assert f"127.0.0.1:{c.ports[0]}" in e["error"]
        assert sec.app.controller.proc.poll() is None
