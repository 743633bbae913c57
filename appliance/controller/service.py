"""The controller: its parts, and how a request reaches them.

:class:`Controller` is the event loop (:mod:`.loop`) plus the parts that
carry out requests, each owning its own state:

- ``role``     the appliance's role and epoch, the one owner (:mod:`.role`);
- ``txns``     open transactions and their statements (:mod:`.statements`);
- ``locks``    record locks (:mod:`.locks`);
- ``commits``  group commit and the release of synchronous commits (:mod:`.commit`);
- ``sync``     what the secondaries acknowledged, on a primary (:mod:`.sync`);
- ``agents``   the controller's side of its replication agent (:mod:`.agent_ops`);
- ``applier``  a secondary applying its primary's stream (:mod:`.apply`);
- ``readers``  reader slots and the memory old pins hold (:mod:`.readers`);
- ``hold``     new writes held while a recovery operation runs (:mod:`.hold`);
- ``history``  history, restore and cancel from the log history (:mod:`.history`);
- ``batch``    a secondary's referential batch mode (:mod:`.batch`);

and what the controller reports (:mod:`.status`, :mod:`.devices`). Each
request goes through the op table (:mod:`.ops`), which the part that
implements it fills; a new part (device replacement, restore, metrics)
registers its ops the same way, without touching the others. Everything runs
on the loop's one thread.
"""
from __future__ import annotations

import time

from .. import errors
from ..config import Config
from ..store.reader import Reader
from ..store.records import Schema
from ..wire import messages as m
from . import agent_ops, apply, batch, history, statements, status as status_mod  # noqa: F401  (they fill the op table)
from .agent_ops import AgentLink
from .apply import SecondaryApply
from .batch import BatchMode
from .commit import GroupCommit
from .hold import WriteHold
from .locks import LockManager
from .loop import WAIT_COMMIT, WAIT_WATCH, Loop
from .ops import dispatch
from .readers import ReaderSlots
from .history import HistoryOps
from .role import Role
from .statements import Transactions
from .sync import SyncTracker

__all__ = ["Controller"]


class Controller(Loop):
    def __init__(self, cfg: Config, writer, log, *, recovery: dict | None = None, created: bool = False) -> None:
        super().__init__(cfg, log)
        self.schema = Schema(cfg)
        self.writer = writer
        self.att = writer.att
        self.reader = Reader(self.att)
        self.started_ns = time.time_ns()
        self.recovery = recovery or {}
        self.created = created
        self.role = Role(writer, cfg, log)
        self.readers = ReaderSlots(writer, log, self.att.sb.sb_block_size, self.att.compressed)
        self.locks = LockManager()
        self.txns = Transactions(self)
        self.commits = GroupCommit(self)
        self.sync = SyncTracker(cfg.replication if self.role.is_primary else None, log)
        self.agents = AgentLink(self)
        self.applier = SecondaryApply(self)
        self.hold = WriteHold(self)
        self.history = HistoryOps(self)
        self.batch = BatchMode(self)
        self.role.on_change(self._role_changed)

    def _role_changed(self, old: str, new: str) -> None:
        self.sync = SyncTracker(self.cfg.replication if new == "primary" else None, self.log)

    def reconfigure(self, cfg: Config) -> None:
        """Run with a reloaded config (SIGHUP: config.reload_logged gives it,
        with only the keys config.RELOADABLE lets the controller take)."""
        self.cfg = cfg
        self._set_access(cfg)
        self.txns.configure(cfg)
        if self.role.is_primary:
            self.sync.reconfigure(cfg.replication)
            self.commits.release_backed_up()

    def published(self) -> None:
        """A version was published: wake what waits for one."""
        self.agents.wake_all()

    # ------------------------------------------------------------------ the loop's hooks

    def handle(self, sess, req: list):
        return dispatch(self, sess, req)

    def fast_request(self, sess, req: list) -> bool:
        if req[0] != m.OP_ATOMIC or self.role.is_secondary or self.hold.holder is not None:
            return False
        try:
            return self.txns.fast_atomic(sess, req)
        except Exception as e:  # a bug: report it, undo, keep serving
            sess.gen = None
            txn = sess.txn
            if txn is not None and txn.state in ("open", "committing"):
                txn.state = "open"
                self.txns.cancel(txn, "internal_error")
            self.request_failed(sess, e)
            return True

    def one_way(self, sess, req: list) -> None:
        """A request with no reply (OP_ACKED) from an agent's session: refused
        ones are logged, not answered (the agent reads no reply to it)."""
        try:
            if not self.role.is_primary or sess.agent != "primary" or len(req) != 3:
                raise errors.ProtocolError("one-way request out of place")
            agent_ops.acked(self, sess, req[1], req[2])
        except errors.ApplianceError:
            self.log.warning("one_way_request_refused", op=req[0], agent=sess.agent, pid=sess.pid,
                             request=repr(req)[:200])

    def request_waits(self, sess, cmd) -> None:
        if cmd is WAIT_COMMIT:
            self.commits.enqueue(sess, sess.txn)
        elif cmd is WAIT_WATCH:
            self.agents.watchers.add(sess)

    def request_aborted(self, sess) -> None:
        if sess.txn is not None and sess.txn.state == "open":
            self.txns.cancel(sess.txn, "internal_error")

    def session_dropped(self, sess) -> None:
        self.agents.dropped(sess)
        self.hold.dropped(sess)
        txn = sess.txn
        if txn is not None and txn.state == "open":
            self.txns.cancel(txn, "client_gone")

    def batch_pending(self) -> bool:
        return bool(self.commits.queue)

    def batch_work(self) -> bool:
        return self.commits.run_batch()

    # ------------------------------------------------------------------ housekeeping

    def housekeeping(self) -> None:
        self.txns.cancel_idle()
        if self.sync.waiting:
            self.sync.tick()
            self.commits.release_backed_up()
        self.readers.sweep({x.pid: x.start for x in self.sessions.values() if x.start is not None})
        self.writer.reclaim()

    def status(self) -> dict:
        return status_mod.status(self)

