"""The replication agent process: ``appliance agent --config FILE``.

On a primary ("backup and recovery control mechanism" 14) it reads the
controller's change log from shared memory and streams it to every
configured secondary (one :class:`~appliance.replication.relay.Relay` each),
and reports their acknowledgements to the controller, which releases
synchronous commits. On a secondary (mechanism 24) it receives the stream,
has its controller apply it to the backup database, keeps the log history
and acknowledges.

It is a separate process from the controller: either can be killed and
restarted without the other losing anything. The agent keeps no state that
matters across a restart — where each secondary stands lives in the
secondaries (what they applied), the change log in the primary's shared
memory, and the history on disk.

One asyncio loop per process: relays, the applier, the controller link and
the periodic report are tasks on it; nothing here is shared across threads.
Signals are loop callbacks too (loop.add_signal_handler): SIGTERM/SIGINT
stop the agent, SIGHUP reloads its config between two steps of those tasks
(config.reload_logged; each task reads the settings it may change —
heartbeat, secret, TLS context, a secondary's address and options — when it
next uses them, so a reload needs no lock).
"""
from __future__ import annotations

import asyncio
import os
import signal
import time

from .. import errors
from .._os import logs, sdnotify
from .._os.lifecycle import cancel_and_wait
from ..config import Config
from ..store.reader import Reader
from ..store.segment import Attachment
from ..wire import messages as m
from . import link
from .applier import Applier
from ..recovery.history import GAP, RingCursor
from ..store.changelog import E_KIND, ENTRY
from .history import History
from .relay import Relay
from .states import RelayState

__all__ = ["run"]


def _run_loop(coro) -> None:
    """Run the agent's loop on uvloop (libuv: about half the cost per wakeup
    of the stdlib loop, and a replicated commit crosses the agents' loops four
    times), or on asyncio's own loop where uvloop is not installed."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


async def _connect_controller(cfg: Config, role: str | None, log) -> link.ControlLink:
    """Attach to the controller as its agent, waiting for it to be up
    (logged once, naming the socket; again when the reason changes).
    `role`: the role the agent runs, refused by a controller whose appliance
    has another one now; None to be told (the first link: the controller
    owns the role, appliance/controller/role.py)."""
    path = str(cfg.socket_path)
    logged = None
    while True:
        ctl = link.ControlLink(path, f"agent:{role or 'starting'}")
        try:
            await ctl.connect(role)
            return ctl
        except (OSError, errors.UnavailableError) as exc:
            ctl.close()
            if type(exc) is not logged:
                logged = type(exc)
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc) or logged.__name__)
                log.warning("controller_unavailable_waiting", socket=path, error=f"controller socket {path}: {why}")
            await asyncio.sleep(0.2)
        except errors.ApplianceError:
            ctl.close()
            raise


class PrimaryAgent:
    def __init__(self, cfg: Config, log, ctl: link.ControlLink) -> None:
        self.cfg = cfg
        self.log = log
        self.ctl = ctl       # the link the agent learnt its role on
        self.secret = cfg.secret()
        self.tls = link.tls_context(cfg, server=False)
        self.relays: list[Relay] = []
        self.head = 0
        self.serial = 0
        self._report_event = asyncio.Event()
        self._history_wake = asyncio.Event()
        self.verify_tasks: set = set()
        rc = cfg.replication
        self.history = History(cfg.resolve(rc.history_dir), period=rc.history_period, memory=rc.history_memory,
                               disk=rc.history_disk, keep_a=rc.history_a_logs, log=log) if rc.history_dir else None

    def reconfigure(self, cfg: Config) -> None:
        """A reloaded config (only config.RELOADABLE's agent keys differ):
        the secret and TLS files are read again for the links made from then
        on; each relay takes its secondary's settings."""
        secret, tls = cfg.secret(), link.tls_context(cfg, server=False)
        self.cfg, self.secret, self.tls = cfg, secret, tls
        _reconfigure_history(self.history, cfg)
        by_name = {s.name: s for s in cfg.replication.secondaries}
        for r in self.relays:
            r.reconfigure(by_name[r.name])

    # -- shared facts for relays ----------------------------------------------------------

    def bounds(self) -> dict:
        from ..store import changelog
        b = changelog.bounds(self.reader)
        self.head, self.serial = max(self.head, b["head"]), max(self.serial, b["serial"])
        return b

    def pin_with_serial(self):
        """Pin the latest version; (pin, version, the log serial it ends at)."""
        sb = self.att.sb
        for _ in range(1000):
            pin = self.reader.pin()
            v = pin.version
            pb = sb.sb_pub[v & 1]
            if pb.pb_version == v:
                serial = pb.pb_serial
                if pb.pb_version == v:
                    return pin, v, serial
            pin.close()
        raise errors.BusyError("could not pin a version with its serial")

    def report_soon(self) -> None:
        self._report_event.set()

    def acked(self, name: str, serial: int) -> None:
        """Pass a secondary's "backup complete" to the controller at once: it
        releases the synchronous commits waiting for it. One-way and sent from
        the relay's reader itself, so an ACK costs no task switch and no reply;
        the periodic report carries the rest of the relay's state."""
        try:
            self.ctl.notify([m.OP_ACKED, name, serial])
        except errors.UnavailableError:
            self.report_soon()   # the watch task reconnects; the report after it carries the serial

    # -- tasks --------------------------------------------------------------------------------

    async def run(self, ready) -> None:
        # two links: WATCH parks on its own, so reports (ACKs) never queue behind it
        self.watch_ctl = await _connect_controller(self.cfg, "primary", self.log)
        info = self.ctl.info
        self.att = Attachment(self.cfg.name, writable=False)
        if self.att.instance != info["instance"]:
            raise errors.UnavailableError("the appliance was re-created while the agent attached; restart")
        self.instance, self.epoch = info["instance"], info["epoch"]
        self.reader = Reader(self.att)
        self.log_size = self.att.sb.sb_log_size
        self.files = link.files_of(self.att)
        self.bounds()
        self.relays = [Relay(self, s) for s in self.cfg.replication.secondaries]
        tasks = [asyncio.create_task(r.run(), name=f"relay:{r.name}") for r in self.relays]
        tasks.append(asyncio.create_task(self._watch(), name="watch"))
        tasks.append(asyncio.create_task(self._report(), name="report"))
        if self.history is not None:
            tasks.append(asyncio.create_task(self._keep_history(), name="history"))
        ready(f"streaming to {', '.join(r.name for r in self.relays)}")
        self.log.info("agent_started", role="primary", secondaries=[r.name for r in self.relays],
                      serial=self.serial)
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if t.exception():
                    raise t.exception()
        finally:
            await cancel_and_wait([*tasks, *self.verify_tasks])
            if self.history is not None:
                self.history.spill()
                self.history.close()

    async def _keep_history(self) -> None:
        """Keep this primary's own log history (history_dir on a primary): its
        change log as it is published, from where the history ends. Between
        chunks the loop serves the relays (they are on the synchronous
        commits' path); closing a part (compressing it) runs in a thread."""
        h = self.history
        cursor = RingCursor(self.reader, h.last_serial + 1, chunk=256 << 10)
        while True:
            self._history_wake.clear()
            for blob in cursor.blobs():
                if _is_gap_marker(blob):
                    continue          # the history notices the gap itself (and logs history_gap)
                h.append(blob, spill=False)
                await asyncio.sleep(0)
            if h.should_spill():
                await asyncio.to_thread(h.spill)
            try:
                await asyncio.wait_for(self._history_wake.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    async def _watch(self) -> None:
        """Long-poll the controller for newly published log entries."""
        while True:
            try:
                b = await self.watch_ctl.call([m.OP_WATCH, self.serial, self.cfg.replication.heartbeat])
            except errors.UnavailableError:
                self.log.warning("controller_link_lost")
                self.ctl.close()
                self.watch_ctl.close()
                self.ctl = await _connect_controller(self.cfg, "primary", self.log)
                self.watch_ctl = await _connect_controller(self.cfg, "primary", self.log)
                if self.ctl.info["instance"] != self.instance:
                    raise errors.UnavailableError("the appliance was re-created; the agent restarts")
                self.report_soon()
                continue
            self.head, self.serial = b["head"], b["serial"]
            for r in self.relays:
                r.wake.set()
            self._history_wake.set()
            # let the relays send the new entries before this task re-arms the
            # watch: the entries are on the synchronous commits' path, the watch is not
            await asyncio.sleep(0)
            for name in b.get("resync", ()) or ():
                for r in self.relays:
                    if r.name == name:
                        r.force_copy = True
                        r.wake.set()
            for vid in b.get("verify", ()) or ():
                t = asyncio.create_task(self._verify(vid))
                self.verify_tasks.add(t)
                t.add_done_callback(self.verify_tasks.discard)

    async def _report(self) -> None:
        """Send the secondaries' whole state to the controller (shown by
        status): soon after a change of state (coalesced: one report in
        flight), and every heartbeat. ACKs go ahead on their own (acked())."""
        while True:
            try:
                await asyncio.wait_for(self._report_event.wait(), self.cfg.replication.heartbeat)
            except asyncio.TimeoutError:
                pass
            self._report_event.clear()
            state = {"secondaries": {r.name: r.report() for r in self.relays}, "pid": os.getpid(),
                     "reported_at": time.time(),
                     "history": self.history.status() if self.history is not None else {"enabled": False}}
            try:
                await self.ctl.call([m.OP_REPL_STATE, state])
            except errors.UnavailableError:
                await asyncio.sleep(0.05)

    async def _verify(self, vid: int) -> None:
        results = {}

        async def one(r: Relay):
            if not r.connected or r.state is not RelayState.STREAMING:
                results[r.name] = {"ok": False, "state": r.state.value, "error": "not streaming"}
                return
            fut = asyncio.get_running_loop().create_future()
            r.verify_waiters[vid] = fut
            r.verify_queue.append(vid)
            r.wake.set()
            try:
                res = await asyncio.wait_for(fut, 60)
                results[r.name] = {"ok": not res["differ"], "differ": res["differ"][:1000],
                                   "checked": res["checked"], "serial": res.get("serial")}
            except (asyncio.TimeoutError, errors.ApplianceError) as exc:
                results[r.name] = {"ok": False, "error": str(exc) or type(exc).__name__}
        await asyncio.gather(*(one(r) for r in self.relays))
        try:
            await self.ctl.call([m.OP_REPL_STATE, {"verify": {str(vid): results}}])
        except errors.UnavailableError:
            pass


class SecondaryAgent:
    def __init__(self, cfg: Config, log, ctl: link.ControlLink) -> None:
        self.cfg = cfg
        self.log = log
        self.ctl = ctl       # the link the agent learnt its role on
        self.applier: Applier | None = None
        self.history: History | None = None

    def reconfigure(self, cfg: Config) -> None:
        """A reloaded config (only config.RELOADABLE's agent keys differ)."""
        if self.applier is not None:
            self.applier.reconfigure(cfg)
        _reconfigure_history(self.history, cfg)
        self.cfg = cfg

    async def run(self, ready) -> None:
        ctl = self.ctl
        att = Attachment(self.cfg.name, writable=False)
        files = link.files_of(att)
        att.close()
        rc = self.cfg.replication   # (a reload may have come while the controller was awaited)
        history = self.history = History(self.cfg.resolve(rc.history_dir), period=rc.history_period,
                                         memory=rc.history_memory, disk=rc.history_disk, keep_a=rc.history_a_logs,
                                         log=self.log)
        applier = self.applier = Applier(self.cfg, ctl, self.log, history, files)
        await applier.start()
        ready(f"listening at {rc.listen} for {rc.primary}")
        self.log.info("agent_started", role="secondary", primary=rc.primary, applied=applier.applied)
        try:
            while True:
                # in batch mode the controller's "end" is heard within 50 ms (OP_REPL_STATE's reply)
                await asyncio.sleep(0.05 if applier.backlog is not None and not applier.catching_up
                                    else self.cfg.replication.heartbeat)
                try:
                    r = await ctl.call([m.OP_REPL_STATE, applier.report()])
                    if isinstance(r, dict) and "batch" in r:
                        applier.on_batch(bool(r["batch"]))
                except errors.UnavailableError:
                    self.log.warning("controller_link_lost")
                    if applier.current is not None:
                        applier.current.close()
                    ctl.close()
                    ctl = await _connect_controller(self.cfg, "secondary", self.log)
                    applier.ctl = ctl
                    applier.applied, applier.source = ctl.info["applied"], ctl.info["source"]
                    applier.copying = bool(ctl.info.get("copying"))
                    applier.need_copy = applier.need_copy or bool(ctl.info.get("needs_copy"))
                if history.should_spill():
                    history.spill()
        finally:
            history.spill()
            history.close()
            applier.server.close()


def _reconfigure_history(h: History | None, cfg: Config) -> None:
    """A reload's history settings (config.RELOADABLE: period, memory, disk, A logs)."""
    if h is not None:
        rc = cfg.replication
        h.period, h.memory, h.disk, h.keep_a = rc.history_period, rc.history_memory, rc.history_disk, \
            rc.history_a_logs


def _is_gap_marker(blob: bytes) -> bool:
    return len(blob) >= ENTRY.size and ENTRY.unpack_from(blob)[E_KIND] == GAP


def run(config_path: str, *, log_json: bool | None = None, log_level: str | None = None) -> int:
    """Entry point of ``appliance agent``; returns the exit status."""
    from .. import config as config_mod

    signal.signal(signal.SIGHUP, signal.SIG_IGN)   # until the loop handles it: a reload must not kill
    logs.configure(json=log_json, level=log_level)
    log = logs.get_logger(process="agent")
    cfg = config_mod.load_logged(config_path, log)
    if cfg is None:
        return errors.EXIT_CONFIG
    if cfg.replication is None:
        log.error("config_invalid", error=f"{cfg.path}: no [replication] section: nothing for an agent to do",
                  key="replication")
        return errors.EXIT_CONFIG
    log = log.bind(appliance=cfg.name)
    agents: dict = {}   # "agent": the running agent, once the controller said which role it serves

    async def start(ready) -> None:
        """Ask the controller which role the appliance has (it owns the role:
        a failover changes it there), then run that side of replication."""
        first = await _connect_controller(cfg, None, log)
        role = first.info["role"]
        if role not in ("primary", "secondary"):
            first.close()
            raise errors.ConfigError(f"{cfg.path}: appliance {cfg.name!r} is {role}: nothing for an agent to do",
                                     file=str(cfg.path), key="replication.role", problem=role)
        kind = PrimaryAgent if role == "primary" else SecondaryAgent
        agent = agents["agent"] = kind(agents.get("cfg", cfg), log.bind(role=role), first)
        await agent.run(ready)

    def reload() -> None:
        sdnotify.reloading()
        agent = agents.get("agent")
        if agent is not None:
            config_mod.reload_logged(agent.cfg, "agent", log, agent.reconfigure)
        else:   # not attached yet: the agent starts with the reloaded file
            config_mod.reload_logged(agents.get("cfg", cfg), "agent", log,
                                     lambda new: agents.__setitem__("cfg", new))
        sdnotify.ready()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload)
        task = asyncio.create_task(start(lambda status: sdnotify.ready(status=status)))
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stopper in done:
            sdnotify.stopping()
            log.info("agent_stopping")
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        else:
            stopper.cancel()
            task.result()

    try:
        _run_loop(main())
        return 0
    except (errors.UnavailableError, errors.BusyError) as e:
        log.error("agent_failed", error=str(e))
        return errors.EXIT_TEMPFAIL   # systemd restarts it
    except errors.ApplianceError as e:
        log.error("agent_failed", error=str(e))
        return errors.EXIT_CONFIG if isinstance(e, (errors.ConfigError, errors.FormatError)) else 1
