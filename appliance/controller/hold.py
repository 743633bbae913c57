"""Holding new writes while a recovery operation runs (restore, cancel,
rerun): OP_HOLD.

A session takes the hold; from then on every request of another session
that would start a transaction (BEGIN, ATOMIC, LOAD, the fast path's
autocommits) waits (``WAIT_HOLD``) until the holder ends it or its session
goes away. Transactions already open go on to their commit or cancel: the
hold is only granted once none is left (waiting up to a bound, then refused
with BusyError naming them), so the holder sees one state nobody else
changes until it lets go. Reads never wait: they do not go through the
controller.

Shared: nothing outside the controller's loop thread; the holder and the
queue of waiting sessions are this object's, read by ops.dispatch and the
fast path (Controller.fast_request) and changed only here.
"""
from __future__ import annotations

import time
from collections import deque

from .. import errors
from .loop import WAIT_HOLD

__all__ = ["WriteHold"]

_POLL_S = 0.01


class WriteHold:
    def __init__(self, ctl) -> None:
        self.ctl = ctl
        self.log = ctl.log
        self.holder = None              # the session holding new writes, or None
        self.what = ""                  # what it holds them for (status)
        self.since = 0.0
        self.waiting: deque = deque()   # sessions whose new writes wait

    def admit(self, sess):
        """A new write of `sess` while another session holds writes: wait."""
        while self.holder is not None and self.holder is not sess:
            self.waiting.append(sess)
            yield WAIT_HOLD
        return None

    def acquire(self, sess, what: str, timeout: float):
        """Take the hold for `sess` (a generator): wait for another holder to
        end, then until no other session's transaction is open or committing."""
        ctl = self.ctl
        deadline = time.monotonic() + timeout
        while self.holder is not None and self.holder is not sess:
            if time.monotonic() > deadline:
                raise errors.BusyError(f"{what}: another recovery operation ({self.what}) holds writes on "
                                       f"{ctl.cfg.name!r}; try again when it ends", holder=self.what)
            yield from self._pause(sess)
        self.holder, self.what, self.since = sess, what, time.monotonic()
        self.log.warning("writes_held", what=what, pid=sess.pid)
        try:
            while True:
                others = [t for t in ctl.txns.active.values() if t.session is not sess]
                if not others and not ctl.commits.queue and not ctl.sync.waiting:
                    return   # (commits waiting for their backup hold their records' locks)
                if time.monotonic() > deadline:
                    shown = ", ".join(f"{t.number} ({t.state}, pid {t.session.pid if t.session else '?'})"
                                      for t in others[:10]) or \
                        f"{len(ctl.sync.waiting)} commits waiting for their backup"
                    raise errors.BusyError(
                        f"{what}: transactions still open after {timeout:g} s: {shown}; nothing was changed "
                        "(retry, or end them first)", transactions=shown)
                yield from self._pause(sess)
        except BaseException:
            self.release(sess)
            raise

    def _pause(self, sess):
        ctl = self.ctl
        timer = ctl.add_timer(_POLL_S, lambda: ctl.resume(sess))
        try:
            yield WAIT_HOLD
        finally:
            ctl.cancel_timer(timer)

    def release(self, sess) -> None:
        """`sess` lets go (it ended its operation, or went away)."""
        if self.holder is not sess:
            return
        self.log.warning("writes_released", what=self.what, held_s=round(time.monotonic() - self.since, 3))
        self.holder, self.what = None, ""
        waiting, self.waiting = self.waiting, deque()
        for s in waiting:
            self.ctl.resume(s)

    def dropped(self, sess) -> None:
        self.release(sess)

    def status(self) -> dict | None:
        if self.holder is None:
            return None
        return {"what": self.what, "pid": self.holder.pid, "held_s": round(time.monotonic() - self.since, 3),
                "writes_waiting": len(self.waiting)}
