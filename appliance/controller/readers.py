"""The controller's bookkeeping of reader slots.

The readers segment is group-writable (readers record their pins there), so
the controller trusts nothing a client can write in it (cext/apl_layout.h,
"Readers' consistent access"). Once a housekeeping round, on the controller's
loop thread (nothing here is shared with another thread):

- slots of processes that are gone — no such pid, or the pid now names a
  process with another start time — are cleared (apl_sweep_readers);
- a slot is *owned* when the controller verified its (pid, start time)
  through a connected session (SO_PEERCRED pid at HELLO): now, or earlier,
  even under a previous controller (the record is in the meta segment, which
  only the controller writes). A slot that no verified owner and no session
  holds, found so in two rounds in a row, is cleared: its pin stops holding
  memory and the slot is free again (forged slots, readers that never said
  HELLO);
- the oldest pin is named for status (pid, slot, age), and a warning is
  logged when the old versions kept for readers take a quarter of the memory
  that holds no live data, well before memory runs out.
"""
from __future__ import annotations

import os
import time

from .._native import lib

__all__ = ["ReaderSlots"]

_PENDING = lib.APL_PIN_PENDING
_BUSY = lib.APL_PID_BUSY
#: old versions held for readers worth a warning: this share of the slots holding no live data ...
WARN_SHARE = 0.25
#: ... and at least this many slots
WARN_MIN_SLOTS = 64


class ReaderSlots:
    def __init__(self, writer, log, block_size: int, compressed: bool) -> None:
        self.writer = writer
        self.log = log
        self.block_size = block_size
        self.compressed = compressed
        self.pid = os.getpid()
        self.swept = 0                      # slots cleared for want of an owner, over the controller's life
        self.in_use = 0
        self.oldest: dict | None = None     # the oldest pin: pid, slot, version, age_s
        self.warning: str | None = None
        self._suspects: set[tuple[int, int, int]] = set()   # (slot, pid, gen) found unowned last round
        self._pinned_since: dict[tuple[int, int, int], int] = {}   # (slot, gen, pin) -> first seen (ns)
        self._swept_pids: tuple = ()
        self._warned: tuple | None = None   # (pid, slot) of the oldest pin last warned about
        self._warnings = 0

    def sweep(self, sessions: dict[int, int]) -> None:
        """One round; `sessions` maps the pid of every connected session to its start time."""
        self.writer.sweep_readers()
        now = time.time_ns()
        suspects, cleared, pinned = set(), [], {}
        oldest = None
        slots = self.writer.readers()
        for sl in slots:
            if sl.pid == _BUSY:
                continue
            if sl.pid != self.pid and not sl.owned:
                start = sessions.get(sl.pid)
                if start is not None and (not start or not sl.start or start == sl.start):
                    self.writer.own_reader(sl.slot, sl.pid, sl.start)
                elif (sl.slot, sl.pid, sl.gen) in self._suspects:
                    if self.writer.clear_reader(sl.slot, sl.pid, sl.gen):
                        cleared.append(sl.pid)
                    continue
                else:
                    suspects.add((sl.slot, sl.pid, sl.gen))
            if sl.pin and sl.pin != _PENDING:
                key = (sl.slot, sl.gen, sl.pin)
                pinned[key] = self._pinned_since.get(key, now)
                since = sl.since_ns or pinned[key]
                if oldest is None or sl.pin < oldest["version"]:
                    oldest = {"pid": sl.pid, "slot": sl.slot, "version": sl.pin,
                              "age_s": round(max(0, now - since) / 1e9, 1),
                              "snapshot": sl.kind == 2}
        self._suspects, self._pinned_since = suspects, pinned
        self.in_use = len(slots) - len(cleared)
        self.oldest = oldest
        if cleared:
            self.swept += len(cleared)
            pids = tuple(sorted(set(cleared)))
            if pids != self._swept_pids:   # once per set of pids, with the running count
                self.log.warning("reader_slots_swept", reason="no_session", slots=len(cleared),
                                 pids=list(pids[:8]), total=self.swept)
                self._swept_pids = pids
        self._check_memory()

    def _check_memory(self) -> None:
        st = self.writer.stats()
        held, free = st["retained"], st["slots_free"]
        if self.compressed or self.oldest is None or held < WARN_MIN_SLOTS or held < WARN_SHARE * (free + held):
            if self._warned is not None:
                self.log.info("readers_hold_old_versions_cleared", warnings=self._warnings)
                self._warned = None
            self.warning = None
            return
        o = self.oldest
        self.warning = (f"pid {o['pid']} (reader slot {o['slot']}) pins version {o['version']} for "
                        f"{o['age_s']} s: old versions take {held * self.block_size} bytes, "
                        f"{free * self.block_size} bytes free")
        if self._warned != (o["pid"], o["slot"]):
            self._warnings += 1
            self.log.warning("readers_hold_old_versions", pid=o["pid"], slot=o["slot"], version=o["version"],
                             age_s=o["age_s"], old_versions_bytes=held * self.block_size,
                             free_bytes=free * self.block_size, warnings=self._warnings)
            self._warned = (o["pid"], o["slot"])

    def status(self, st: dict, nslots: int) -> dict:
        """The status lines about readers and pins (st: the writer's stats)."""
        o = self.oldest or {}
        return {"active": st["readers_active"], "oldest_pin": st["oldest_pin"],
                "oldest_pin_pid": o.get("pid"), "oldest_pin_slot": o.get("slot"),
                "oldest_pin_age_s": o.get("age_s"), "slots_in_use": self.in_use, "slots": nslots,
                "old_versions_bytes": 0 if self.compressed else st["retained"] * self.block_size,
                "swept": self.swept, "warning": self.warning}
