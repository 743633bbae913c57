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
- ``failover`` promote, fence, rejoin and rewind (:mod:`.recovery`);
- ``repairs``  the local block check and repairs from a peer (:mod:`.repair`);
- ``devices``  storage devices taken out of service and replaced (:mod:`.devices`);
- ``readers``  reader slots and the memory old pins hold (:mod:`.readers`);
- ``hold``     new writes held while a recovery operation runs (:mod:`.hold`);
- ``history``  history, restore and cancel from the log history (:mod:`.history`);
- ``batch``    a secondary's referential batch mode (:mod:`.batch`);
- ``durable``  log files and checkpoints on disk, when [durability] is set (:mod:`.durable`);

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
from ..store.prefault import Prefault
from ..store.reader import Reader
from ..store.records import Schema
from ..store.segment import SHM_DIR, huge_pages_status
from ..wire import messages as m
# (these modules fill the op table)
from . import agent_ops, apply, batch, durable, health, history, statements, status as status_mod  # noqa: F401
from .agent_ops import AgentLink
from .apply import SecondaryApply
from .batch import BatchMode
from .commit import GroupCommit
from .devices import Devices
from .history import HistoryOps
from .hold import WriteHold
from .locks import LockManager
from .loop import WAIT_COMMIT, WAIT_WATCH, Loop, plain
from .ops import HANDLERS, check, dispatch
from .readers import ReaderSlots
from .recovery import Failover
from .repair import Repairs
from .role import Role
from .statements import LATER, Transactions
from .sync import SyncTracker

__all__ = ["Controller"]

#: coroutine ops the fast path carries out when they need not wait (see fast_request)
_NOW = m.STEP_OPS | {m.OP_COMMIT}
HUGE_PAGES_HINT = 1 << 30    # segments this large without huge pages: say how to get them (once, at start)


class Controller(Loop):
    def __init__(self, cfg: Config, writer, log, *, recovery: dict | None = None, created: bool = False,
                 files=None) -> None:
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
        self.failover = Failover(self)
        self.repairs = Repairs(self)
        self.devices = Devices(self)
        self.hold = WriteHold(self)
        self.history = HistoryOps(self)
        self.batch = BatchMode(self)
        self.role.on_change(self._role_changed)
        self.durable = durable.Durable(self, files) if files is not None else None
        self.prefault: Prefault | None = None
        self.huge_pages: dict | None = None     # huge_pages_status of the current segments (start_prefault)

    def start_prefault(self) -> None:
        """Map the device segments' pages ahead of use (storage.prefault), the
        current ones: a promote that made new segments calls it again."""
        if self.prefault is not None:
            self.prefault.stop()
        if self.cfg.storage.prefault:
            self.prefault = Prefault(self.att.devices, self.log).start()
        # the pages the segments got are fixed when they are made: read /dev/shm's policy once per set
        self.huge_pages = hp = huge_pages_status(self.att.devices)
        if hp["of"] >= HUGE_PAGES_HINT and not hp["bytes"]:
            self.log.info("huge_pages_off", dev_shm=hp["dev_shm"], segment_bytes=hp["of"],
                          fix=f"mount -o remount,huge=within_size {SHM_DIR} (README: Huge pages)")

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
        """Carry out without a coroutine what needs no wait, after the same
        checks (ops.check): a handler that is a plain function, a statement
        whose lock is free or its own, a commit (answered by the batch, as a
        fast autocommit is), an OP_ATOMIC whose records are not locked.
        False: the general path (dispatch) takes the request."""
        op = req[0]
        if op == m.OP_ATOMIC:
            if not self.role.writable or self.hold.holder is not None:
                # a secondary, a fenced primary: refused by the general path; held writes: it waits there
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
        h = HANDLERS.get(op)
        if h is None or (h.generator and op not in _NOW) or (h.new_txn and self.hold.holder is not None):
            return False
        try:
            h = check(self, sess, req)
            if not h.generator:
                r = h.fn(self, sess, *req[1:])
            elif op == m.OP_COMMIT:
                r = self.txns.commit_now(sess, *req[1:])
            else:
                r = self.txns.statement_now(sess, op, req[1:])
            if r is LATER:
                if op == m.OP_COMMIT:
                    return True     # queued for the batch, which answers it (sess.gen is FAST)
                return False        # another transaction's lock: the general path waits for it
        except errors.ApplianceError as e:
            self.send(sess, m.err(e.code, e.message, plain(e.details)))
        except Exception as e:  # a bug: what Loop._step does with one
            sess.gen = None
            self.request_aborted(sess)
            self.request_failed(sess, e)
        else:
            self.send(sess, m.ok(r))
        sess.idle_ns = time.monotonic_ns()
        return True

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
        return bool(self.commits.queue) and not self.commits.paused

    def batch_work(self) -> bool:
        return self.commits.run_batch()

    # ------------------------------------------------------------------ housekeeping

    def housekeeping(self) -> None:
        self.txns.cancel_idle()
        self.agents.pull_acks()   # acknowledgements nobody waited for: status, lag, a degraded one's return
        if self.sync.waiting:
            self.sync.tick()
            self.commits.release_backed_up()
        self.readers.sweep({x.pid: x.start for x in self.sessions.values() if x.start is not None})
        self.writer.reclaim()
        if self.durable is not None:
            self.durable.housekeeping()

    def close(self) -> None:
        if self.prefault is not None:
            self.prefault.stop()   # before the segments are unmapped
        super().close()
        if self.durable is not None:
            self.durable.close()   # before the segments go: a checkpoint reads them

    def status(self) -> dict:
        return status_mod.status(self)

