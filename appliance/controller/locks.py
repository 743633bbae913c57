"""Record locks: exclusive, held by transactions, granted in FIFO order.

Shared state: the lock table below. Writer and reader: the controller's one
event-loop thread only, so there is no concurrency inside this module; what
"waiting" means here is that a session's request is parked until the lock is
granted (``on_grant`` callback) or its deadline passes.

A key is ``(file id, encoded primary key)``. Locking a key that has no record
is allowed and meaningful: it stops two transactions from inserting the same
key. Reads without ``for_update`` take no lock (they read shared memory).

Deadlocks. Every waiting transaction waits for exactly one lock, and every
lock has one holder, so the wait-for graph is a set of chains: a request
closes a cycle exactly when following "waits for the holder of" from the
lock's holder leads back to the requester. The requester is then the victim
(it is the one that would close the cycle), which keeps the check O(chain).
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Hashable, Protocol

__all__ = ["LockManager", "Owner", "GRANTED", "WAITING", "DEADLOCK"]

GRANTED = 0
WAITING = 1
DEADLOCK = 2


class Owner(Protocol):
    """A transaction as the lock manager sees it."""

    locks: set
    waiting_for: Hashable | None


class _Lock:
    __slots__ = ("holder", "waiters")

    def __init__(self, holder) -> None:
        self.holder = holder
        self.waiters: deque | None = None  # (owner, on_grant), made when the first one waits


class LockManager:
    def __init__(self) -> None:
        self._locks: dict[Hashable, _Lock] = {}
        self.waits = 0
        self.deadlocks = 0

    def __len__(self) -> int:
        return len(self._locks)

    def holder(self, key: Hashable):
        lk = self._locks.get(key)
        return lk.holder if lk else None

    def acquire(self, owner, key: Hashable, on_grant: Callable[[], None]) -> int:
        """GRANTED (now), WAITING (on_grant() runs when it is), or DEADLOCK."""
        lk = self._locks.get(key)
        if lk is None:
            self._locks[key] = _Lock(owner)
            owner.locks.add(key)
            return GRANTED
        if lk.holder is owner:
            return GRANTED
        # would waiting close a cycle?
        x = lk.holder
        seen = 0
        while x is not None and x.waiting_for is not None and seen < 1_000_000:
            if x is owner:
                break
            nxt = self._locks.get(x.waiting_for)
            x = nxt.holder if nxt else None
            seen += 1
        if x is owner:
            self.deadlocks += 1
            return DEADLOCK
        if lk.waiters is None:
            lk.waiters = deque()
        lk.waiters.append((owner, on_grant))
        owner.waiting_for = key
        self.waits += 1
        return WAITING

    def cancel_wait(self, owner) -> None:
        key = owner.waiting_for
        if key is None:
            return
        owner.waiting_for = None
        lk = self._locks.get(key)
        if lk and lk.waiters:
            lk.waiters = deque(w for w in lk.waiters if w[0] is not owner)

    def release_all(self, owner) -> list[Callable[[], None]]:
        """Release every lock of `owner`; returns the grant callbacks to run
        (the caller runs them after its own bookkeeping)."""
        self.cancel_wait(owner)
        grants = []
        for key in owner.locks:
            lk = self._locks.get(key)
            if lk is None or lk.holder is not owner:
                continue
            if lk.waiters:
                nxt, cb = lk.waiters.popleft()
                lk.holder = nxt
                nxt.waiting_for = None
                nxt.locks.add(key)
                grants.append(cb)
            else:
                del self._locks[key]
        owner.locks = set()
        return grants
