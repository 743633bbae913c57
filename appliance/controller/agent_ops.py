"""The controller's side of its replication agent, and the operator requests
that go through the agent.

The agent (appliance/replication/) attaches with OP_AGENT on the
controller's socket, from the controller's own user or root only, and is
told the appliance's role (the one owner, :mod:`.role`). On a primary it
long-polls for newly published log entries (OP_WATCH: ``WAIT_WATCH`` until
the published serial passes the one it has, or an operator's VERIFY or
RESYNC is waiting for it), sends every secondary's acknowledgement at once
(OP_ACKED, one-way: it releases the synchronous commits it satisfies, see
:mod:`.commit`) and its whole state now and then (OP_REPL_STATE). OP_VERIFY
parks the operator's request (``WAIT_VERIFY``) until the agent reports the
comparison. On a secondary, OP_WAIT_APPLIED parks a client until a
primary serial is applied (read-your-writes); applying itself is
:mod:`.apply`. Everything runs on the loop thread.
"""
from __future__ import annotations

import os

from .. import errors
from ..store import changelog
from ..wire import messages as m
from .loop import WAIT_VERIFY, WAIT_WATCH
from .ops import handler

__all__ = ["AgentLink"]


class AgentLink:
    def __init__(self, ctl) -> None:
        self.ctl = ctl
        self.log = ctl.log
        self.state: dict = {}                 # what the agent last reported
        self.watchers: set = set()            # sessions parked in WATCH / WAIT_APPLIED
        self.verify_new: list[int] = []       # verify ids the agent has not been told of
        self.resync_new: list[str] = []       # secondaries to copy again, likewise
        self.verify_waiting: dict[int, object] = {}
        self._verify_seq = 0

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
            if timed_out or self.published_serial() > value or self.verify_new or self.resync_new:
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
        """A version was published: wake the long polls it may satisfy."""
        for sess in list(self.watchers):
            self.wake(sess)

    def watch_reply(self) -> dict:
        b = changelog.bounds(self.ctl.reader)
        if self.verify_new:
            b["verify"], self.verify_new = self.verify_new, []
        if self.resync_new:
            b["resync"], self.resync_new = self.resync_new, []
        return b

    def dropped(self, sess) -> None:
        self.watchers.discard(sess)
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
        raise errors.ProtocolError(f"agent: appliance {ctl.cfg.name!r} is {ctl.role.name}, not {role!r}")
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
    return {"name": ctl.cfg.name, "instance": sb.sb_instance, "epoch": sb.sb_epoch,
            "role": ctl.role.name, "serial": ctl.agents.published_serial(), "applied": applied,
            "source": source, "copying": ctl.applier.copied is not None,
            "needs_copy": ctl.applier.needs_copy is not None}


@handler(m.OP_WATCH)
def watch(ctl, sess, serial, timeout):
    link = ctl.agents
    if link.published_serial() > serial or link.verify_new or link.resync_new:
        return link.watch_reply()
    return (yield from link.park(sess, "serial", serial, timeout))


@handler(m.OP_REPL_STATE)
def repl_state(ctl, sess, state):
    if not isinstance(state, dict):
        raise errors.WrongTypeError("repl_state: expects a map")
    link = ctl.agents
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


@handler(m.OP_ACKED, roles=("primary",))
def acked(ctl, sess, secondary, serial):
    """A secondary confirmed `serial` applied (one-way: Controller.one_way
    calls this for an agent's session; it sends no reply)."""
    if type(serial) is not int or type(secondary) is not str or secondary not in ctl.sync.secondaries:
        raise errors.WrongTypeError("acked: expects a secondary's name and a serial")
    ctl.sync.ack(secondary, serial)
    if ctl.sync.waiting:
        ctl.commits.release_backed_up()


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
