"""Load and validate an appliance's TOML configuration into frozen objects.

A bad configuration is refused with :class:`~appliance.errors.ConfigError`
naming the file, the key (dotted path) and what is wrong, e.g.::

    config/bank.toml: tables.accounts.fields.balance: unknown type 'integr'
    (expected one of int, str, bytes, float, bool)

Every key is checked; unknown keys are errors (typos must not be silently
ignored). Sizes accept integers (bytes) or strings with a unit: "64MiB",
"1GiB", "512KiB". Relative paths are relative to the config file's folder.
The commented examples in config/ document every key.
"""
from __future__ import annotations

import fnmatch
import grp
import hashlib
import json
import os
import pwd
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ._native import lib
from ._os import files as layout
from .errors import ConfigError, exit_status

__all__ = ["Config", "TableConfig", "FieldConfig", "DurabilityConfig", "load", "FIELD_TYPES", "parse_size",
           "parse_duration", "layout_differences", "RELOADABLE", "changed_keys", "reload_plan", "reload_logged"]

FIELD_TYPES = ("int", "str", "bytes", "float", "bool")
KEY_TYPES = ("int", "str", "bytes")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,39}$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,39}$")
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB|K|M|G|T)?\s*$", re.I)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|sec|min|m|h)?\s*$", re.I)
_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_UNITS = {"b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "m": 1 << 20, "mib": 1 << 20,
          "mb": 1000 ** 2, "g": 1 << 30, "gib": 1 << 30, "gb": 1000 ** 3, "t": 1 << 40,
          "tib": 1 << 40, "tb": 1000 ** 4}


def parse_size(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("a size must be a number of bytes or a string like '64MiB'")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        m = _SIZE.match(v)
        if m:
            return int(m.group(1)) * _UNITS[(m.group(2) or "b").lower()]
    raise ValueError(f"{v!r} is not a size (use bytes, or a string like '64MiB')")


def parse_duration(v: Any) -> float:
    """Seconds from a number (seconds) or a string with a unit: "250us",
    "10ms", "2s", "5min", "1h"."""
    if isinstance(v, bool):
        raise ValueError("a duration must be a number of seconds or a string like '10ms' or '5min'")
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        m = _DURATION.match(v)
        if m:
            return float(m.group(1)) * _SECONDS[(m.group(2) or "s").lower()]
    raise ValueError(f"{v!r} is not a duration (use seconds, or a string like '10ms', '2s', '5min', '1h')")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class FieldConfig(_Strict):
    type: Literal["int", "str", "bytes", "float", "bool"]
    default: Any = None
    nullable: bool = False

    @model_validator(mode="after")
    def _default_matches(self):
        if self.default is not None:
            ok = {"int": lambda x: type(x) is int, "str": lambda x: isinstance(x, str),
                  "bytes": lambda x: isinstance(x, (bytes, str)), "float": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
                  "bool": lambda x: isinstance(x, bool)}[self.type](self.default)
            if not ok:
                raise ValueError(f"default {self.default!r} is not of type {self.type}")
        return self

    @property
    def required(self) -> bool:
        return self.default is None and not self.nullable


class TableConfig(_Strict):
    primary_key: str
    alternate_keys: tuple[str, ...] = ()
    fields: dict[str, FieldConfig]

    @field_validator("fields", mode="before")
    @classmethod
    def _fields(cls, v):
        if not isinstance(v, dict) or not v:
            raise ValueError("a table needs at least one field: fields = { id = \"int\", ... }")
        out = {}
        for name, spec in v.items():
            if not _IDENT.match(str(name)):
                raise ValueError(f"fields.{name}: field name {name!r} must be an identifier (letters, digits, _)")
            if isinstance(spec, str):
                if spec not in FIELD_TYPES:
                    raise ValueError(f"fields.{name}: unknown type {spec!r} (expected one of {', '.join(FIELD_TYPES)})")
                spec = {"type": spec}
            out[name] = spec
        return out

    @model_validator(mode="after")
    def _keys(self):
        if self.primary_key not in self.fields:
            raise ValueError(f"primary_key: {self.primary_key!r} is not one of the fields ({', '.join(self.fields)})")
        pk = self.fields[self.primary_key]
        if pk.type not in KEY_TYPES:
            raise ValueError(f"primary_key: {self.primary_key!r} has type {pk.type}; a key must be {', '.join(KEY_TYPES)}")
        if pk.nullable or pk.default is not None:
            raise ValueError(f"primary_key: {self.primary_key!r} cannot be nullable or have a default")
        seen = set()
        for ak in self.alternate_keys:
            if ak not in self.fields:
                raise ValueError(f"alternate_keys: {ak!r} is not one of the fields ({', '.join(self.fields)})")
            if ak == self.primary_key:
                raise ValueError(f"alternate_keys: {ak!r} is the primary key")
            if self.fields[ak].type not in KEY_TYPES:
                raise ValueError(f"alternate_keys: {ak!r} has type {self.fields[ak].type}; a key must be {', '.join(KEY_TYPES)}")
            if ak in seen:
                raise ValueError(f"alternate_keys: {ak!r} is listed twice")
            seen.add(ak)
        return self


class StorageConfig(_Strict):
    block_size: int = 4096
    segments: int = Field(4, ge=1, le=64)
    segment_size: int = 256 << 20
    max_overflow: int = Field(1, ge=0, le=8)
    log_size: int = 64 << 20
    max_readers: int = Field(512, ge=8, le=1 << 20)
    mode: str = "0640"
    group: str | None = None
    # a secondary with lz4 backup blocks (serve_reads = false): block numbers its
    # location table can hold; at least the primary's (segments x segment_size / block_size)
    max_blocks: int | None = Field(None, ge=16, le=(1 << 32) - 2)
    # map every page of the device segments into the controller at start, in a
    # background thread, so no commit or first copy pays the page's first fault
    prefault: bool = True

    @field_validator("segment_size", "log_size", mode="before")
    @classmethod
    def _size(cls, v):
        return parse_size(v)

    @field_validator("block_size")
    @classmethod
    def _bs(cls, v):
        if v < 1024 or v > 32768 or v & (v - 1):
            raise ValueError(f"block_size {v} must be a power of two from 1024 to 32768")
        return v

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, v):
        if isinstance(v, int) and not isinstance(v, bool):
            v = f"{v:o}"
        if not isinstance(v, str) or not re.fullmatch(r"0?[0-7]{3}", v):
            raise ValueError(f"mode {v!r} must be an octal string like \"0640\"")
        m = int(v, 8)
        if m & 0o007:
            raise ValueError(f"mode {v} gives access to other users; segments must not be world-accessible")
        if not m & 0o600 == 0o600:
            raise ValueError(f"mode {v} must give the owner read and write")
        return v

    @model_validator(mode="after")
    def _geometry(self):
        if self.segment_size < 16 * self.block_size:
            raise ValueError(f"segment_size {self.segment_size} is too small for block_size {self.block_size} (need at least 16 blocks)")
        if self.segment_size // self.block_size >= 1 << 32:
            raise ValueError("segment_size / block_size must be below 2**32 blocks per segment")
        min_log = max(1 << 20, 16 * (self.max_overflow + 2) * self.block_size)
        if self.log_size < min_log or self.log_size % 8:
            raise ValueError(f"log_size must be a multiple of 8 and at least {min_log} bytes")
        return self

    @property
    def mode_bits(self) -> int:
        return int(self.mode, 8)


class ControllerConfig(_Strict):
    socket: str | None = None   # default: /run/appliance/<name>.sock
    lock_timeout: float = Field(5.0, gt=0, le=3600)
    max_frame: int = 64 << 20
    reserve_blocks: int = Field(64, ge=4)
    # seconds an open transaction may go without a request before it is
    # cancelled and its locks released; 0: never
    idle_timeout: float = Field(60.0, ge=0, le=86400)
    # records in one OP_LOAD request (one transaction); the client library
    # splits bigger loads into requests of at most this many
    max_load_records: int = Field(10_000, ge=1, le=1_000_000)

    @field_validator("max_frame", mode="before")
    @classmethod
    def _size(cls, v):
        return parse_size(v)

    @field_validator("max_frame")
    @classmethod
    def _frame(cls, v):
        if v < 64 << 10 or v > 1 << 30:
            raise ValueError("max_frame must be between 64KiB and 1GiB")
        return v


class SecondaryConfig(_Strict):
    """A secondary as the primary's agent sees it."""

    name: str
    address: str
    mode: Literal["sync", "async"] = "async"
    # a synchronous secondary that cannot be reached: commits wait ("block"),
    # or after `degrade_after` seconds go on without it, loudly ("degrade")
    on_unreachable: Literal["block", "degrade"] = "block"
    degrade_after: float = Field(5.0, gt=0, le=3600)
    send_b_logs: bool = True
    delta_updates: bool = True

    @field_validator("address")
    @classmethod
    def _addr(cls, v):
        parse_address(v)
        return v


class ReplicationConfig(_Strict):
    role: Literal["primary", "secondary"]
    # HMAC-SHA256 shared secret, read from this file (not world-readable)
    secret_file: str | None = None
    # mutual TLS (optional): this side's certificate and key, and the CA that
    # signed the peer's certificate
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    heartbeat: float = Field(0.5, gt=0, le=60)
    # primary: the secondaries it streams to (on a secondary: those it serves
    # once it is promoted, `appliance promote`)
    secondaries: tuple[SecondaryConfig, ...] = ()
    sync_quorum: int | Literal["all"] = "all"
    # secondary: where it listens for its primary and which primary it accepts
    # (a name, or several: after a failover any of them at a newer epoch); on
    # a primary: what it is once it rejoins as a secondary (`appliance rejoin`)
    listen: str | None = None
    primary: str | tuple[str, ...] | None = None
    serve_reads: bool = True              # uncompressed blocks that clients read; False: lz4 backup blocks
    history_dir: str | None = None
    history_period: float = Field(86400.0, gt=0)
    history_memory: int = 16 << 20
    history_disk: int = 1 << 30
    history_a_logs: bool = False

    @field_validator("history_memory", "history_disk", mode="before")
    @classmethod
    def _size(cls, v):
        return parse_size(v)

    @model_validator(mode="after")
    def _role(self):
        if self.secret_file is None and self.tls_cert is None:
            raise ValueError("the replication link must be authenticated: set secret_file (HMAC) "
                             "and/or tls_cert, tls_key and tls_ca (mutual TLS)")
        if any(x is not None for x in (self.tls_cert, self.tls_key, self.tls_ca)) and \
                not all(x is not None for x in (self.tls_cert, self.tls_key, self.tls_ca)):
            raise ValueError("TLS needs all of tls_cert, tls_key and tls_ca")
        if self.role == "primary":
            if not self.secondaries:
                raise ValueError("a primary needs at least one [[replication.secondaries]]")
        else:
            if self.listen is None:
                raise ValueError("a secondary needs listen = \"host:port\"")
            if self.primary is None:
                raise ValueError("a secondary needs primary = \"<the primary appliance's name>\"")
        names = [x.name for x in self.secondaries]
        if len(set(names)) != len(names):
            raise ValueError("secondary names must be unique")
        nsync = sum(1 for x in self.secondaries if x.mode == "sync")
        if self.secondaries and isinstance(self.sync_quorum, int) and not 1 <= self.sync_quorum <= max(nsync, 1):
            raise ValueError(f"sync_quorum {self.sync_quorum} must be between 1 and the number of "
                             f"synchronous secondaries ({nsync})")
        if self.listen is not None:
            parse_address(self.listen)
        if self.primary is not None and (not self.primaries or not all(isinstance(p, str) and p
                                                                       for p in self.primaries)):
            raise ValueError("primary must be a name or a list of names")
        return self

    @property
    def primaries(self) -> tuple[str, ...]:
        """The primaries this appliance accepts a stream from as a secondary."""
        if self.primary is None:
            return ()
        return (self.primary,) if isinstance(self.primary, str) else tuple(self.primary)


def parse_address(v: str) -> tuple[str, int]:
    host, sep, port = str(v).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {v!r} must be host:port")
    return host.strip("[]"), int(port)


class MetricsConfig(_Strict):
    """The Prometheus endpoint (controller/metrics.py); absent: no endpoint."""

    # host:port the controller serves /metrics on (HTTP); its agent's figures
    # are among them, so one endpoint per appliance
    listen: str

    @field_validator("listen")
    @classmethod
    def _addr(cls, v):
        parse_address(v)
        return v


class DurabilityConfig(_Strict):
    """[durability]: the change log in checksummed files and checkpoints of
    every block in `dir` (appliance/durability/). Absent: memory only."""

    dir: str
    # "commit": a commit is answered once its log is on disk (fdatasync; one
    # for every commit of a group); "interval": written at once, forced at
    # most every sync_interval; "off": written, never forced
    log_sync: Literal["commit", "interval", "off"] = "commit"
    sync_interval: float = 0.01
    # a checkpoint when this much time passed ("5min") or this much log was
    # written ("1GiB") since the last one; "off": only `appliance checkpoint`
    checkpoint_every: str | int | float = "5min"
    keep_checkpoints: int = Field(2, ge=1, le=100)
    # a new log file once the current one holds this much
    log_file_size: int = 64 << 20

    @field_validator("sync_interval", mode="before")
    @classmethod
    def _interval(cls, v):
        s = parse_duration(v)
        if not 0 < s <= 60:
            raise ValueError(f"sync_interval {v!r} must be more than 0 and at most 60 s")
        return s

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _every(cls, v):
        _checkpoint_every(v)
        return v

    @field_validator("log_file_size", mode="before")
    @classmethod
    def _file_size(cls, v):
        n = parse_size(v)
        if not 1 << 20 <= n <= 1 << 32:
            raise ValueError(f"log_file_size {v!r} must be between 1MiB and 4GiB")
        return n

    @field_validator("dir")
    @classmethod
    def _dir(cls, v):
        if not v.strip():
            raise ValueError("dir must name a directory")
        return v

    @property
    def checkpoint_seconds(self) -> float | None:
        """checkpoint_every as a time (None: not a time)."""
        kind, n = _checkpoint_every(self.checkpoint_every)
        return n if kind == "time" else None

    @property
    def checkpoint_bytes(self) -> int | None:
        """checkpoint_every as a volume of log (None: not a volume)."""
        kind, n = _checkpoint_every(self.checkpoint_every)
        return int(n) if kind == "bytes" else None


def _checkpoint_every(v) -> tuple[str, float]:
    """("time", seconds), ("bytes", n) or ("off", 0) for durability.checkpoint_every."""
    if isinstance(v, str) and v.strip().lower() in ("off", "never", "0"):
        return "off", 0
    m = _SIZE.match(v) if isinstance(v, str) else None
    if m and m.group(2) and m.group(2).lower().endswith("b"):   # "1GiB", "500MB"; "5m" is five minutes
        n = parse_size(v)
        if n < 1 << 20:
            raise ValueError(f"checkpoint_every {v!r}: a volume of log must be at least 1MiB")
        return "bytes", n
    try:
        s = parse_duration(v)
    except ValueError:
        raise ValueError(f"checkpoint_every {v!r} must be a time ('5min', '30s'), a volume of log "
                         "('1GiB', '256MiB') or 'off'") from None
    if s == 0:
        return "off", 0
    if s < 1:
        raise ValueError(f"checkpoint_every {v!r}: at least 1 s between checkpoints")
    return "time", s


class AccessConfig(_Strict):
    users: tuple[str | int, ...] = ()
    groups: tuple[str | int, ...] = ()


class Config(_Strict):
    name: str
    storage: StorageConfig = StorageConfig()
    controller: ControllerConfig = ControllerConfig()
    access: AccessConfig = AccessConfig()
    replication: ReplicationConfig | None = None
    metrics: MetricsConfig | None = None
    durability: DurabilityConfig | None = None
    tables: dict[str, TableConfig]
    path: Path = Path("<memory>")

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if not _NAME.match(v):
            raise ValueError(f"name {v!r} must start with a letter and hold only letters, digits, '_' or '-' (at most 40)")
        return v

    @field_validator("tables", mode="before")
    @classmethod
    def _tables(cls, v):
        if not isinstance(v, dict) or not v:
            raise ValueError("at least one table is required: [tables.<name>]")
        for name in v:
            if not _IDENT.match(str(name)):
                raise ValueError(f"table name {name!r} must be an identifier (letters, digits, _)")
        return v

    @model_validator(mode="after")
    def _files(self):
        nfiles = sum(1 + len(t.alternate_keys) for t in self.tables.values())
        if nfiles > 256:
            raise ValueError(f"{nfiles} tables and alternate keys; at most 256")
        return self

    # -- derived facts ---------------------------------------------------------

    @property
    def socket_path(self) -> Path:
        if self.controller.socket is None:
            return layout.RUN_DIR / f"{self.name}.sock"
        p = Path(self.controller.socket)
        return p if p.is_absolute() else (self.path.parent / p)

    def resolve(self, p: str | None) -> Path | None:
        """A path from the config, relative to the config file's folder."""
        if p is None:
            return None
        q = Path(p)
        return q if q.is_absolute() else (self.path.parent / q)

    @property
    def durability_dir(self) -> Path | None:
        """[durability] dir, resolved; None when the appliance is memory only."""
        return self.resolve(self.durability.dir) if self.durability else None

    @property
    def role(self) -> str:
        return self.replication.role if self.replication else "standalone"

    @property
    def compressed(self) -> bool:
        """A secondary that keeps lz4 backup blocks and serves no reads."""
        return self.role == "secondary" and not self.replication.serve_reads

    def secret(self) -> bytes | None:
        r = self.replication
        if r is None or r.secret_file is None:
            return None
        path = self.resolve(r.secret_file)
        try:
            st = path.stat()
            data = path.read_bytes().strip()
        except OSError as exc:
            raise self._file_error("replication.secret_file", path, exc,
                                   "the same secret on every peer, at least 16 bytes (`appliance install` "
                                   "makes one), mode 0640, group appliance") from None
        if st.st_mode & 0o007:
            raise ConfigError(f"{self.path}: replication.secret_file: {path} is readable by others; "
                              "chmod o-rwx it", file=str(self.path), key="replication.secret_file",
                              problem="world-readable secret", cause="permission")
        if len(data) < 16:
            raise ConfigError(f"{self.path}: replication.secret_file: the secret in {path} is shorter "
                              "than 16 bytes", file=str(self.path), key="replication.secret_file",
                              problem="secret too short")
        return data

    def _file_error(self, key: str, path: Path, exc: OSError, what: str) -> ConfigError:
        """A file the config names cannot be read: which key, which file, and the fix."""
        if isinstance(exc, FileNotFoundError):
            return ConfigError(f"{self.path}: {key}: {path} does not exist; put it there ({what}) or "
                               f"point {key} at it", file=str(self.path), key=key, problem="no such file",
                               path=str(path), cause="missing_file")
        if isinstance(exc, PermissionError):
            return ConfigError(f"{self.path}: {key}: {path} cannot be read by this user (uid {os.geteuid()}): "
                               f"{exc.strerror}; give its group (appliance) read access", file=str(self.path),
                               key=key, problem=str(exc.strerror), path=str(path), cause="permission")
        return ConfigError(f"{self.path}: {key}: cannot read {path}: {exc.strerror}", file=str(self.path),
                           key=key, problem=str(exc.strerror), path=str(path))

    def check_tls_files(self) -> None:
        """The TLS files of [replication] exist and can be read (the agent,
        at start): ConfigError naming the key, the file and the fix."""
        r = self.replication
        if r is None:
            return
        for key in ("tls_cert", "tls_key", "tls_ca"):
            p = getattr(r, key)
            if p is None:
                continue
            path = self.resolve(p)
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise self._file_error(f"replication.{key}", path, exc,
                                       "PEM files: this appliance's certificate, its key, and the CA "
                                       "that signed its peers' certificates") from None
    def _tables_doc(self) -> dict:
        """What fixes the records of every table: keys, field types, and the
        record format with its field order (cext/apl_rec.h lays fields out in
        schema order, so reordering them changes every stored image)."""
        return {"record_format": lib.APL_REC_FORMAT,
                "tables": {n: {"pk": t.primary_key, "alt": list(t.alternate_keys),
                               "fields": {f: [c.type, c.nullable] for f, c in t.fields.items()},
                               "order": list(t.fields)}
                           for n, t in self.tables.items()}}

    def replication_fingerprint(self) -> int:
        """What primary and secondary must agree on: block size, tables and
        the record format."""
        doc = {"block_size": self.storage.block_size, **self._tables_doc()}
        h = hashlib.blake2b(json.dumps(doc, sort_keys=True).encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") >> 1

    def files(self) -> list[tuple[str, str, str | None]]:
        """(file name, table, alternate-key field or None), in file-id order."""
        out = []
        for tname, t in self.tables.items():
            out.append((tname, tname, None))
        for tname, t in self.tables.items():
            for ak in t.alternate_keys:
                out.append((f"{tname}.{ak}", tname, ak))
        return out

    def schema_hash(self, compressed: bool | None = None) -> int:
        """Fingerprint of everything that fixes the on-memory format
        (`compressed`: of the store in that form, e.g. an lz4 secondary's
        once a promote has decompressed it; by default as configured)."""
        s = self.storage
        doc = {
            "block_size": s.block_size, "segments": s.segments, "segment_size": s.segment_size,
            "max_overflow": s.max_overflow, "log_size": s.log_size, "max_readers": s.max_readers,
            "compressed": self.compressed if compressed is None else compressed, "max_blocks": s.max_blocks,
            **self._tables_doc(),
        }
        h = hashlib.blake2b(json.dumps(doc, sort_keys=True).encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") >> 1

    def layout(self, compressed: bool | None = None) -> dict:
        """What fixes the on-memory format, by configuration key (what
        schema_hash() fingerprints). It is recorded in the meta segment, so a
        configuration refused for a different layout is told which setting
        differs (layout_differences)."""
        s = self.storage
        return {
            "storage": {"block_size": s.block_size, "segments": s.segments, "segment_size": s.segment_size,
                        "max_overflow": s.max_overflow, "log_size": s.log_size, "max_readers": s.max_readers,
                        "max_blocks": s.max_blocks},
            "replication": {"serve_reads": not (self.compressed if compressed is None else compressed)},
            "record_format": lib.APL_REC_FORMAT,
            "tables": {n: {"primary_key": t.primary_key, "alternate_keys": list(t.alternate_keys),
                           "fields": {f: c.type + (", nullable" if c.nullable else "") for f, c in t.fields.items()},
                           "field_order": list(t.fields)}
                       for n, t in self.tables.items()},
        }

    def gid(self) -> int | None:
        g = self.storage.group
        if g is None:
            return None
        try:
            return int(g) if str(g).isdigit() else grp.getgrnam(g).gr_gid
        except KeyError:
            raise ConfigError(f"{self.path}: storage.group: no such group {g!r}", file=str(self.path),
                              key="storage.group", problem=f"no such group {g!r}") from None

    def allowed_uids(self) -> set[int]:
        return {_uid(u, self.path) for u in self.access.users}

    def allowed_gids(self) -> set[int]:
        return {_gid(g, self.path) for g in self.access.groups}


def layout_differences(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """Where two Config.layout() documents differ, one line per setting:
    ``tables.accounts.fields.balance: int in shared memory, str in the config``."""
    out = []
    for key in list(recorded) + [k for k in current if k not in recorded]:
        path = f"{prefix}{key}"
        a, b = recorded.get(key, _ABSENT), current.get(key, _ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            out += layout_differences(a, b, path + ".")
        elif a is _ABSENT:
            out.append(f"{path}: not in shared memory, {_shown(b)} in the config")
        elif b is _ABSENT:
            out.append(f"{path}: {_shown(a)} in shared memory, not in the config")
        elif a != b:
            out.append(f"{path}: {_shown(a)} in shared memory, {_shown(b)} in the config")
    return out


_ABSENT = object()


def _shown(v) -> str:
    if isinstance(v, dict):
        return "present"
    if isinstance(v, list):
        return "[" + ", ".join(map(str, v)) + "]"
    return "unset" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def _uid(u, path) -> int:
    if isinstance(u, int):
        return u
    try:
        return pwd.getpwnam(u).pw_uid
    except KeyError:
        raise ConfigError(f"{path}: access.users: no such user {u!r}", file=str(path),
                          key="access.users", problem=f"no such user {u!r}") from None


def _gid(g, path) -> int:
    if isinstance(g, int):
        return g
    try:
        return grp.getgrnam(g).gr_gid
    except KeyError:
        raise ConfigError(f"{path}: access.groups: no such group {g!r}", file=str(path),
                          key="access.groups", problem=f"no such group {g!r}") from None


_SUBKEY = re.compile(r"^((?:fields|primary_key|alternate_keys)(?:\.[^:\s]+)?): (.*)$", re.S)


def _loc(loc) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-")) or "(top level)"


def from_dict(doc: dict, path: Path | str = "<memory>", *, check_files: bool = True) -> Config:
    """Validate a parsed config. `check_files`: read the secret file too (off
    for `appliance install`, which may be about to make it)."""
    path = Path(path)
    try:
        cfg = Config.model_validate({**doc, "path": path})
    except ValidationError as exc:
        first = exc.errors()[0]
        key = _loc(first["loc"])
        msg = first["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
            # validators name the key below the model they check: "fields.balance: ..."
            sub = _SUBKEY.match(msg)
            if sub:
                head, _, rest = sub.group(1).partition(".")
                if key.endswith("." + head) and rest:  # a field validator already sits at .fields
                    key = f"{key}.{rest}"
                elif not key.endswith("." + head):
                    key = f"{key}.{sub.group(1)}" if key != "(top level)" else sub.group(1)
                msg = sub.group(2)
        if first["type"] == "extra_forbidden":
            msg = "unknown key"
        elif first["type"] == "missing":
            msg = "required key is missing"
        more = len(exc.errors()) - 1
        extra = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise ConfigError(f"{path}: {key}: {msg}{extra}", file=str(path), key=key, problem=msg) from None
    # resolve names and files now, so a bad one fails at start, not later
    cfg.allowed_uids()
    cfg.allowed_gids()
    cfg.gid()
    if check_files:
        cfg.secret()
    _check_durability_dir(cfg)
    return cfg


def _check_durability_dir(cfg: Config) -> None:
    """durability.dir is a directory, or does not exist yet (the controller makes it)."""
    d = cfg.durability_dir
    if d is None:
        return
    if d.exists() and not d.is_dir():
        raise ConfigError(f"{cfg.path}: durability.dir: {d} exists and is not a directory",
                          file=str(cfg.path), key="durability.dir", problem="not a directory")


def load_logged(path: str | os.PathLike, log) -> tuple[Config | None, int]:
    """load() for a process's start: (the config, 0), or for a refused one
    (None, the exit status the process ends with: errors.exit_status, e.g. 78
    for a bad key, 66 for a missing secret file), logged as config_invalid
    with file, key and cause."""
    try:
        return load(path), 0
    except ConfigError as e:
        log.error("config_invalid", error=str(e), file=e.details.get("file"), key=e.details.get("key"),
                  cause=e.details.get("cause"))
        return None, exit_status(e)


def load(path: str | os.PathLike) -> Config:
    """Read and validate a config file; raise ConfigError on any problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file", file=str(path), key=None, problem="no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}", file=str(path), key=None,
                          problem=str(exc.strerror)) from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}", file=str(path), key=None, problem=str(exc)) from None
    return from_dict(doc, path.resolve())


# -- reload (SIGHUP) ---------------------------------------------------------------

#: What each process takes from its config file again on SIGHUP (dotted keys,
#: fnmatch patterns; a secondary's keys are under its name). Every other key
#: that changed needs a restart, and is logged so (config_reload_needs_restart);
#: keys the other process reloads are left to it.
RELOADABLE = {
    "controller": (
        "controller.lock_timeout",             # lock waits that start from then on
        "access.users", "access.groups",        # connections accepted from then on
        "replication.sync_quorum",
        "replication.secondaries.*.mode",
        "replication.secondaries.*.on_unreachable",
        "replication.secondaries.*.degrade_after",
        "durability.checkpoint_every",         # read at each housekeeping round
        "durability.keep_checkpoints",         # applied at the next checkpoint
    ),
    "agent": (
        "replication.heartbeat",
        "replication.secret_file", "replication.tls_cert", "replication.tls_key", "replication.tls_ca",
        "replication.secondaries.*.address",    # links made from then on
        "replication.secondaries.*.mode",
        "replication.secondaries.*.send_b_logs",
        "replication.secondaries.*.delta_updates",
        "replication.history_period", "replication.history_memory", "replication.history_disk",
        "replication.history_a_logs",
    ),
}


def _tree(cfg: Config) -> dict:
    """The config as nested dicts, secondaries keyed by name."""
    d = cfg.model_dump(exclude={"path"})
    if d.get("replication"):
        d["replication"]["secondaries"] = {x["name"]: x for x in d["replication"]["secondaries"]}
    return d


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ; a section or secondary present on one
    side only is one key (``replication.secondaries.<name>``)."""
    out: list[str] = []

    def diff(a, b, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                key = f"{prefix}.{k}" if prefix else str(k)
                if k not in a or k not in b:
                    out.append(key)
                else:
                    diff(a[k], b[k], key)
        elif a != b:
            out.append(prefix)
    diff(_tree(old), _tree(new), "")
    return out


def _reloadable(key: str, process: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pat) for pat in RELOADABLE[process])


def reload_plan(old: Config, new: Config, process: str) -> tuple[list[str], list[str]]:
    """(keys `process` applies now, keys that need a restart) for a reload
    from `old` (running) to `new` (the file)."""
    other = "agent" if process == "controller" else "controller"
    apply, restart = [], []
    for key in changed_keys(old, new):
        if _reloadable(key, process):
            apply.append(key)
        elif not _reloadable(key, other):
            restart.append(key)
    return apply, restart


def _merged(old: Config, new: Config, keys: list[str]) -> Config:
    """`old` with the values of `keys` (as changed_keys names them) from `new`."""
    tree, src = _tree(old), _tree(new)
    for key in keys:
        *path, last = key.split(".")
        dst, frm = tree, src
        for part in path:
            dst, frm = dst[part], frm[part]
        dst[last] = frm[last]
    if tree.get("replication"):
        tree["replication"]["secondaries"] = tuple(tree["replication"]["secondaries"].values())
    return Config.model_validate({**tree, "path": old.path})


def reload_logged(running: Config, process: str, log, apply, report: dict | None = None) -> Config | None:
    """SIGHUP: read `running`'s file again and call `apply(cfg)` with the
    config to run with (`running` with what `process` can take from the
    file); returns that config. None when the file or `apply` refuses it
    (config_reload_failed; the process goes on as it was). Keys that need a
    restart are logged (config_reload_needs_restart), what was applied too
    (config_reloaded). `report`, when given, is filled with the same: file,
    applied, needs_restart, and error and key when it was refused."""
    out = report if report is not None else {}
    out.update(file=str(running.path), applied=[], needs_restart=[], error=None, key=None)

    def failed(error: str, key: str | None) -> None:
        log.error("config_reload_failed", error=error, file=str(running.path), key=key)
        out.update(error=error, key=key)

    try:
        new = load(running.path)
    except ConfigError as e:
        failed(str(e), e.details.get("key"))
        return None
    keys, restart = reload_plan(running, new, process)
    out["needs_restart"] = restart
    if restart:
        log.warning("config_reload_needs_restart", keys=restart, file=str(running.path))
    try:
        merged = _merged(running, new, keys)
    except ValidationError as exc:   # the values taken do not fit with the ones kept
        failed(f"{running.path}: {exc.errors()[0]['msg']} (with the keys that need a restart "
               f"unchanged: {', '.join(restart)})", _loc(exc.errors()[0]["loc"]))
        return None
    try:
        apply(merged)
    except (OSError, ConfigError) as exc:   # a TLS or secret file that cannot be used
        failed(f"{running.path}: {exc}", exc.details.get("key") if isinstance(exc, ConfigError) else None)
        return None
    out["applied"] = keys
    log.info("config_reloaded", applied=keys, file=str(running.path))
    return merged
