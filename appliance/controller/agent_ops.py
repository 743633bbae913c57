"""The controller's side of its replication agent, and the operator requests
that go through the agent.

The agent (appliance/replication/) attaches with OP_AGENT on the
controller's socket, from the controller's own user or root only, and is
told the appliance's role (the one owner, :mod:`.role`). On a primary it
asks for its wake-ups (OP_WAKEUPS, :class:`Wakeups`): the controller signals
an eventfd after every publish, and the agent stores every secondary's
acknowledgement in shared memory and signals another eventfd when it may
release a synchronous commit (:meth:`AgentLink.pull_acks`, called by
:mod:`.commit`). It long-polls (OP_WATCH, ``WAIT_WATCH``) for an operator's
VERIFY or RESYNC waiting for it, and sends its whole state now and then
(OP_REPL_STATE). OP_VERIFY parks the operator's request (``WAIT_VERIFY``)
until the agent reports the comparison. On a secondary, OP_WAIT_APPLIED
parks a client until a primary serial is applied (read-your-writes);
applying itself is :mod:`.apply`. Everything runs on the loop thread.
"""
from __future__ import annotations

import mmap
import os

from .. import errors
from .._native import ffi, lib
from .._os.logs import LogOnce
from ..store import changelog
from ..wire import messages as m
from .loop import WAIT_VERIFY, WAIT_WATCH
from .ops import handler

__all__ = ["AgentLink", "Wakeups"]


class Wakeups:
    """What one agent session was handed by OP_WAKEUPS: the "published" and
    "acked" eventfds and the memfd of its struct apl_acks (cext/apl_layout.h:
    who writes which field, and why no wake-up is lost). The controller keeps
    its own descriptors until the session ends."""

    SIZE = ffi.sizeof("struct apl_acks")

    def __init__(self, ctl, names: list[str]) -> None:
        self.names = names[: lib.APL_MAX_SECONDARIES]
        self.memfd = os.memfd_create("appliance-acks", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.memfd, self.SIZE)
            self.map = mmap.mmap(self.memfd, self.SIZE)
            self._buf = ffi.from_buffer(self.map)
            self.acks = ffi.cast("struct apl_acks *", self._buf)
            lib.apl_acks_init(self.acks, ctl.att.sb.sb_instance, len(self.names))
            self.out = ffi.new("uint64_t[]", max(1, len(self.names)))
            self.published = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.acked = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except BaseException:
            os.close(self.memfd)
            raise

    @property
    def fds(self) -> list[int]:
        return [self.published, self.acked, self.memfd]

    def signal_published(self) -> None:
        try:
            os.eventfd_write(self.published, 1)
        except BlockingIOError:   # the counter is full: the agent has a wake-up pending anyway
            pass

    def take_signal(self) -> None:
        try:
            os.eventfd_read(self.acked)
        except BlockingIOError:
            pass

    def read(self, want: int):
        """Post the lowest serial a commit waits for (0: none); then every
        (secondary, acknowledged serial)."""
        lib.apl_acks_want(self.acks, want, self.out)
        out = self.out
        return [(name, out[i]) for i, name in enumerate(self.names)]

    def close(self) -> None:
        for fd in (self.published, self.acked, self.memfd):
            os.close(fd)
        ffi.release(self._buf)
        self.map.close()


class AgentLink:
    def __init__(self, ctl) -> None:
        self.ctl = ctl
        self.log = ctl.log
        self.state: dict = {}                 # what the agent last reported
        self.watchers: set = set()            # sessions parked in WATCH / WAIT_APPLIED
        self.verify_new: list[int] = []       # verify ids the agent has not been told of
        self.resync_new: list[str] = []       # secondaries to copy again, likewise
        self.asks: list[dict] = []            # operator requests for the agent (recovery.py), likewise
        self.verify_waiting: dict[int, object] = {}
        self._verify_seq = 0
        self.wakeups: list[Wakeups] = []      # of the attached agent's sessions (OP_WAKEUPS)
        self.bad_acks = LogOnce(ctl.log)      # acknowledgements past the log, once per secondary

    # ------------------------------------------------------------------ facts

    def attached(self) -> bool:
        return any(x.agent for x in self.ctl.sessions.values())

    def published_serial(self) -> int:
        sb = self.ctl.att.sb
        return sb.sb_pub[sb.sb_version & 1].pb_serial

    def applied_serial(self) -> tuple[int, int]:
        """(primary serial applied, primary instance) — on a secondary."""
        sb = self.ctl.att.sb
        pb = sb.sb_pub[sb.sb_version & 1]
        return pb.pb_source_serial, pb.pb_source_instance

    def here(self) -> int:
        """The serial a reader here has: applied from the primary on a
        secondary, published on any other appliance."""
        return self.applied_serial()[0] if self.ctl.role.is_secondary else self.published_serial()

    # ------------------------------------------------------------------ long polls

    def park(self, sess, kind: str, value: int, timeout):
        """Long poll: wait until the watched serial passes `value`, or the timeout."""
        if not isinstance(timeout, (int, float)) or not 0 <= timeout <= 3600:
            raise errors.WrongTypeError("timeout must be a number of seconds (0..3600)")
        ctl = self.ctl
        timer = ctl.add_timer(float(timeout), lambda: self.wake(sess, timed_out=True))
        sess.watch = (kind, value, timer)
        try:
            result = yield WAIT_WATCH
        finally:
            ctl.cancel_timer(timer)
            sess.watch = None
            self.watchers.discard(sess)
        return result

    def wake(self, sess, timed_out: bool = False) -> None:
        if sess.watch is None or sess.closed:
            return
        kind, value, _ = sess.watch
        if kind == "serial":
            if (timed_out or self.verify_new or self.resync_new or self.asks
                    or (value is not None and self.published_serial() > value)):
                self.watchers.discard(sess)
                self.ctl.resume(sess, self.watch_reply())
        elif kind == "applied":
            applied = self.here()
            if applied >= value:
                self.watchers.discard(sess)
                self.ctl.resume(sess, applied)
            elif timed_out:
                self.watchers.discard(sess)
                self.ctl.resume(sess, exc=errors.UnavailableError(
                    f"wait_applied: serial {value} not applied here yet (applied {applied})",
                    applied=applied))

    def wake_all(self) -> None:
        """A version was published: wake the agent (its "published" eventfd)
        and the long polls it may satisfy."""
        for w in self.wakeups:
            w.signal_published()
        for sess in list(self.watchers):
            self.wake(sess)

    # ------------------------------------------------------------------ acknowledgements

    def pull_acks(self) -> None:
        """Take the acknowledgements the agent stored (struct apl_acks) into
        the sync tracker, posting first the lowest serial a commit waits for,
        so the agent signals when one reaches it (the caller then releases
        what they satisfy: GroupCommit.release_backed_up)."""
        if not self.wakeups:
            return
        sync = self.ctl.sync
        want = sync.waiting[0].serial if sync.waiting else 0   # (appended in serial order)
        acked = sync.acked
        logged = None
        for wk in self.wakeups:
            for name, serial in wk.read(want):
                if serial > acked.get(name, serial):
                    if logged is None:
                        logged = self.published_serial()
                    if serial > logged:   # a broken agent: no commit is released by it
                        self.bad_acks.error("agent_ack_beyond_log", name, secondary=name, serial=serial,
                                            logged=logged)
                        continue
                    sync.ack(name, serial)

    def acks_signalled(self, wk: Wakeups) -> None:
        """The agent signalled "acked": an acknowledgement may release commits."""
        wk.take_signal()
        self.ctl.commits.release_backed_up()

    def watch_reply(self) -> dict:
        b = changelog.bounds(self.ctl.reader)
        if self.verify_new:
            b["verify"], self.verify_new = self.verify_new, []
        if self.resync_new:
            b["resync"], self.resync_new = self.resync_new, []
        if self.asks:
            b["asks"], self.asks = self.asks, []
        return b

    def dropped(self, sess) -> None:
        self.watchers.discard(sess)
        wk = sess.wakeups
        if wk is not None:
            if self.ctl.role.is_primary:   # what it stored last still counts, and releases what it confirms
                self.ctl.commits.release_backed_up()
            sess.wakeups = None
            self.wakeups.remove(wk)
            self.ctl.unwatch_fd(wk.acked)
            wk.close()
        if sess.agent and not self.attached():
            self.log.warning("agent_detached", pid=sess.pid)
            if self.ctl.role.is_primary:
                sync = self.ctl.sync
                sync.update({n: {"connected": False, "state": "agent down"} for n in sync.secondaries})

    def status(self) -> dict:
        return dict(self.state, attached=self.attached())


# ---------------------------------------------------------------------- requests

@handler(m.OP_AGENT)
def agent(ctl, sess, role, agent_pid):
    if sess.uid not in (0, os.geteuid()):
        raise errors.AccessDeniedError("agent: only the controller's own user or root may attach an agent",
                                       uid=sess.uid)
    if role is not None and role != ctl.role.name:
        raise errors.ProtocolError(f"agent: appliance {ctl.cfg.name!r} is {ctl.role.name}, not {role!r}",
                                   role=ctl.role.name)
    if type(agent_pid) is not int:
        raise errors.WrongTypeError("agent: expects (role, agent pid)")
    other = {x.agent_pid for x in ctl.sessions.values() if x.agent and not x.closed and x is not sess}
    if other and other != {agent_pid}:
        raise errors.BusyError(f"agent: another agent (pid {other.pop()}) is attached to {ctl.cfg.name!r}")
    sess.agent = ctl.role.name
    sess.agent_pid = agent_pid   # an agent may hold several sessions (long poll + commands)
    ctl.log.info("agent_attached", pid=sess.pid, agent_pid=agent_pid)
    sb = ctl.att.sb
    applied, source = ctl.agents.applied_serial()
    durable = applied if ctl.durable is None else ctl.durable.acknowledgeable(applied)
    return {"name": ctl.cfg.name, "instance": sb.sb_instance, "epoch": sb.sb_epoch,
            "role": ctl.role.name, "serial": ctl.agents.published_serial(), "applied": applied,
            "durable": durable,
            "source": source, "copying": ctl.applier.copied is not None,
            "needs_copy": ctl.applier.needs_copy is not None, **ctl.failover.agent_info()}


@handler(m.OP_WATCH)
def watch(ctl, sess, serial, timeout):
    link = ctl.agents
    if serial is not None and type(serial) is not int:
        raise errors.WrongTypeError("watch: the serial must be an int or nil")
    if (serial is not None and link.published_serial() > serial) or link.verify_new or link.resync_new or link.asks:
        return link.watch_reply()
    return (yield from link.park(sess, "serial", serial, timeout))


@handler(m.OP_REPL_STATE)
def repl_state(ctl, sess, state):
    if not isinstance(state, dict):
        raise errors.WrongTypeError("repl_state: expects a map")
    link = ctl.agents
    if "answer" in state:
        ctl.failover.answered(state["answer"])
        return None
    if "verify" in state:
        for vid, res in state["verify"].items():
            waiter = link.verify_waiting.pop(int(vid), None)
            if waiter is not None:
                ctl.resume(waiter, res)
        return None if ctl.role.is_primary else {"batch": ctl.batch.active}
    link.state = state
    if ctl.role.is_primary:
        ctl.sync.update(state.get("secondaries", {}))
        ctl.commits.release_backed_up()
        return None
    return {"batch": ctl.batch.active}   # a secondary's agent learns of batch mode here too


@handler(m.OP_WAKEUPS, roles=("primary",))
def wakeups(ctl, sess):
    """The agent's wake-ups (see Wakeups): the descriptors go with the reply."""
    if sess.wakeups is not None:
        raise errors.BusyError("wakeups: this session has its wake-ups already")
    link = ctl.agents
    wk = Wakeups(ctl, list(ctl.sync.secondaries))
    sess.wakeups = wk
    link.wakeups.append(wk)
    ctl.watch_fd(wk.acked, lambda: link.acks_signalled(wk))
    sess.fds = wk.fds
    return {"instance": ctl.att.sb.sb_instance, "secondaries": wk.names}


@handler(m.OP_BLOCK_SUMS)
def block_sums(ctl, sess):
    pin = ctl.reader.pin()
    try:
        v = pin.version
        sb = ctl.att.sb
        pb = sb.sb_pub[v & 1]
        serial = (pb.pb_source_serial if ctl.role.is_secondary else pb.pb_serial) if pb.pb_version == v else None
        return {"version": v, "serial": serial, "limit": ctl.reader.block_limit(),
                "sums": ctl.reader.block_sums(v)}
    finally:
        pin.close()


@handler(m.OP_VERIFY, roles=("primary",))
def verify(ctl, sess, timeout):
    """An operator's `appliance verify`: the agent compares every secondary
    block by block at one serial; the reply is its per-secondary result."""
    link = ctl.agents
    if not link.attached():
        raise errors.UnavailableError(f"verify: the replication agent of {ctl.cfg.name!r} is not running")
    if not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
        raise errors.WrongTypeError("verify: timeout must be seconds (0..3600]")
    link._verify_seq += 1
    vid = link._verify_seq
    link.verify_new.append(vid)
    link.verify_waiting[vid] = sess
    link.wake_all()
    timer = ctl.add_timer(float(timeout), lambda: link.verify_waiting.pop(vid, None) and ctl.resume(
        sess, exc=errors.UnavailableError(f"verify: no result within {timeout} s")))
    try:
        return (yield WAIT_VERIFY)
    finally:
        ctl.cancel_timer(timer)
        link.verify_waiting.pop(vid, None)


@handler(m.OP_RESYNC)
def resync(ctl, sess, secondary):
    if not ctl.role.is_primary or secondary not in ctl.sync.secondaries:
        raise errors.NoSuchTableError(f"resync: {secondary!r} is not a secondary of {ctl.cfg.name!r}",
                                      secondary=str(secondary))
    link = ctl.agents
    if not link.attached():
        raise errors.UnavailableError(f"resync: the replication agent of {ctl.cfg.name!r} is not running")
    link.resync_new.append(secondary)
    ctl.log.info("resync_requested", secondary=secondary)
    link.wake_all()
    return None


@handler(m.OP_WAIT_APPLIED)
def wait_applied(ctl, sess, serial, timeout):
    if type(serial) is not int:
        raise errors.WrongTypeError("wait_applied: the serial must be an int")
    applied = ctl.agents.here()
    if applied >= serial:
        return applied
    return (yield from ctl.agents.park(sess, "applied", serial, timeout))
