"""The controller process: owns the segments, sole writer, serves clients.

``run(config_path)`` is what ``appliance controller --config FILE`` calls:
config -> logging -> exclusive lock -> segments (create, re-attach and
recover, or — none there but [durability] files — the cold start from the
files) -> listen -> READY=1 -> event loop until SIGTERM/SIGINT. Stopping
never unlinks the segments: the data lives in them, and the next controller
re-attaches. SIGHUP (``systemctl reload``) reads the config again between
two loop iterations: what config.RELOADABLE lets the controller take is
applied, the rest is logged as needing a restart.
"""
from __future__ import annotations

import fcntl
import gc
import os
import select
import time

from .. import config as config_mod
from .. import errors
from .._os import lifecycle, logs, sdnotify
from ..config import Config

__all__ = ["run", "serve"]

HOUSEKEEPING_S = 1.0


class ControllerLock:
    """One controller per appliance: an flock on the POSIX shm object
    /apl.<name>.lock, named after the appliance (not the socket), so two
    configurations that name the same appliance cannot both serve it."""

    def __init__(self, cfg: Config) -> None:
        import posix_ipc

        self.name = f"/apl.{cfg.name}.lock"
        shm = posix_ipc.SharedMemory(self.name, posix_ipc.O_CREAT, mode=0o600)
        self.fd = shm.fd
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                other = os.pread(self.fd, 32, 0).decode().strip("\0\n ") or "?"
            except OSError:
                other = "?"
            os.close(self.fd)
            raise errors.BusyError(
                f"appliance {cfg.name!r} is already served by controller pid {other}",
                appliance=cfg.name, pid=other) from None
        os.ftruncate(self.fd, 32)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode().ljust(32, b"\0"), 0)

    def release(self) -> None:
        os.close(self.fd)


# Collector thresholds for the serving loop, once start-up is done. Every
# statement allocates a handful of short-lived objects (decoded dicts, Change
# steps, reply lists) that reference counting frees; the cyclic collector only
# adds passes over them. A 10,000-record load request alone decodes into tens
# of thousands of tracked objects (a dict and its values per record), so the
# default gen-0 threshold (700) means dozens of passes per request, each
# walking the survivors too.
# gc.freeze() moves what start-up built (schema, config, modules: tens of
# thousands of objects that live as long as the process) out of every future
# pass; the higher thresholds make passes rare. Cycles still get collected:
# only less often. Measured on a 300,000-record bulk load: +10-13% records/s.
GC_THRESHOLDS = (20_000, 20, 100)


def tune_gc() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def serve(cfg: Config, log, shutdown: lifecycle.Shutdown | None = None) -> int:
    from . import health as health_mod
    from .loop import check_socket_free
    from .metrics import MetricsServer
    from .service import Controller
    from .storage import open_or_create

    t0 = time.monotonic()
    lock = ControllerLock(cfg)
    ctl = metrics = None
    try:
        check_socket_free(cfg)   # before any segment is made for a start that cannot serve
        if cfg.metrics is not None:   # likewise: a port in use refuses the start
            metrics = MetricsServer(cfg, log)
            metrics.start()
        files = None
        if cfg.durability is not None:
            from ..durability.logfiles import LogDir
            files = LogDir(cfg.durability_dir, log, cfg.storage.mode_bits)
        writer, facts, created = open_or_create(cfg, log, files)
        sb = writer.att.sb
        sb.sb_controller_pid = os.getpid()
        sb.sb_state = 1
        sb.sb_opened_ns = time.time_ns()
        ctl = Controller(cfg, writer, log, recovery=facts, created=created, files=files)
        ctl.listen()
        tune_gc()
        ctl.start_prefault()
        if metrics is not None:
            metrics.attach(ctl)
        if shutdown is not None:
            ctl.ep.register(shutdown.fileno(), select.EPOLLIN)
        log.info("controller_started", appliance=cfg.name, created=created, version=sb.sb_version,
                 role=ctl.role.name, epoch=ctl.role.epoch,
                 socket=str(cfg.socket_path), startup_ms=round((time.monotonic() - t0) * 1000, 1),
                 **{f"recovery_{k}": v for k, v in facts.items()})
        health = health_mod.Health(ctl)
        health.ready()
        next_hk = time.monotonic() + HOUSEKEEPING_S
        while not (shutdown and shutdown.requested):
            now = time.monotonic()
            ctl.run_once(max_wait=max(0.0, min(next_hk - now, health.wait_s(now))))
            if shutdown is not None:
                shutdown.drain()
                if shutdown.take_reload():
                    health_mod.reload(ctl)
            now = time.monotonic()
            health.turn(now)   # WATCHDOG=1 from the loop's own turn: a stuck loop stops it
            if now >= next_hk:
                ctl.housekeeping()
                health.housekeeping()
                if metrics is not None:
                    metrics.publish()
                next_hk = time.monotonic() + HOUSEKEEPING_S
        sdnotify.stopping()
        log.info("controller_stopping", appliance=cfg.name,
                 signal=shutdown.signal.name if shutdown and shutdown.signal else None)
        return 0
    finally:
        if metrics is not None:
            metrics.close()
        if ctl is not None:
            ctl.close()
            ctl.att.sb.sb_state = 0
            ctl.writer.close()
        lock.release()


def run(config_path: str, *, log_json: bool | None = None, log_level: str | None = None) -> int:
    """Entry point of ``appliance controller``; returns the exit status
    (errors.exit_status of what refused the start: each cause its own EX_* code)."""
    from .._os import environment
    try:
        log = environment.configure_logs("controller", json=log_json, level=log_level)
        environment.check_user()
    except errors.ApplianceError as e:
        logs.get_logger(process="controller").error("controller_refused_to_start", error=str(e), code=e.code,
                                                    key=e.details.get("key"), cause=e.details.get("cause"))
        return errors.exit_status(e)
    shutdown = lifecycle.Shutdown()
    shutdown.install()   # first: a SIGHUP or SIGTERM while starting is taken once the loop runs
    try:
        cfg, refused = config_mod.load_logged(config_path, log)
        if cfg is None:
            return refused
        log = log.bind(appliance=cfg.name)
        return serve(cfg, log, shutdown)
    except (errors.BusyError, errors.FormatError, errors.AccessDeniedError, errors.MemoryFullError,
            errors.ConfigError, errors.DiskError) as e:
        log.error("controller_refused_to_start", error=str(e), code=e.code, key=e.details.get("key"),
                  cause=e.details.get("cause"))
        return errors.exit_status(e)
    finally:
        shutdown.uninstall()
