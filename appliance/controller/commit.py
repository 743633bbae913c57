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
the policy degrades a secondary. With [durability] and ``log_sync =
"commit"`` the answer also waits for the batch's log record to be on disk
(:mod:`.durable`): after the secondaries confirmed, if it waits for them too.
A disk that refuses the log makes the batch refuse its transactions before
applying them.

Integrity first: an unexpected failure while a batch is open ends the
process without publishing; the restarted controller rolls the batch back.
"""
from __future__ import annotations

import os
import time

from .. import errors
from ..wire import messages as m
from .latency import CommitLatency
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
        self.latency = CommitLatency()  # queued -> published, per transaction (status, metrics)

    def enqueue(self, sess, txn: Txn) -> None:
        txn.queued_ns = time.monotonic_ns()
        self.queue.append((sess, txn))

    def start(self, txn: Txn, wait: bool = True, durability="quorum", bound: float | None = None) -> dict | None:
        """Begin the COMMIT of an open transaction: its result when it changes
        nothing (committed at once, nothing logged), else None: it is
        "committing" and must join the next batch (commit() yields WAIT_COMMIT,
        the fast paths queue it with sess.gen FAST)."""
        txn.durability = durability
        txn.wait = wait
        txn.commit_timeout = bound
        if not txn.changed():
            txn.state = "committed"
            self.ctl.txns.active.pop(txn.number, None)
            self.ctl.txns.release(txn)
            return {"txn": txn.number, "serial": None, "version": self.ctl.att.sb.sb_version}
        txn.state = "committing"
        return None

    def commit(self, txn: Txn, wait: bool = True, durability="quorum", bound: float | None = None):
        """COMMIT of an open transaction (a generator: it waits for the batch)."""
        done = self.start(txn, wait, durability, bound)
        if done is not None:
            return done
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
        durable = ctl.durable
        refused = durable.refusal() if durable is not None else None
        wr.begin()
        try:
            for sess, txn in queue:
                if refused is not None:
                    outcomes.append((sess, txn, None, refused))
                    continue
                try:
                    serial = self.committer.apply(txn, now)
                    outcomes.append((sess, txn, serial, None))
                    last = max(last, txn.number)
                except (errors.MemoryFullError, errors.RecordTooLargeError, errors.KeyTooLongError,
                        errors.DamagedBlockError, errors.DeviceUnavailableError) as e:
                    outcomes.append((sess, txn, None, e))
                except errors.InternalError as e:
                    if e.code != "APL_ELOGFULL":
                        raise  # APL_EUNDO and the like: do not publish (below)
                    outcomes.append((sess, txn, None, e))
            version = wr.publish(now, last)
            if durable is not None:
                durable.published(len(outcomes))    # the batch's log record, to the writer thread
        except BaseException:
            self.log.critical("commit_batch_failed_exiting", exc_info=True)
            os._exit(errors.EXIT_SOFTWARE)  # the restarted controller rolls the unpublished batch back
        self.batches += 1
        self.latency.observe(queue)
        for sess, txn, serial, exc in outcomes:
            if exc is not None:
                exc = errors.error_for(exc.code, f"commit of transaction {txn.number}: "
                                       f"{exc.message.split(': ', 1)[-1]}; the transaction was cancelled",
                                       **{**exc.details, "txn": txn.number})
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
                    self.answer(sess, txn, dict(result, backup="pending"), serial)
                elif txn.commit_timeout is not None:
                    w.timer = ctl.add_timer(txn.commit_timeout, lambda w=w: self._backup_timed_out(w))
                continue
            txns.release(txn)
            self.answer(sess, txn, result, serial)
        if sync.waiting:
            self.release_backed_up()
        ctl.published()
        wr.reclaim()
        return True

    def answer(self, sess, txn: Txn, result: dict, serial: int) -> None:
        """Answer a committed transaction, once its log record is on disk
        when the appliance is durable (durable.when_durable)."""
        durable = self.ctl.durable
        if durable is None:
            self.reply(sess, txn, result, None)
            return

        def done(exc) -> None:
            if exc is None:
                self.reply(sess, txn, result, None)
            else:
                self.reply(sess, txn, None, type(exc)(
                    f"commit of transaction {txn.number} (serial {serial}): {exc.message}", code=exc.code,
                    **{**exc.details, "txn": txn.number, "serial": serial, "version": result["version"]}))
        durable.when_durable(serial, done)

    def reply(self, sess, txn: Txn, result, exc) -> None:
        ctl = self.ctl
        if sess.gen is FAST:
            sess.gen = None
            if exc is None:
                if txn.results is not None:     # an autocommit's: what each step answered
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
        """Release the synchronous commits their secondaries have confirmed.
        The acknowledgements are read from the agent's shared memory each
        round, after posting the lowest serial still waiting (pull_acks): the
        last round posts what the agent must signal for next."""
        ctl = self.ctl
        while True:
            ctl.agents.pull_acks()
            ready = ctl.sync.ready() if ctl.sync.waiting else ()
            if not ready:
                return
            for w in ready:
                if w.timer is not None:
                    ctl.cancel_timer(w.timer)
                ctl.txns.release(w.txn)
                if not w.replied:
                    w.replied = True
                    self.answer(w.session, w.txn, w.result, w.serial)

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
