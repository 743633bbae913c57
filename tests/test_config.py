"""appliance.config: every bad configuration is refused with a ConfigError
that starts with the file path and names the key; good ones load."""
from __future__ import annotations

from pathlib import Path

import pytest
import structlog

from appliance import config, errors
from appliance.config import Config, load, parse_size

ROOT = Path(__file__).resolve().parent.parent

TABLE = """
[tables.t]
primary_key = "{pk}"
alternate_keys = {alt}
fields = {fields}
"""
FIELDS = '{ id = "int", name = "str", score = "float" }'


def toml(*, top: str = "", name: str = "cfgtest", storage: str = "", controller: str = "",
         socket: str = 'socket = "ctl.sock"', access: str = "", tables: str | None = None,
         pk: str = "id", alt: str = '["name"]', fields: str = FIELDS) -> str:
    """A config text: valid unless a part is replaced by something bad."""
    if tables is None:
        tables = TABLE.format(pk=pk, alt=alt, fields=fields)
    return f"""{top}
name = "{name}"
[storage]
{storage}
[controller]
{socket}
{controller}
{access}
{tables}
"""


def write(tmp_path: Path, text: str | bytes, filename: str = "c.toml") -> Path:
    path = tmp_path.resolve() / filename
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


#: (id, config text, the key the error must name, a fragment of the problem)
BAD = [
    ("unknown-top-level-key", toml(top="bogus = 1"), "bogus", "unknown key"),
    ("unknown-storage-key", toml(storage="blok_size = 4096"), "storage.blok_size", "unknown key"),
    ("unknown-controller-key", toml(controller="lock_timout = 3"), "controller.lock_timout", "unknown key"),
    ("unknown-table-key", toml(tables=TABLE.format(pk="id", alt="[]", fields=FIELDS) + "colour = 1\n"),
     "tables.t.colour", "unknown key"),
    ("unknown-field-spec-key", toml(fields='{ id = "int", name = { type = "str", nulable = true } }', alt="[]"),
     "tables.t.fields.name.nulable", "unknown key"),
    ("unknown-access-key", toml(access="[access]\nuser = []"), "access.user", "unknown key"),
    ("missing-tables", toml(tables=""), "tables", "required key is missing"),
    ("missing-primary-key", toml(tables='[tables.t]\nfields = { id = "int" }'), "tables.t.primary_key",
     "required key is missing"),
    ("segments-not-int", toml(storage='segments = "four"'), "storage.segments", "integer"),
    ("segments-zero", toml(storage="segments = 0"), "storage.segments", "greater than or equal to 1"),
    ("lock-timeout-not-number", toml(controller='lock_timeout = "soon"'), "controller.lock_timeout", "number"),
    ("lock-timeout-zero", toml(controller="lock_timeout = 0"), "controller.lock_timeout", "greater than 0"),
    ("max-readers-float", toml(storage="max_readers = 12.5"), "storage.max_readers", "integer"),
    ("name-not-string", toml().replace('name = "cfgtest"', "name = 5"), "name", "string"),
    ("bad-appliance-name", toml(name="1bank"), "name", "must start with a letter"),
    ("block-size-not-power-of-two", toml(storage="block_size = 3000"), "storage.block_size", "power of two"),
    ("block-size-too-small", toml(storage="block_size = 512"), "storage.block_size", "power of two"),
    ("block-size-too-large", toml(storage="block_size = 65536"), "storage.block_size", "from 1024 to 32768"),
    ("segment-size-too-small", toml(storage='segment_size = "32KiB"'), "storage", "segment_size 32768 is too small"),
    ("log-size-too-small", toml(storage="log_size = 1024"), "storage", "log_size"),
    ("world-readable-mode", toml(storage='mode = "0644"'), "storage.mode", "world-accessible"),
    ("world-readable-mode-int", toml(storage="mode = 0o604"), "storage.mode", "world-accessible"),
    ("owner-cannot-write", toml(storage='mode = "0440"'), "storage.mode", "owner read and write"),
    ("mode-not-octal", toml(storage='mode = "rw-r-----"'), "storage.mode", "octal"),
    ("size-with-unknown-unit", toml(storage='segment_size = "64 megs"'), "storage.segment_size", "not a size"),
    ("negative-size", toml(storage='log_size = "-1MiB"'), "storage.log_size", "not a size"),
    ("bool-size", toml(storage="segment_size = true"), "storage.segment_size", "a size must be"),
    ("frame-size-words", toml(controller='max_frame = "lots"'), "controller.max_frame", "not a size"),
    ("frame-size-too-small", toml(controller='max_frame = "1KiB"'), "controller.max_frame", "between 64KiB"),
    ("primary-key-not-a-field", toml(pk="nope"), "tables.t.primary_key", "'nope' is not one of the fields"),
    ("primary-key-float", toml(pk="score", alt="[]"), "tables.t.primary_key", "'score' has type float"),
    ("primary-key-nullable", toml(fields='{ id = { type = "int", nullable = true } }', alt="[]"), "tables.t.primary_key",
     "cannot be nullable"),
    ("alternate-key-not-a-field", toml(alt='["nope"]'), "tables.t.alternate_keys", "'nope' is not one of the fields"),
    ("alternate-key-twice", toml(alt='["name", "name"]'), "tables.t.alternate_keys", "'name' is listed twice"),
    ("alternate-key-float", toml(alt='["score"]'), "tables.t.alternate_keys", "'score' has type float"),
    ("alternate-key-is-primary", toml(alt='["id"]'), "tables.t.alternate_keys", "'id' is the primary key"),
    ("alternate-keys-not-a-list", toml(alt='"name"'), "tables.t.alternate_keys", "tuple"),
    ("unknown-field-type", toml(fields='{ id = "int", name = "str", score = "integr" }'), "tables.t.fields.score",
     "unknown type 'integr'"),
    ("unknown-field-type-long-form", toml(fields='{ id = "int", name = "str", score = { type = "double" } }'),
     "tables.t.fields.score.type", "'float'"),
    ("default-of-wrong-type", toml(fields='{ id = "int", name = "str", n = { type = "int", default = "0" } }'),
     "tables.t.fields.n", "default '0' is not of type int"),
    ("field-name-not-identifier", toml(fields='{ id = "int", name = "str", "bad-name" = "int" }'),
     "tables.t.fields.bad-name", "field name 'bad-name' must be an identifier"),
    ("no-fields", toml(fields="{}", alt="[]"), "tables.t.fields", "at least one field"),
    ("table-name-with-dash", toml(tables='[tables."my-table"]\nprimary_key = "id"\nfields = { id = "int" }'),
     "tables", "table name 'my-table' must be an identifier"),
    ("table-name-starts-with-digit", toml(tables='[tables."1t"]\nprimary_key = "id"\nfields = { id = "int" }'),
     "tables", "table name '1t' must be an identifier"),
    ("unknown-user", toml(access='[access]\nusers = ["no_such_user_zz9"]'), "access.users",
     "no such user 'no_such_user_zz9'"),
    ("unknown-group", toml(access='[access]\ngroups = ["no_such_group_zz9"]'), "access.groups",
     "no such group 'no_such_group_zz9'"),
    ("unknown-storage-group", toml(storage='group = "no_such_group_zz9"'), "storage.group",
     "no such group 'no_such_group_zz9'"),
    ("metrics-listen-not-an-address", toml(access='[metrics]\nlisten = "9464"'), "metrics.listen",
     "must be host:port"),
    ("metrics-listen-port-zero", toml(access='[metrics]\nlisten = "127.0.0.1:0"'), "metrics.listen",
     "must be host:port"),
    ("metrics-without-listen", toml(access='[metrics]\nport = 9464'), "metrics.listen", "required key is missing"),
    ("durability-without-dir", toml(access="[durability]\nlog_sync = \"commit\""), "durability.dir",
     "required key is missing"),
    ("durability-unknown-key", toml(access='[durability]\ndir = "d"\nlog_synk = "commit"'), "durability.log_synk",
     "unknown key"),
    ("durability-bad-log-sync", toml(access='[durability]\ndir = "d"\nlog_sync = "always"'), "durability.log_sync",
     "'commit', 'interval' or 'off'"),
    ("durability-bad-interval", toml(access='[durability]\ndir = "d"\nsync_interval = "soon"'),
     "durability.sync_interval", "not a duration"),
    ("durability-zero-interval", toml(access='[durability]\ndir = "d"\nsync_interval = "0ms"'),
     "durability.sync_interval", "more than 0"),
    ("durability-bad-every", toml(access='[durability]\ndir = "d"\ncheckpoint_every = "often"'),
     "durability.checkpoint_every", "a time ('5min', '30s'), a volume of log"),
    ("durability-tiny-volume", toml(access='[durability]\ndir = "d"\ncheckpoint_every = "10KiB"'),
     "durability.checkpoint_every", "at least 1MiB"),
    ("durability-keep-zero", toml(access='[durability]\ndir = "d"\nkeep_checkpoints = 0'),
     "durability.keep_checkpoints", "greater than or equal to 1"),
    ("durability-file-size", toml(access='[durability]\ndir = "d"\nlog_file_size = "1KiB"'),
     "durability.log_file_size", "between 1MiB and 4GiB"),
]


class TestBadConfigs:
    @pytest.mark.parametrize("text, key, fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
    def test_refused_naming_file_and_key(self, tmp_path, text, key, fragment):
        """A bad config raises ConfigError: 'FILE: KEY: problem', with file, key and problem in details."""
        path = write(tmp_path, text)
        with pytest.raises(errors.ConfigError) as ei:
            load(path)
        e = ei.value
        assert str(e).startswith(f"{path}: {key}: "), str(e)
        assert fragment in str(e)
        assert e.details["file"] == str(path) and e.details["key"] == key
        assert e.details["problem"] and e.details["problem"] in str(e)
        assert e.code == "APL_ECONFIG"

    @pytest.mark.parametrize("text, key", [
        (toml(fields='{ id = "int", name = "str", score = "integr" }'), "tables.t.fields.score"),
        (toml(pk="nope"), "tables.t.primary_key"),
        (toml(alt='["nope"]'), "tables.t.alternate_keys"),
    ], ids=["field-type", "primary-key", "alternate-key"])
    def test_key_problems_name_the_exact_key(self, tmp_path, text, key):
        """The error's key is the exact dotted path of the offending setting."""
        with pytest.raises(errors.ConfigError) as ei:
            load(write(tmp_path, text))
        assert ei.value.details["key"] == key

    def test_missing_file(self, tmp_path):
        """A missing file is a ConfigError starting with its path, with no key."""
        path = tmp_path.resolve() / "nope.toml"
        with pytest.raises(errors.ConfigError) as ei:
            load(path)
        assert str(ei.value) == f"{path}: no such file"
        assert ei.value.details == {"file": str(path), "key": None, "problem": "no such file"}

    def test_unreadable_path(self, tmp_path):
        """A path that cannot be read as a file (a directory) is a ConfigError naming it."""
        with pytest.raises(errors.ConfigError) as ei:
            load(tmp_path)
        assert str(ei.value).startswith(f"{tmp_path}: cannot read")

    @pytest.mark.parametrize("text", ['name = "x\n', "[controller\nsocket = 1", b'name = "\xff"\n'],
                             ids=["unterminated-string", "bad-table-header", "not-utf8"])
    def test_invalid_toml(self, tmp_path, text):
        """Text that is not valid UTF-8 TOML is a ConfigError 'FILE: not valid TOML: ...'."""
        path = write(tmp_path, text)
        with pytest.raises(errors.ConfigError) as ei:
            load(path)
        assert str(ei.value).startswith(f"{path}: not valid TOML: ")
        assert ei.value.details["key"] is None

    def test_several_problems_are_counted(self, tmp_path):
        """When several keys are wrong, the message names the first and counts the others."""
        path = write(tmp_path, toml(storage="blok_size = 1\nsegmnts = 2"))
        with pytest.raises(errors.ConfigError, match=r"\(and 1 more problem\)"):
            load(path)


class TestGoodConfigs:
    def test_durability_dir_that_is_a_file(self, tmp_path):
        """durability.dir naming an existing file is refused with that key."""
        (tmp_path / "d").write_text("not a directory")
        path = write(tmp_path, toml(access='[durability]\ndir = "d"'))
        with pytest.raises(errors.ConfigError) as ei:
            load(path)
        assert ei.value.details["key"] == "durability.dir" and "not a directory" in str(ei.value)

    def test_durability_settings(self, tmp_path):
        """[durability] with its units: a relative dir is the config folder's; times and volumes."""
        cfg = load(write(tmp_path, toml(access='[durability]\ndir = "files"\nlog_sync = "interval"\n'
                                                'sync_interval = "20ms"\ncheckpoint_every = "256MiB"')))
        assert cfg.durability_dir == tmp_path.resolve() / "files"
        d = cfg.durability
        assert d.log_sync == "interval" and d.sync_interval == 0.02 and d.keep_checkpoints == 2
        assert d.checkpoint_bytes == 256 << 20 and d.checkpoint_seconds is None
        cfg = load(write(tmp_path, toml(access='[durability]\ndir = "/x"\ncheckpoint_every = "5min"')))
        assert cfg.durability.checkpoint_seconds == 300 and cfg.durability.log_sync == "commit"
        assert load(write(tmp_path, toml())).durability is None

    def test_socket_defaults_to_the_runtime_directory(self, tmp_path):
        """Without controller.socket (or without [controller]) the socket is /run/appliance/<name>.sock."""
        for text in (toml(socket="lock_timeout = 1.0"), toml(socket="").replace("[controller]", "")):
            cfg = load(write(tmp_path, text))
            assert cfg.socket_path == Path(f"/run/appliance/{cfg.name}.sock")

    def test_shipped_example_loads(self):
        """config/bank.toml, the shipped example, loads with the documented settings."""
        cfg = load(ROOT / "config" / "bank.toml")
        assert isinstance(cfg, Config) and cfg.name == "bank"
        s = cfg.storage
        assert (s.block_size, s.segments, s.segment_size, s.log_size) == (4096, 4, 64 << 20, 16 << 20)
        assert s.mode == "0640" and s.mode_bits == 0o640
        assert cfg.controller.lock_timeout == 5.0
        assert cfg.socket_path == Path("/run/appliance/bank.sock")   # the installed layout's default
        t = cfg.tables["accounts"]
        assert t.primary_key == "id" and t.alternate_keys == ("branch",)
        assert {f: c.type for f, c in t.fields.items()} == {"id": "int", "branch": "str", "balance": "int"}
        assert cfg.files() == [("accounts", "accounts", None), ("accounts.branch", "accounts", "branch")]

    def test_relative_socket_is_relative_to_the_config_file(self, tmp_path, monkeypatch):
        """A relative socket path resolves against the config file's folder, not the working directory."""
        sub = tmp_path.resolve() / "etc"
        sub.mkdir()
        write(sub, toml(socket='socket = "run/ctl.sock"'))
        monkeypatch.chdir(tmp_path)
        cfg = load("etc/c.toml")
        assert cfg.socket_path == sub / "run" / "ctl.sock" and cfg.socket_path.is_absolute()
        monkeypatch.chdir("/")
        assert cfg.socket_path == sub / "run" / "ctl.sock"

    def test_absolute_socket_is_kept(self, tmp_path):
        """An absolute socket path is used as written."""
        cfg = load(write(tmp_path, toml(socket='socket = "/run/x/ctl.sock"')))
        assert cfg.socket_path == Path("/run/x/ctl.sock")

    def test_long_field_forms_and_octal_mode(self, tmp_path):
        """Fields in the long form (default, nullable) and an integer octal mode are accepted."""
        fields = '{ id = "str", n = { type = "int", default = 3 }, note = { type = "str", nullable = true } }'
        cfg = load(write(tmp_path, toml(fields=fields, alt='["n"]', storage="mode = 0o600")))
        f = cfg.tables["t"].fields
        assert f["n"].default == 3 and not f["n"].required and f["note"].nullable and f["id"].required
        assert cfg.storage.mode_bits == 0o600

    @pytest.mark.parametrize("text, size", [
        (1234, 1234), ("512", 512), ("512B", 512), ("4KiB", 4096), ("4 KB", 4000), ("64MiB", 64 << 20),
        ("64mib", 64 << 20), ("2M", 2 << 20), ("1GiB", 1 << 30), (" 1 GB ", 10 ** 9), ("1T", 1 << 40),
    ])
    def test_sizes(self, text, size):
        """Sizes are bytes or strings with binary (KiB, M) or decimal (KB) units, any case."""
        assert parse_size(text) == size

    @pytest.mark.parametrize("text", ["", "MiB", "1.5MiB", "64 megs", "-1", True, 1.5, None])
    def test_bad_sizes(self, text):
        """Anything else is not a size."""
        with pytest.raises(ValueError):
            parse_size(text)


REPLICATION = """
[replication]
role = "primary"
secret_file = "s.secret"
heartbeat = {heartbeat}
[[replication.secondaries]]
name = "b1"
address = "127.0.0.1:7001"
mode = "sync"
{b1}
"""


def primary(tmp_path: Path, *, controller: str = "", storage: str = "", heartbeat: float = 0.5, b1: str = "",
            extra: str = "") -> Config:
    secret = tmp_path / "s.secret"
    secret.write_text("x" * 32)
    secret.chmod(0o600)
    return load(write(tmp_path, toml(controller=controller, storage=storage)
                      + REPLICATION.format(heartbeat=heartbeat, b1=b1) + extra))


class TestReloadPlan:
    """What SIGHUP changes in a running process (config.reload_plan / reload_logged)."""

    def test_each_process_takes_its_own_keys(self, tmp_path):
        """lock_timeout is the controller's to apply, heartbeat the agent's; a storage size needs a
        restart of either."""
        old = primary(tmp_path)
        new = primary(tmp_path, controller="lock_timeout = 1.5", storage="max_readers = 64", heartbeat=0.25)
        assert config.reload_plan(old, new, "controller") == (["controller.lock_timeout"], ["storage.max_readers"])
        assert config.reload_plan(old, new, "agent") == (["replication.heartbeat"], ["storage.max_readers"])

    def test_a_secondary_policy_is_reloadable_a_new_secondary_is_not(self, tmp_path):
        """A secondary's on_unreachable and degrade_after are applied; a secondary added is one
        key that needs a restart (not its fields)."""
        old = primary(tmp_path)
        new = primary(tmp_path, b1='on_unreachable = "degrade"\ndegrade_after = 0.5',
                      extra='[[replication.secondaries]]\nname = "b2"\naddress = "127.0.0.1:7002"\n')
        apply, restart = config.reload_plan(old, new, "controller")
        assert apply == ["replication.secondaries.b1.degrade_after", "replication.secondaries.b1.on_unreachable"]
        assert restart == ["replication.secondaries.b2"]

    def test_reload_logged_keeps_what_needs_a_restart(self, tmp_path):
        """reload_logged gives the running config with the applied keys only, and logs both lists."""
        from structlog.testing import capture_logs
        old = primary(tmp_path)
        primary(tmp_path, controller="lock_timeout = 0.7", storage="max_readers = 64")   # rewrites the file
        taken = []
        with capture_logs() as logs:
            cfg = config.reload_logged(old, "controller", structlog.get_logger(), taken.append)
        assert taken == [cfg]
        assert cfg.controller.lock_timeout == 0.7 and cfg.storage.max_readers == old.storage.max_readers
        assert cfg.replication == old.replication and cfg.path == old.path
        assert [(e["event"], e.get("keys") or e.get("applied")) for e in logs] == [
            ("config_reload_needs_restart", ["storage.max_readers"]), ("config_reloaded", ["controller.lock_timeout"])]

    def test_a_bad_file_changes_nothing(self, tmp_path):
        """A config that no longer loads is refused (config_reload_failed, with the file and key)."""
        from structlog.testing import capture_logs
        old = primary(tmp_path)
        write(tmp_path, toml(controller="lock_timeout = -1"))
        with capture_logs() as logs:
            assert config.reload_logged(old, "controller", structlog.get_logger(), pytest.fail) is None
        assert logs[0]["event"] == "config_reload_failed" and logs[0]["key"] == "controller.lock_timeout"

    def test_a_setting_the_process_cannot_use_changes_nothing(self, tmp_path):
        """When applying fails (a TLS file the agent cannot load), the reload is refused as a whole:
        config_reload_failed, and no config_reloaded."""
        from structlog.testing import capture_logs
        old = primary(tmp_path)
        primary(tmp_path, heartbeat=0.25)

        def refuse(cfg):
            raise FileNotFoundError(2, "No such file or directory", "/etc/appliance/tls.key")
        with capture_logs() as logs:
            assert config.reload_logged(old, "agent", structlog.get_logger(), refuse) is None
        assert [e["event"] for e in logs] == ["config_reload_failed"]
        assert "tls.key" in logs[0]["error"]
