"""The log history on disk, as any process reads it ([0085]–[0086]).

A history directory (``replication.history_dir``) holds change-log entries
(format of cext/apl_layout.h, struct apl_centry, back to back), oldest first:

- ``history-<first serial>-<last serial>.lz4``: closed parts, lz4 frames;
- ``history-current.log``: the newest part, uncompressed, appended to by the
  replication agent as entries arrive (so a reader sees them at once, and an
  agent killed at any moment loses nothing it had written); the agent
  compresses it into a closed part when it passes ``history_memory``, then
  puts an empty file in its place (os.replace: a reader that opened the old
  one reads it whole).

The agent writes them (appliance/replication/history.py); the controller
reads them for history, restore, cancel and batch mode's rewind. A part may
begin in the middle of a transaction (its beginning was in a part trimmed
away): readers start at the first BEGIN. A GAP marker (an APL_CE_PAD entry
whose serial is the first one missing, ``ce_txn`` the last one kept before)
says that entries were lost there (the agent was down longer than its
primary's log retained, or a block copy replaced the stream): nothing
before a marker can be restored across it.

Serials of kept entries are increasing and contiguous but for gaps (BLOCK
entries are kept without their image: structure, not data, but a rewind
after a failover needs to know which block numbers changed structure). A
reader that combines the history with the primary's own change-log ring
(:func:`ring_blobs`) drops entries it has seen already by serial.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

import lz4.frame

from .. import errors
from .._native import ffi, lib
from ..store import changelog
from ..store.changelog import E_KIND, E_LEN, E_SERIAL, E_TXN, ENTRY, walk

__all__ = ["FILE", "CURRENT", "part_name", "HistoryDir", "RingCursor", "ring_blobs", "log_blobs", "gap_marker",
           "GAP", "last_serial"]

FILE = re.compile(r"^history-(\d{20})-(\d{20})\.lz4$")
CURRENT = "history-current.log"
#: the kind of a gap marker (see the module docstring)
GAP = lib.APL_CE_PAD

_EXPORT_CHUNK = 4 << 20


def part_name(first: int, last: int) -> str:
    return f"history-{first:020d}-{last:020d}.lz4"


def gap_marker(first_missing: int, last_kept: int) -> bytes:
    """The entry that marks lost entries from serial `first_missing` on."""
    fields = [0] * len(ENTRY.unpack(bytes(ENTRY.size)))
    fields[E_LEN], fields[E_KIND], fields[E_SERIAL], fields[E_TXN] = ENTRY.size, GAP, first_missing, last_kept
    return ENTRY.pack(*fields)


class HistoryDir:
    """A history directory, read from any process."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    def parts(self) -> list[tuple[int, int, Path]]:
        """(first serial, last serial, path) of every closed part, oldest first."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise errors.HistoryError(f"log history {self.dir}: cannot read it: {exc.strerror}",
                                      dir=str(self.dir)) from None
        out = []
        for n in names:
            mm = FILE.match(n)
            if mm:
                out.append((int(mm.group(1)), int(mm.group(2)), self.dir / n))
        return sorted(out)

    def blobs(self, since: int = 0) -> Iterator[bytes]:
        """The parts that may hold serials from `since` on (and the one before
        them, which may hold the start of a transaction that ends there),
        then the current part; each as bytes. Entries may repeat across two
        of them (a part closed while this read): drop them by serial."""
        try:
            cur = open(self.dir / CURRENT, "rb")   # first: what it holds now is this read's
        except FileNotFoundError:
            cur = None
        except OSError as exc:
            raise errors.HistoryError(f"log history {self.dir}: cannot read {CURRENT}: {exc.strerror}",
                                      dir=str(self.dir)) from None
        try:
            parts = self.parts()
            start = 0
            for i, (first, last, _p) in enumerate(parts):
                if last >= since:
                    start = max(0, i - 1)
                    break
            else:
                start = max(0, len(parts) - 1)
            for _first, _last, p in parts[start:]:
                try:
                    data = p.read_bytes()
                except FileNotFoundError:
                    continue   # trimmed meanwhile: older than what is asked for
                yield lz4.frame.decompress(data)   # (one call: a third of the streaming reader's time)
            if cur is not None:
                yield cur.read()
        finally:
            if cur is not None:
                cur.close()


class RingCursor:
    """Reading this appliance's own change log (a primary's ring) from a
    serial on, as exported blobs (full A and B images, no deltas), again and
    again as it grows. Where the ring no longer holds the next serial (it
    was overwritten before it was read) a gap marker comes first and the
    entries go on from the oldest one retained."""

    def __init__(self, reader, since: int, chunk: int = 4 << 20) -> None:
        self.reader = reader
        self.expect = max(since, 1)
        self.pos = None
        self._pos = ffi.new("uint64_t *")
        self._first, self._last, self._count = (ffi.new("uint64_t *") for _ in range(3))
        self.cap = chunk
        self.buf = ffi.new("uint8_t[]", self.cap)

    def _seek(self) -> bool:
        rc = lib.apl_log_seek(self.reader.view, self.expect, self._pos)
        if rc == lib.APL_NOTFOUND:
            return False                  # nothing from there on yet
        if rc == lib.APL_ELOGFULL:
            self._pos[0] = changelog.bounds(self.reader)["tail"]
        elif rc < 0:
            raise errors.error_for("APL_ECORRUPT", f"change log: cannot seek serial {self.expect} ({rc})")
        self.pos = self._pos[0]
        return True

    def blobs(self) -> Iterator[bytes]:
        """What was published since the last call."""
        if self.pos is None and not self._seek():
            return
        while True:
            self._pos[0] = self.pos
            n = lib.apl_log_export(self.reader.view, self._pos, self.buf, self.cap, 0, 0,
                                   self._first, self._last, self._count)
            if n == lib.APL_EBUFSIZE:
                self.cap = max(self.cap * 2, int.from_bytes(bytes(ffi.buffer(self.buf, 8)), "little") + 64)
                self.buf = ffi.new("uint8_t[]", self.cap)
                continue
            if n == lib.APL_ELOGFULL:     # overwritten before it was read
                self.pos = changelog.bounds(self.reader)["tail"]
                continue
            if n < 0:
                raise errors.error_for("APL_ECORRUPT", f"change log: export failed ({n})")
            if n == 0:
                return
            self.pos = self._pos[0]
            if self._first[0] > self.expect:
                yield gap_marker(self.expect, self.expect - 1)
            self.expect = self._last[0] + 1
            yield bytes(ffi.buffer(self.buf, n))


def ring_blobs(reader, since: int) -> Iterator[bytes]:
    """This appliance's change log from serial `since` on, once (RingCursor)."""
    return RingCursor(reader, since).blobs()


def log_blobs(history: HistoryDir | None, reader=None, since: int = 0) -> Iterator[bytes]:
    """What an appliance has of its log from serial `since` on: its history
    directory's parts, then (a primary: `reader` on its own segments) its
    change-log ring from where the history ends. Consumers drop repeated
    serials and stop where they like."""
    kept = 0
    if history is not None:
        for blob in history.blobs(since):
            kept = max(kept, last_serial(blob))
            yield blob
    if reader is not None:
        yield from ring_blobs(reader, max(since, kept + 1))


def last_serial(blob: bytes) -> int:
    """The serial of the last whole entry of `blob` (0: none), read in C."""
    out = ffi.new("uint64_t *")
    lib.apl_entries_start(ffi.from_buffer(blob), len(blob), (1 << 64) - 1, 0, 0, out)
    return out[0]
