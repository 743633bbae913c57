"""Commit latency, as a histogram the loop keeps: from a transaction joining
the group-commit queue (its COMMIT, or a one-statement autocommit) to its
batch being published. A synchronous commit's wait for its secondaries comes
after that and is not in it (status: ``replication.waiting``).

Owned by the loop thread: :meth:`CommitLatency.observe` runs once per batch
(a clock read, then a bisect and two additions per transaction); status and
the metrics endpoint read a copy (:meth:`CommitLatency.snapshot`), never
these lists.
"""
from __future__ import annotations

import bisect
import time

__all__ = ["CommitLatency", "BOUNDS_S"]

#: upper bounds of the buckets, in seconds (the last bucket, +Inf, is implicit)
BOUNDS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class CommitLatency:
    __slots__ = ("_bounds_ns", "counts", "sum_ns", "count")

    def __init__(self) -> None:
        self._bounds_ns = [int(b * 1e9) for b in BOUNDS_S]
        self.counts = [0] * (len(BOUNDS_S) + 1)   # per bucket, not cumulative
        self.sum_ns = 0
        self.count = 0

    def observe(self, queue) -> None:
        """The transactions of a batch just published: (session, txn) pairs."""
        now = time.monotonic_ns()
        bounds, counts = self._bounds_ns, self.counts
        total = 0
        for _, txn in queue:
            d = now - txn.queued_ns
            counts[bisect.bisect_left(bounds, d)] += 1
            total += d
        self.sum_ns += total
        self.count += len(queue)

    def snapshot(self) -> dict:
        """Cumulative buckets as Prometheus counts them: le (s) -> commits at most that long."""
        cum, acc = [], 0
        for c in self.counts:
            acc += c
            cum.append(acc)
        return {"le": list(BOUNDS_S), "cumulative": cum, "sum_s": self.sum_ns / 1e9, "count": self.count}
