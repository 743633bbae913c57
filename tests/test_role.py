"""The appliance's role and epoch: one owner (appliance/controller/role.py), kept in shared memory."""
from __future__ import annotations

import json
import subprocess

import pytest

from appliance import errors
from appliance.config import from_dict
from appliance.controller.role import Role

from procs import APPLIANCE, RUN_DIR
from store_helpers import Store

SECRET = None


def _cfg(role: str | None):
    doc = {"name": "r", "tables": {"t": {"primary_key": "id", "fields": {"id": "int"}}}}
    if role == "secondary":
        doc["replication"] = {"role": "secondary", "secret_file": str(SECRET), "listen": "127.0.0.1:9",
                              "primary": "p"}
    return from_dict(doc)


@pytest.fixture(autouse=True)
def _secret(tmp_path):
    global SECRET
    SECRET = tmp_path / "secret"
    SECRET.write_text("s" * 32)
    SECRET.chmod(0o600)


class _Log:
    def __init__(self):
        self.events = []

    def warning(self, event, **kw):
        self.events.append((event, kw))


class TestRoleInSharedMemory:
    def test_first_start_takes_the_configs_role_and_a_restart_keeps_it(self):
        with Store() as st:
            sb = st.writer.att.sb
            assert sb.sb_role == 0                                   # fresh: no role recorded yet
            role = Role(st.writer, _cfg("secondary"), _Log())
            assert role.name == "secondary" and role.is_secondary and not role.is_primary
            assert sb.sb_role != 0
            log = _Log()
            again = Role(st.writer, _cfg(None), log)                 # the config now says standalone
            assert again.name == "secondary"                         # the shared memory wins
            assert log.events and log.events[0][0] == "role_kept"
            assert log.events[0][1]["config_role"] == "standalone"

    def test_change_sets_role_and_epoch_together_and_tells_the_listeners(self):
        with Store() as st:
            role = Role(st.writer, _cfg("secondary"), _Log())
            seen = []
            role.on_change(lambda old, new: seen.append((old, new)))
            role.change("primary", role.epoch + 1)
            assert seen == [("secondary", "primary")]
            sb = st.writer.att.sb
            assert (role.name, role.epoch, sb.sb_epoch) == ("primary", 2, 2)
            assert Role(st.writer, _cfg("secondary"), _Log()).name == "primary"   # as a restart reads it

    def test_an_older_epoch_or_an_unknown_role_is_refused_and_changes_nothing(self):
        with Store() as st:
            role = Role(st.writer, _cfg(None), _Log())
            role.change("primary", 5)
            with pytest.raises(errors.StaleEpochError):
                role.change("secondary", 4)
            with pytest.raises(errors.WrongTypeError):
                role.change("leader", 6)
            assert (role.name, role.epoch) == ("primary", 5)

    def test_a_secondary_refuses_writes(self):
        with Store() as st:
            role = Role(st.writer, _cfg("secondary"), _Log())
            with pytest.raises(errors.ReadOnlyError, match="is a secondary"):
                role.check_write(_cfg("secondary"))
            role.change("primary", role.epoch + 1)
            role.check_write(_cfg("secondary"))                      # a primary takes writes


class TestRoleOfARunningAppliance:
    def test_status_and_the_systemd_status_line_show_role_and_epoch(self, bank):
        st = json.loads(subprocess.run([*APPLIANCE, "status", "--json", "--config", str(bank.config)],
                                       capture_output=True, text=True, cwd=RUN_DIR, check=True).stdout)
        assert (st["role"], st["epoch"]) == ("standalone", 1)
        started = [e for e in bank.controller.events() if e.get("event") == "controller_started"]
        assert started and started[-1]["role"] == "standalone" and started[-1]["epoch"] == 1

