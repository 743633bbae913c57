"""Synchronous replication on the primary's controller ([0099]–[0109]).

A committed transaction whose durability asks for acknowledgements keeps its
record locks until enough secondaries report "backup complete" for its
COMMIT serial; its commit() returns then (or at once with wait=False, the
locks still held: Figure 6). Durability is per transaction:

- "quorum" (default): the synchronous secondaries, all of them or k of n
  (``replication.sync_quorum``), minus those degraded by their policy;
- "local": no waiting; "all": every secondary, synchronous or not;
- an int k: any k secondaries.

A synchronous secondary that cannot keep up holds commits ("block", the
default) or, after ``degrade_after`` seconds of holding one, is taken out of
the quorum — loudly: log, status — and back in once it has caught up
("degrade").

A commit that waits has a bound (``commit_timeout``, as TimesTen's RETURN
WAIT TIME; the client sends it): past it the client gets BackupTimeoutError
— committed locally, backup pending — while the records stay locked until
the confirmation comes, as with wait=False. Status lists the waiting commits.

Shared state: none outside the controller's event-loop thread. The agent
reports each secondary's acknowledged serial (at once in shared memory, read
by AgentLink.pull_acks; with the rest of its state in OP_REPL_STATE); this
module decides which waiting transactions are satisfied.
"""
from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field

from .. import errors
from .._os.logs import LogOnce
from ..config import ReplicationConfig

__all__ = ["SyncTracker", "Waiter"]


@dataclass(eq=False)
class Waiter:
    serial: int          # the transaction's COMMIT serial
    txn: object
    durability: object   # "quorum", "all" or an int
    since: float = field(default_factory=time.monotonic)
    replied: bool = False   # the client has its answer (wait=False, or the bound passed)
    session: object = None  # the client's session, for the answer
    result: dict | None = None
    timer: object = None    # the controller's timer for commit_timeout, while it runs


class SyncTracker:
    def __init__(self, rc: ReplicationConfig | None, log) -> None:
        self.log = log
        self.degraded: set[str] = set()
        self.reconfigure(rc)
        self.acked: dict[str, int] = {n: 0 for n in self.secondaries}
        self.state: dict[str, dict] = {n: {"connected": False} for n in self.secondaries}
        self.waiting: list[Waiter] = []
        self.timeouts = LogOnce(log)   # commits answered BackupTimeoutError, logged once per cause
        self.commits: list[tuple[int, float]] = []  # (serial, wall time) of recent commits, for lag
        self.last_serial = 0

    def reconfigure(self, rc: ReplicationConfig | None) -> None:
        """The secondaries' settings (a reload keeps their names: config.RELOADABLE)."""
        self.secondaries = {s.name: s for s in (rc.secondaries if rc else ())}
        self.sync_names = [s.name for s in self.secondaries.values() if s.mode == "sync"]
        self.quorum = rc.sync_quorum if rc else "all"
        for name in [n for n in self.degraded if n not in self.sync_names
                     or self.secondaries[n].on_unreachable != "degrade"]:
            self.degraded.discard(name)   # no longer synchronous, or its policy is "block" now
            self.log.warning("secondary_rejoined_quorum", secondary=name, reason="reload")

    @property
    def enabled(self) -> bool:
        return bool(self.secondaries)

    # -- what a transaction waits for --------------------------------------------------------

    @staticmethod
    def check_durability(d) -> object:
        if d is None:
            return "quorum"
        if d in ("local", "quorum", "all") or (type(d) is int and d >= 0):
            return d
        raise errors.WrongTypeError(f"durability must be 'local', 'quorum', 'all' or a number, not {d!r}")

    def needs_wait(self, durability) -> bool:
        if not self.secondaries or durability == "local" or durability == 0:
            return False
        if durability == "quorum":
            return bool(self._quorum_members())
        return True

    def _quorum_members(self) -> list[str]:
        return [n for n in self.sync_names if n not in self.degraded]

    # -- events ----------------------------------------------------------------------------------

    def committed(self, serial: int) -> None:
        self.last_serial = serial
        self.commits.append((serial, time.time()))
        if len(self.commits) > 100_000:
            del self.commits[: len(self.commits) - 50_000]

    def update(self, states: dict) -> None:
        """The agent's report: {name: {"acked": serial, "connected": bool, ...}}."""
        for name, st in states.items():
            if name not in self.secondaries or not isinstance(st, dict):
                continue
            self.state[name] = st
            a = st.get("acked")
            self.ack(name, a if type(a) is int else 0)

    def ack(self, name: str, serial: int) -> None:
        """A secondary confirmed everything up to `serial` applied."""
        if serial > self.acked[name]:
            self.acked[name] = serial
        if name in self.degraded and self.acked[name] >= self.last_serial and self.state[name].get("connected"):
            self.degraded.discard(name)
            self.log.warning("secondary_rejoined_quorum", secondary=name, acked=self.acked[name])

    def ready(self) -> list[Waiter]:
        """Waiters whose durability is reached now (removed from the list).
        The serial each kind of durability has reached is worked out once per
        call; each waiter is then one comparison."""
        reached: dict = {}
        done, keep = [], []
        for w in self.waiting:
            d = w.durability
            r = reached.get(d)
            if r is None:
                r = reached[d] = self._reached(d)
            (done if w.serial <= r else keep).append(w)
        self.waiting = keep
        if done and not keep:
            self.timeouts.clear()   # the backlog drained: the next timeout is news
        return done

    def _reached(self, d) -> float:
        """The highest serial durability `d` is satisfied up to (inf: every serial)."""
        if d == "quorum":
            members = self._quorum_members()
            if not members:
                return float("inf")   # every synchronous secondary is degraded: go on without them
            k = len(members) if self.quorum == "all" else min(self.quorum, len(members))
            acks = [self.acked[n] for n in members]
        elif d == "all":
            k, acks = len(self.acked), list(self.acked.values())
        else:
            k, acks = min(d, len(self.secondaries)), list(self.acked.values())
        if k <= 0:
            return float("inf")
        return sorted(acks, reverse=True)[k - 1]   # the k-th best acknowledgement

    def missing(self, w: Waiter) -> list[str]:
        """The secondaries whose confirmation `w` still needs (those behind its serial)."""
        names = self._quorum_members() if w.durability == "quorum" else list(self.secondaries)
        return sorted(n for n in names if self.acked[n] < w.serial)

    def timed_out(self, w: Waiter, after_s: float) -> errors.BackupTimeoutError:
        """The answer for a commit whose bound passed before its backup
        (logged once per set of missing secondaries, with a count after)."""
        missing = self.missing(w)
        self.timeouts.error("commit_backup_timeout", tuple(missing), txn=w.txn.number, serial=w.serial,
                            after_s=after_s, waiting_for=missing)
        return errors.BackupTimeoutError(
            f"commit of transaction {w.txn.number}: committed on this primary (serial {w.serial}) but "
            f"{', '.join(missing) or 'its secondaries'} did not confirm the backup within {after_s:g} s; "
            "its records stay locked until they do (or their on_unreachable policy degrades them). "
            "Do not retry it: it is committed", txn=w.txn.number, serial=w.serial,
            version=(w.result or {}).get("version"), waiting_for=", ".join(missing), after_s=after_s)

    def tick(self) -> None:
        """Degrade synchronous secondaries that hold a commit too long (policy "degrade")."""
        if not self.waiting:
            return
        now = time.monotonic()
        oldest = min(self.waiting, key=lambda w: w.serial)
        for name in self.sync_names:
            sec = self.secondaries[name]
            if name in self.degraded or sec.on_unreachable != "degrade":
                continue
            if self.acked[name] < oldest.serial and now - oldest.since >= sec.degrade_after:
                self.degraded.add(name)
                self.log.error("secondary_degraded", secondary=name, acked=self.acked[name],
                               waiting_serial=oldest.serial, after_s=sec.degrade_after,
                               connected=self.state[name].get("connected", False))

    # -- status --------------------------------------------------------------------------------

    def lag(self, name: str) -> dict:
        """Commits not acknowledged by `name`, and how long the oldest of them
        has waited (self.commits is in serial order: a binary search, not a walk)."""
        acked = self.acked[name]
        first = bisect.bisect_right(self.commits, (acked, math.inf))
        behind = len(self.commits) - first
        return {"transactions": behind,
                "seconds": round(time.time() - self.commits[first][1], 3) if behind else 0.0}

    def status(self) -> dict:
        out = {}
        for name, sec in self.secondaries.items():
            st = self.state.get(name, {})
            lag = self.lag(name)
            lag["bytes"] = st.get("lag_bytes", 0)
            out[name] = {
                "mode": sec.mode,
                "address": sec.address,
                "connected": bool(st.get("connected")),
                "state": st.get("state", "unknown"),
                "healthy": bool(st.get("connected")) and name not in self.degraded and st.get("state") == "streaming",
                "degraded": name in self.degraded,
                "acked_serial": self.acked[name],
                "lag": lag,
                "copy": st.get("copy"),
                "copies": st.get("copies", 0),
                "attempts": st.get("attempts", 0),   # connection attempts failed since the link was up
                "warning": st.get("warning"),
                "error": st.get("error"),
                # batch mode: its acknowledgements mean received and kept, not applied
                "batch": bool(st.get("batch")),
            }
        now = time.monotonic()
        oldest = sorted(self.waiting, key=lambda w: w.serial)[:100]
        return {"role": "primary", "quorum": self.quorum, "secondaries": out,
                "waiting_commits": len(self.waiting),
                # the oldest (at most 100) commits whose records wait for their backup
                "waiting": [{"txn": w.txn.number, "serial": w.serial, "durability": w.durability,
                             "waiting_s": round(now - w.since, 3), "answered": w.replied,
                             "waiting_for": self.missing(w)} for w in oldest]}
