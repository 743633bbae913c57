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
from functools import partial

from .. import errors
from .._os import logs, sdnotify
from .._os.lifecycle import cancel_and_wait
from .._os.logs import LogEvery, LogOnce
from ..config import Config
from ..recovery.history import GAP, RingCursor
from ..store import changelog
from ..store.changelog import E_KIND, ENTRY
from ..store.reader import Reader
from ..store.segment import Attachment
from ..wire import messages as m
from ..wire import replication as rp
from . import link
from .applier import Applier
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


class RoleChanged(Exception):
    """The appliance's role changed under the agent (a promote, a rejoin): it
    asks the controller again and runs the other side (see run())."""


async def _connect_controller(cfg: Config, role: str | None, log, wakeups: bool = False) -> link.ControlLink:
    """Attach to the controller as its agent, waiting for it to be up
    (logged once, naming the socket; again when the reason changes).
    `role`: the role the agent runs, refused by a controller whose appliance
    has another one now; None to be told (the first link: the controller
    owns the role, appliance/controller/role.py). `wakeups`: the link also
    gets a primary's wake-ups (link.Wakeups)."""
    path = str(cfg.socket_path)
    logged = None
    while True:
        ctl = link.ControlLink(path, f"agent:{role or 'starting'}")
        try:
            await ctl.connect(role, wakeups)
            return ctl
        except (OSError, errors.UnavailableError) as exc:
            ctl.close()
            if type(exc) is not logged:
                logged = type(exc)
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc) or logged.__name__)
                log.warning("controller_unavailable_waiting", socket=path, error=f"controller socket {path}: {why}")
            await asyncio.sleep(0.2)
        except errors.ApplianceError as exc:
            ctl.close()
            if role is not None and exc.details.get("role") not in (None, role):
                raise RoleChanged(exc.details["role"]) from None
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
        self.fork = ctl.info.get("fork")    # the primary this one was promoted from (recovery.py)
        self.fencer: Fencer | None = None
        self._fencing: set = set()          # epochs an OP_FENCE was sent for
        self.ready = False   # its relays run (READY=1 sent)
        self.wakeups: link.Wakeups | None = None   # the watch link's, while it is up

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

    def status_line(self) -> str:
        """STATUS= of the unit: each secondary's link state and serials behind."""
        parts = [f"{r.name} {r.state.value}, {max(0, self.serial - r.acked)} serials behind" for r in self.relays]
        return f"streaming to {'; '.join(parts)}"

    # -- shared facts for relays ----------------------------------------------------------

    def bounds(self) -> dict:
        b = changelog.bounds(self.reader)
        self.head, self.serial = max(self.head, b["head"]), max(self.serial, b["serial"])
        return b

    def refresh(self) -> None:
        """head and serial as published now (after every publish: no allocation)."""
        head, serial = self._bounds.head_serial()
        if head > self.head:
            self.head = head
        if serial > self.serial:
            self.serial = serial
    def ring_start(self) -> tuple[int, int]:
        """(position, serial) of the oldest entry the change-log ring holds
        (the next one to be written when it is empty)."""
        from ..store import changelog
        for _ in range(100):      # the writer may move the tail past it meanwhile: read it again
            b = self.bounds()
            try:
                for e in changelog.read_entries(self.reader, b["tail"], limit=1):
                    return e.pos, e.serial
            except errors.InternalError:
                continue
            return b["head"], b["serial"] + 1
        raise errors.BusyError("could not read the change log's oldest entry")

    def log_files_after(self, after: int, upto: int) -> list[bytes] | None:
        """Entries after..upto read back from the controller's durability
        files (None without [durability], or when they do not hold them all)."""
        if self.cfg.durability is None or upto <= after:
            return None
        from ..durability.logfiles import LogDir, entries_after
        try:
            return entries_after(LogDir(self.cfg.durability_dir, self.log, readonly=True), after, upto)
        except OSError as exc:
            self.log.warning("log_files_unreadable", error=str(exc), dir=str(self.cfg.durability_dir))
            return None

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

    def learnt_epoch(self, epoch, primary, peer: str) -> None:
        """A peer refused this primary: another appliance is primary at
        `epoch`. When that is newer than this one's, the controller fences
        itself (OP_FENCE; once per epoch)."""
        if type(epoch) is not int or epoch <= self.epoch or epoch in self._fencing:
            return
        self._fencing.add(epoch)
        self.log.critical("deposed_primary_fencing", epoch=epoch, primary=primary, peer=peer, own_epoch=self.epoch)

        async def fence() -> None:
            try:
                await self.ctl.call([m.OP_FENCE, epoch, primary if isinstance(primary, str) else None])
            except errors.ApplianceError as exc:
                self._fencing.discard(epoch)
                self.log.error("fence_failed", epoch=epoch, error=str(exc))
        t = asyncio.get_running_loop().create_task(fence())
        self.verify_tasks.add(t)
        t.add_done_callback(self.verify_tasks.discard)

    def acked(self, name: str, serial: int) -> None:
        """Pass a secondary's "backup complete" to the controller at once: it
        releases the synchronous commits waiting for it. Stored in the shared
        acknowledgements from the relay's reader itself (link.Wakeups.post),
        so an ACK costs no task switch and no message; the periodic report
        carries the rest of the relay's state."""
        w = self.wakeups
        try:
            if w is not None:
                w.post(name, serial)
                return
        except OSError:
            pass
        self.report_soon()   # the watch task reconnects; the report after it carries the serial

    def _use_wakeups(self, w: link.Wakeups | None) -> None:
        """Wake the relays whenever the controller signals a publish (None:
        the link is down)."""
        loop = asyncio.get_running_loop()
        if self.wakeups is not None:
            loop.remove_reader(self.wakeups.published)
        self.wakeups = w
        if w is not None:
            loop.add_reader(w.published, self._published)
            self._published(force=True)   # what was published before the reader was added

    def _published(self, force: bool = False) -> None:
        """The controller published a version: the relays send what is new,
        but for one that holds it for its next message (Relay.holding: it
        sends when its ACK comes), which is not woken at all."""
        w = self.wakeups
        if w is None or not (w.take_published() or force):
            return
        self.refresh()
        self._history_wake.set()
        for r in self.relays:
            if not r.holding():
                r.wake.set()

    # -- tasks --------------------------------------------------------------------------------

    async def run(self, ready) -> None:
        # two links: WATCH parks on its own, so reports never queue behind it; it
        # holds the wake-ups (publishes, acknowledgements: link.Wakeups)
        self.watch_ctl = await _connect_controller(self.cfg, "primary", self.log, wakeups=True)
        info = self.ctl.info
        self.att = Attachment(self.cfg.name, writable=False)
        if self.att.instance != info["instance"]:
            raise errors.UnavailableError("the appliance was re-created while the agent attached; restart")
        self.instance, self.epoch = info["instance"], info["epoch"]
        self.reader = Reader(self.att)
        self._bounds = changelog.Bounds(self.reader)
        self.log_size = self.att.sb.sb_log_size
        self.files = link.files_of(self.att)
        self.bounds()
        self.relays = [Relay(self, s) for s in self.cfg.replication.secondaries]
        self._use_wakeups(self.watch_ctl.wakeups)
        tasks = [asyncio.create_task(r.run(), name=f"relay:{r.name}") for r in self.relays]
        tasks.append(asyncio.create_task(self._watch(), name="watch"))
        tasks.append(asyncio.create_task(self._report(), name="report"))
        if self.history is not None:
            tasks.append(asyncio.create_task(self._keep_history(), name="history"))
        ready(f"streaming to {', '.join(r.name for r in self.relays)}")
        if self.cfg.replication.listen and self.fork:
            # promoted: where its old primary streams to, it says who is primary now
            self.fencer = Fencer(self)
        ready(f"streaming to {', '.join(r.name for r in self.relays) or 'no secondary'}")
        self.ready = True
        self.log.info("agent_started", role="primary", secondaries=[r.name for r in self.relays],
                      serial=self.serial, epoch=self.epoch)
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if t.exception():
                    raise t.exception()
        finally:
            if self.fencer is not None:
                self.fencer.close()
            self._use_wakeups(None)
            await cancel_and_wait([*tasks, *self.verify_tasks])
            self.ctl.close()
            self.watch_ctl.close()
            self.att.close()
            if self.history is not None:
                self.history.spill()
                self.history.close()

    async def _keep_history(self) -> None:
        """Keep this primary's own log history (history_dir on a primary): its
        change log as it is published, from where the history ends. Between
        chunks the loop serves the relays (they are on the synchronous
        commits' path); closing a part (compressing it) runs in a thread."""
        h = self.history
        loop = asyncio.get_running_loop()
        cursor = RingCursor(self.reader, h.last_serial + 1, chunk=256 << 10)
        while True:
            self._history_wake.clear()
            for blob in cursor.blobs():
                if _is_gap_marker(blob):
                    continue          # the history notices the gap itself (and logs history_gap)
                h.append(blob, spill=False)
                await asyncio.sleep(0)
            if h.should_spill():
                await asyncio.to_thread(h.spill)   # (History.spill holds a lock: the stop's spill waits for it)
            # the timer sets the event itself (not asyncio.wait_for: see _report)
            tick = loop.call_later(1.0, self._history_wake.set)
            try:
                await self._history_wake.wait()
            finally:
                tick.cancel()

    async def _watch(self) -> None:
        """Long-poll the controller for what operators ask of the agent
        (verify, resync), and keep the links up: new log entries are
        signalled by the wake-ups (_published)."""
        while True:
            try:
                b = await self.watch_ctl.call([m.OP_WATCH, None, self.cfg.replication.heartbeat])
            except errors.UnavailableError:
                self.log.warning("controller_link_lost")
                self._use_wakeups(None)
                self.ctl.close()
                self.watch_ctl.close()
                self.ctl = await _connect_controller(self.cfg, "primary", self.log)
                self.watch_ctl = await _connect_controller(self.cfg, "primary", self.log, wakeups=True)
                if self.ctl.info["instance"] != self.instance:
                    raise errors.UnavailableError("the appliance was re-created; the agent restarts")
                self._use_wakeups(self.watch_ctl.wakeups)
                self.report_soon()
                continue
            self.head, self.serial = max(self.head, b["head"]), max(self.serial, b["serial"])
            for r in self.relays:
                r.wake.set()
            for name in b.get("resync", ()) or ():
                for r in self.relays:
                    if r.name == name:
                        r.force_copy = True
                        r.wake.set()
            for vid in b.get("verify", ()) or ():
                t = asyncio.create_task(self._verify(vid))
                self.verify_tasks.add(t)
                t.add_done_callback(self.verify_tasks.discard)
            for ask in b.get("asks", ()) or ():
                t = asyncio.create_task(self._answer(ask))
                self.verify_tasks.add(t)
                t.add_done_callback(self.verify_tasks.discard)

    async def _report(self) -> None:
        """Send the secondaries' whole state to the controller (shown by
        status): soon after a change of state (coalesced: one report in
        flight), and every heartbeat. ACKs go ahead on their own (acked())."""
        loop = asyncio.get_running_loop()
        while True:
            # the heartbeat sets the event itself: asyncio.wait_for (Python 3.11)
            # drops a cancellation that arrives as the event is set, and at stop
            # the relays' last state changes set it just as the agent cancels
            # this task, which then never ended
            tick = loop.call_later(self.cfg.replication.heartbeat, self._report_event.set)
            try:
                await self._report_event.wait()
            finally:
                tick.cancel()
            self._report_event.clear()
            self.refresh()   # the lag it reports (publishes are not signalled while every relay holds)
            state = {"secondaries": {r.name: r.report() for r in self.relays}, "pid": os.getpid(),
                     "reported_at": time.time(),
                     "history": self.history.status() if self.history is not None else {"enabled": False}}
            try:
                await self.ctl.call([m.OP_REPL_STATE, state])
            except errors.UnavailableError:
                await asyncio.sleep(0.05)

    async def _answer(self, ask) -> None:
        """An operator's request the controller passes on (repair.py: the
        images of some blocks from a secondary)."""
        answer: dict = {"error": f"unknown request {ask!r:.100}"}
        if isinstance(ask, dict) and ask.get("kind") == "fetch":
            relay = next((r for r in self.relays if r.name == ask.get("secondary")), None)
            try:
                if relay is None:
                    raise errors.UnavailableError(f"no secondary {ask.get('secondary')!r}")
                body = await relay.fetch(ask.get("blocks") or [])
                answer = {"serial": body.get("serial"), "images": body.get("images")}
            except (errors.ApplianceError, asyncio.TimeoutError, OSError) as exc:
                answer = {"error": str(exc) or type(exc).__name__}
        try:
            await self.ctl.call([m.OP_REPL_STATE, {"answer": {"id": ask.get("id") if isinstance(ask, dict) else None,
                                                              **answer}}])
        except errors.UnavailableError:
            pass

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


class Fencer:
    """A promoted primary's listener at the address it listened at as a
    secondary (``replication.listen``): a deposed primary that still streams
    there is authenticated as a secondary would, then refused with this
    appliance's newer epoch and name (APL_ESTALE), so it fences itself
    ([0126]: no two primaries). A primary at a newer epoch than this one
    deposes this one instead."""

    def __init__(self, agent: PrimaryAgent) -> None:
        from .applier import Listener, _addr
        self.agent = agent
        self.errs = LogOnce(agent.log)
        self.refused = LogEvery(agent.log, 10.0)
        self.tls = link.tls_context(agent.cfg, server=True)
        host, port = _addr(agent.cfg.replication.listen)
        try:
            self.server = Listener(host, port, self._accept)
        except OSError as exc:
            self.server = None
            agent.log.warning("fencing_listener_failed", address=agent.cfg.replication.listen, error=str(exc))
            return
        agent.log.info("fencing_listener", address=agent.cfg.replication.listen, epoch=agent.epoch)

    async def _accept(self, sock, peer) -> None:
        a = self.agent
        loop = asyncio.get_running_loop()
        try:
            fs = await link.open_stream(partial(loop.connect_accepted_socket, sock=sock, ssl=self.tls),
                                        link.HANDSHAKE_MAX_FRAME)
        except (OSError, asyncio.TimeoutError):
            sock.close()
            return
        try:
            epoch, hello = await link.secondary_handshake(fs, a.cfg, files=a.files, secret=a.secret,
                                                          epoch_seen=a.epoch, current=a.cfg.name)
            if epoch > a.epoch:
                a.learnt_epoch(epoch, hello.get("name"), fs.peer)
            fs.send(rp.message(rp.ERROR, a.epoch, 0, {
                "code": "APL_ESTALE", "epoch": a.epoch, "primary": a.cfg.name,
                "message": f"{a.cfg.name!r} is the primary at epoch {a.epoch} (a failover); "
                           f"{hello.get('name')!r} at epoch {epoch} is not"}))
            await fs.drain()
            self.refused.warning("deposed_primary_refused", hello.get("name"), peer=fs.peer, its_epoch=epoch)
        except errors.StaleEpochError as exc:
            self.refused.warning("deposed_primary_refused", "stale", peer=fs.peer, error=str(exc))
        except (OSError, EOFError, asyncio.TimeoutError, errors.ApplianceError) as exc:
            self.errs.error("fencing_link_refused", type(exc).__name__, peer=fs.peer, error=str(exc))
        finally:
            fs.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class SecondaryAgent:
    def __init__(self, cfg: Config, log, ctl: link.ControlLink) -> None:
        self.cfg = cfg
        self.log = log
        self.ctl = ctl       # the link the agent learnt its role on
        self.applier: Applier | None = None
        self.history: History | None = None
        self.ready = False   # its listener runs (READY=1 sent)

    def status_line(self) -> str:
        """STATUS= of the unit: the link from the primary and how far behind it this side is."""
        a = self.applier
        behind = f", {max(0, a.primary_serial - a.applied)} serials behind" if a.primary_serial else ""
        return (f"listening at {self.cfg.replication.listen} for {' or '.join(self.cfg.replication.primaries)}: "
                f"{a.state.value}, applied {a.applied}{behind}")

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
        ready(f"listening at {rc.listen} for {' or '.join(rc.primaries)}")
        self.log.info("agent_started", role="secondary", primary=" or ".join(rc.primaries), applied=applier.applied,
                      epoch=applier.epoch_seen)
        self.ready = True
        asks = asyncio.create_task(self._asks(), name="asks")
        try:
            while True:
                # in batch mode the controller's "end" is heard within 50 ms (OP_REPL_STATE's reply)
                await _wait_or_fail(asks, 0.05 if applier.backlog is not None and not applier.catching_up
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
                    ctl = self.ctl = await _connect_controller(self.cfg, "secondary", self.log)
                    applier.ctl = ctl
                    applier.applied, applier.source = ctl.info["applied"], ctl.info["source"]
                    applier.copying = bool(ctl.info.get("copying"))
                    applier.need_copy = applier.need_copy or bool(ctl.info.get("needs_copy"))
                if history.should_spill():
                    history.spill()
        finally:
            await cancel_and_wait([asks])
            history.spill()
            history.close()
            applier.close()
            ctl.close()

    async def _asks(self) -> None:
        """Operator requests the controller passes on (recovery.py): they
        come in a WATCH long poll of their own; each is answered with
        OP_REPL_STATE {"answer": ...}."""
        watch = await _connect_controller(self.cfg, "secondary", self.log)
        try:
            while True:
                try:
                    b = await watch.call([m.OP_WATCH, 1 << 62, 30.0])
                except errors.UnavailableError:
                    watch.close()
                    watch = await _connect_controller(self.cfg, "secondary", self.log)
                    continue
                for ask in b.get("asks", ()) or ():
                    answer = await self.applier.answer(ask)
                    try:
                        await self.ctl.call([m.OP_REPL_STATE, {"answer": {"id": ask.get("id"), **answer}}])
                    except errors.UnavailableError:
                        pass
        finally:
            watch.close()


async def _wait_or_fail(task: asyncio.Task, seconds: float) -> None:
    """Sleep `seconds`, or less if `task` ends: its exception (RoleChanged
    ...) is raised here; a task that ends without one is a bug."""
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if done:
        exc = task.exception()
        raise exc if exc is not None else RuntimeError(f"agent task {task.get_name()} ended")


def _reconfigure_history(h: History | None, cfg: Config) -> None:
    """A reload's history settings (config.RELOADABLE: period, memory, disk, A logs)."""
    if h is not None:
        rc = cfg.replication
        h.period, h.memory, h.disk, h.keep_a = rc.history_period, rc.history_memory, rc.history_disk, \
            rc.history_a_logs


def _is_gap_marker(blob: bytes) -> bool:
    return len(blob) >= ENTRY.size and ENTRY.unpack_from(blob)[E_KIND] == GAP


def run(config_path: str, *, log_json: bool | None = None, log_level: str | None = None) -> int:
    """Entry point of ``appliance agent``; returns the exit status
    (errors.exit_status of what refused the start; 75, restarted by systemd,
    while its controller is not there to attach to)."""
    from .. import config as config_mod
    from .._os import environment

    signal.signal(signal.SIGHUP, signal.SIG_IGN)   # until the loop handles it: a reload must not kill
    try:
        log = environment.configure_logs("agent", json=log_json, level=log_level)
    except errors.ConfigError as e:
        logs.get_logger(process="agent").error("agent_refused_to_start", error=str(e), key=e.details.get("key"),
                                               cause=e.details.get("cause"))
        return errors.exit_status(e)
    cfg, refused = config_mod.load_logged(config_path, log)
    if cfg is None:
        return refused
    if cfg.replication is None:
        log.error("config_invalid", error=f"{cfg.path}: no [replication] section: nothing for an agent to do",
                  key="replication")
        return errors.EXIT_CONFIG
    log = log.bind(appliance=cfg.name)
    try:
        cfg.check_tls_files()   # before waiting for the controller: a missing certificate is said at once
    except errors.ConfigError as e:
        log.error("agent_refused_to_start", error=str(e), file=e.details.get("file"), key=e.details.get("key"),
                  cause=e.details.get("cause"))
        return errors.exit_status(e)
    agents: dict = {}   # "agent": the running agent, once the controller said which role it serves
    notifier = sdnotify.Notifier()

    async def start() -> None:
        """Ask the controller which role the appliance has (it owns the role:
        a failover changes it there), then run that side of replication;
        when the role changes (promote, rejoin), ask again and run the other."""
        while True:
            first = await _connect_controller(cfg, None, log)
            role = first.info["role"]
            if role not in ("primary", "secondary"):
                first.close()
                raise errors.ConfigError(f"{cfg.path}: appliance {cfg.name!r} is {role}: nothing for an agent to do",
                                         file=str(cfg.path), key="replication.role", problem=role)
            kind = PrimaryAgent if role == "primary" else SecondaryAgent
            agent = agents["agent"] = kind(agents.get("cfg", cfg), log.bind(role=role), first)
            try:
                await agent.run(lambda status: notifier.ready(status))
                return
            except RoleChanged as exc:
                agents["cfg"] = agent.cfg
                agents.pop("agent", None)
                log.warning("agent_role_changed", **{"from": role, "to": str(exc)})

    def reload() -> None:
        sdnotify.reloading()
        agent = agents.get("agent")
        if agent is not None:
            config_mod.reload_logged(agent.cfg, "agent", log, agent.reconfigure)
        else:   # not attached yet: the agent starts with the reloaded file
            config_mod.reload_logged(agents.get("cfg", cfg), "agent", log,
                                     lambda new: agents.__setitem__("cfg", new))
        sdnotify.ready()

    async def keepalive() -> None:
        """WATCHDOG=1 while the loop turns (this task runs only when it does),
        and the STATUS= line once a second when it changed."""
        while True:
            now = time.monotonic()
            notifier.ping(now)
            agent = agents.get("agent")
            if agent is not None and agent.ready:
                notifier.status(agent.status_line())
            await asyncio.sleep(min(1.0, notifier.wait_s(now)))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload)
        task = asyncio.create_task(start())
        pings = asyncio.create_task(keepalive())
        stopper = asyncio.create_task(stop.wait())
        try:
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
                task.result()
        finally:
            await cancel_and_wait([pings, stopper])

    try:
        _run_loop(main())
        return 0
    except errors.ApplianceError as e:
        log.error("agent_failed", error=str(e), key=e.details.get("key"), cause=e.details.get("cause"))
        if isinstance(e, errors.BusyError) and not e.details.get("cause"):
            return errors.EXIT_TEMPFAIL   # another agent still attached: systemd restarts this one
        return errors.exit_status(e)
