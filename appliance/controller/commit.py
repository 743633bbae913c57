"""Group commit, and the release of synchronous commits.

A committing transaction joins the queue (``WAIT_COMMIT``, or the fast
path's ``FAST``); once a loop turn has served every session, the whole queue
is applied in one batch — one C call per transaction (txn.Committer) — and
published as one version (one location-table publication for everything that
arrived together). Then each transaction's client is answered, unless its
durability asks for acknowledgements from secondaries ([0099]–[0109]): then
it waits in ``sync.waiting`` with its record locks held ([0104]) until the
secondaries confirm its COMMIT serial (:meth:`GroupCommit.release_backed_up`),
its bound passes (``commit_timeout``: BackupTimeoutError, still locked), or
the policy degrades a secondary.

Integrity first: an unexpected failure while a batch is open ends the
process without publishing; the restarted controller rolls the batch back.
"""
from __future__ import annotations

import os
import time

from .. import errors
from ..wire import messages as m
from .loop import FAST, WAIT_COMMIT, plain
from .sync import Waiter
from .txn import Committer, Txn

__all__ = ["GroupCommit"]


class GroupCommit:
    def __init__(self, ctl) -> None:
        self.ctl = ctl
        self.log = ctl.log
        self.committer = Committer(ctl.writer)
        self.queue: list = []          # (session, txn) waiting for the next batch
        self.batches = 0
        self.paused = False            # commits wait (a primary repairing blocks from a secondary: repair.py)

    def enqueue(self, sess, txn: Txn) -> None:
        self.queue.append((sess, txn))

    def commit(self, txn: Txn, wait: bool = True, durability="quorum", bound: float | None = None):
        """COMMIT of an open transaction (a generator: it waits for the batch)."""
        txn.durability = durability
        txn.wait = wait
        txn.commit_timeout = bound
        effective = any(c.after != c.before for c in txn.changes.values())
        if not effective:
            txn.state = "committed"
            self.ctl.txns.active.pop(txn.number, None)
            self.ctl.txns.release(txn)
            return {"txn": txn.number, "serial": None, "version": self.ctl.att.sb.sb_version}
        txn.state = "committing"
        result = yield WAIT_COMMIT
        return result

    def run_batch(self) -> bool:
        """Apply and publish every queued transaction as one batch; False when none waited."""
        if not self.queue or self.paused:
            return False
        ctl = self.ctl
        if not ctl.role.writable:    # fenced while these waited: nothing more is applied (recovery.py)
            ctl.failover.refuse_writes()
            return True
        txns, sync = ctl.txns, ctl.sync
        queue, self.queue = self.queue, []
        wr = ctl.writer
        now = time.time_ns()
        outcomes = []
        last = 0
        wr.begin()
        try:
            for sess, txn in queue:
                try:
                    serial = self.committer.apply(txn, now)
                    outcomes.append((sess, txn, serial, None))
                    last = max(last, txn.number)
                except (errors.MemoryFullError, errors.RecordTooLargeError, errors.KeyTooLongError,
                        errors.DamagedBlockError) as e:
                    outcomes.append((sess, txn, None, e))
                except errors.InternalError as e:
                    if e.code != "APL_ELOGFULL":
                        raise  # APL_EUNDO and the like: do not publish (below)
                    outcomes.append((sess, txn, None, e))
            version = wr.publish(now, last)
        except BaseException:
            self.log.critical("commit_batch_failed_exiting", exc_info=True)
            os._exit(errors.EXIT_SOFTWARE)  # the restarted controller rolls the unpublished batch back
        self.batches += 1
        for sess, txn, serial, exc in outcomes:
            if exc is not None:
                exc = errors.error_for(exc.code, f"commit of transaction {txn.number}: "
                                       f"{exc.message.split(': ', 1)[-1]}; the transaction was cancelled",
                                       txn=txn.number)
                txns.finished(txn, "cancelled")
                txns.release(txn)
                self.reply(sess, txn, None, exc)
                continue
            txns.finished(txn, "committed")
            result = {"txn": txn.number, "serial": serial, "version": version}
            if sync.enabled:
                sync.committed(serial)
            d = txn.durability
            if sync.needs_wait(d):
                # backup first: the records stay locked until the secondaries confirm ([0104])
                w = Waiter(serial, txn, d, session=sess, result=result)
                sync.waiting.append(w)
                if not txn.wait:
                    w.replied = True
                    self.reply(sess, txn, dict(result, backup="pending"), None)
                elif txn.commit_timeout is not None:
                    w.timer = ctl.add_timer(txn.commit_timeout, lambda w=w: self._backup_timed_out(w))
                continue
            txns.release(txn)
            self.reply(sess, txn, result, None)
        if sync.waiting:
            self.release_backed_up()
        ctl.published()
        wr.reclaim()
        return True

    def reply(self, sess, txn: Txn, result, exc) -> None:
        ctl = self.ctl
        if sess.gen is FAST:
            sess.gen = None
            if exc is None:
                result["results"] = txn.results
                ctl.send(sess, m.ok(result))
            else:
                ctl.send(sess, m.err(exc.code, exc.message, plain({**exc.details, "txn": txn.number})))
            ctl.pump_later(sess)
        elif exc is None:
            ctl.resume(sess, result)
        else:
            ctl.resume(sess, exc=exc)

    def release_backed_up(self) -> None:
        """Release the synchronous commits their secondaries have confirmed."""
        ctl = self.ctl
        for w in ctl.sync.ready():
            if w.timer is not None:
                ctl.cancel_timer(w.timer)
            ctl.txns.release(w.txn)
            if not w.replied:
                w.replied = True
                self.reply(w.session, w.txn, w.result, None)

    def _backup_timed_out(self, w: Waiter) -> None:
        """A commit's bound (commit_timeout) passed before its backup was
        confirmed: answer BackupTimeoutError (committed here, the backup
        pending); it stays in sync.waiting, its records locked, until the
        confirmation or the policy releases it (release_backed_up)."""
        w.timer = None
        if w.replied or w not in self.ctl.sync.waiting:
            return
        w.replied = True
        self.reply(w.session, w.txn, None, self.ctl.sync.timed_out(w, w.txn.commit_timeout))
