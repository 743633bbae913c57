"""Smoke tests of an installed package: run by tests/test_install.py with the
interpreter of a fresh venv that holds nothing but the built wheel (and
pytest), from a directory outside the checkout. They are not collected in the
ordinary run (tests/conftest.py), where the package is the editable install.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import appliance
from appliance import config as config_mod

from procs import APPLIANCE, ROOT


def run(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*APPLIANCE, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


class TestInstalledPackage:
    def test_imported_from_the_installation_not_the_checkout(self):
        """Every module of the package, the C helpers included, comes from site-packages."""
        import appliance._native
        import appliance.cli.__main__
        import appliance.controller.service
        import appliance.replication.relay
        for mod in (appliance, appliance._native, appliance.cli.__main__, appliance.controller.service,
                    appliance.replication.relay):
            path = Path(mod.__file__).resolve()
            assert ROOT not in path.parents, f"{mod.__name__} imported from the checkout: {path}"
            assert "site-packages" in path.parts, path
        assert Path(APPLIANCE[0]).parent == Path(sys.executable).parent, APPLIANCE
        assert appliance._native.lib.apl_format_number() != 0

    def test_version(self, tmp_path):
        """`appliance --version` prints the package's version."""
        r = run("--version", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert appliance.__version__ in r.stdout

    def test_every_subcommand_starts(self, tmp_path):
        """Each subcommand of the installed command imports what it needs (its --help runs)."""
        from appliance.cli.__main__ import main
        assert len(main.commands) >= 9
        for name in main.commands:
            r = run(name, "--help", cwd=tmp_path)
            assert r.returncode == 0, f"appliance {name} --help: {r.stderr}"
            assert "Usage:" in r.stdout

    def test_shipped_files_are_reachable(self, tmp_path):
        """`appliance files` names the example configs and systemd units inside the installation,
        and every example config is one the installed package accepts."""
        r = run("files", "--json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        found = {k: [Path(p) for p in v] for k, v in json.loads(r.stdout).items()}
        names = {k: {p.name for p in v} for k, v in found.items()}
        assert {"bank.toml", "primary.toml", "secondary.toml"} <= names["config"]
        assert {"appliance-controller@.service", "appliance-agent@.service"} <= names["systemd"]
        for paths in found.values():
            for p in paths:
                assert p.is_file() and ROOT not in p.resolve().parents, p
        cfg = config_mod.load(next(p for p in found["config"] if p.name == "bank.toml"))
        assert "accounts" in cfg.tables

    def test_pair_replicates_and_verifies(self, make_cluster):
        """Installed controllers and agents: a client writes on the primary, reads there and on the
        synchronous secondary, and `appliance verify` finds the two identical."""
        c = make_cluster(secondaries=(("sync", ""),)).start()
        db = c.primary.app.connect()
        accounts = db.table("accounts")
        for i in range(1, 201):
            accounts[i] = {"branch": f"b{i % 7}", "balance": i * 10}
        with db.transaction(program="transfer", input={"src": 1, "dst": 2}) as tx:
            a = tx.get("accounts", 1, for_update=True)
            tx.update("accounts", 1, {"balance": a["balance"] - 5})
        assert accounts.get(1) == {"id": 1, "branch": "b1", "balance": 5}
        assert len(accounts.find("branch", "b3")) == len([i for i in range(1, 201) if i % 7 == 3])
        sdb = c.secondaries[0].app.connect()
        sdb.wait_applied(tx.result["serial"], timeout=10)
        assert sdb.table("accounts").get(1) == {"id": 1, "branch": "b1", "balance": 5}
        assert len(sdb.table("accounts")) == 200
        rc, res = c.verify()
        assert rc == 0, res
        assert res["identical"] is True

    def test_demo_runs_to_completion(self, tmp_path):
        """`appliance demo` (the main job) from a directory outside the checkout."""
        r = run("demo", "--accounts", "200", cwd=tmp_path, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "identical" in r.stdout and "segments removed" in r.stdout
