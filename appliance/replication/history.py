"""Keeping the log history ([0085]–[0086]): B logs and T logs (and A logs
when configured) for a configured period, so an operator can go back in time
(apply B logs in reverse) or re-run transactions (T logs) after a program is
fixed. The agent of either appliance keeps it: a secondary from the stream
it receives, a primary from its own change log (history_dir on either).

The format and how other processes read it: appliance/recovery/history.py.
Entries are appended to the current part as they come (A images left out
unless ``history_a_logs``; a BLOCK entry is kept without its image —
structure, not data — so the serials have no gap and a rewind after a
failover knows which block numbers changed structure: see
controller/recovery.py); past ``history_memory`` (or a minute) the current
part is compressed into a closed lz4 part. Parts older than
``history_period`` are deleted; past ``history_disk`` the oldest are deleted
too, with a warning from 80% on. Entries that never reached the history (a
gap: the agent was down longer than its primary's log retained, or a block
copy replaced the stream) are marked with a GAP entry at the start of a new
part, so the rewind window starts after it.

A restarted agent knows the last serial its history holds and asks its
primary (or its own change log) to resume from there, so the history has no
gap as long as the entries are still retained.

Shared: the directory, read by the controller and the CLI while this
writes. Closed parts are complete once renamed into place; the current part
is only appended to, and replaced (never truncated) when closed, so a reader
always reads whole entries (a torn last entry is not walked).
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import lz4.frame

from .._native import lib
from ..errors import ConfigError
from ..recovery.history import CURRENT, GAP, HistoryDir, gap_marker, part_name
from ..store.changelog import E_ALEN, E_BLEN, E_KIND, E_KLEN, E_LEN, E_SERIAL, E_TIME, ENTRY, walk

__all__ = ["History"]

_KEEP = {lib.APL_CE_BEGIN, lib.APL_CE_INSERT, lib.APL_CE_UPDATE, lib.APL_CE_DELETE,
         lib.APL_CE_COMMIT, lib.APL_CE_CANCEL, lib.APL_CE_BLOCK}
CLOSE_AFTER_S = 60.0      # the current part is closed at least this often


def _strip(blob: bytes, keep_a: bool, after: int = 0) -> tuple[bytes, int, int]:
    """The entries worth keeping that come after serial `after`, A images
    removed unless keep_a: (bytes, first, last serial)."""
    out = bytearray()
    first = last = 0
    size = ENTRY.size
    for pos, f in walk(blob):
        ln, kind, serial, klen, alen, blen = f[E_LEN], f[E_KIND], f[E_SERIAL], f[E_KLEN], f[E_ALEN], f[E_BLEN]
        if serial <= after:   # already in the history (a resend)
            continue
        if not first:
            first = serial
        last = serial
        if kind in _KEEP:
            if keep_a or kind in (lib.APL_CE_BEGIN,) or not alen:
                out += blob[pos:pos + ln]
            else:
                body = blob[pos + size: pos + size + klen] + \
                    blob[pos + size + klen + alen: pos + size + klen + alen + blen]
                new_len = (size + len(body) + 7) & ~7
                hdr = list(f)
                hdr[E_LEN], hdr[E_ALEN] = new_len, 0
                out += ENTRY.pack(*hdr) + body + b"\0" * (new_len - size - len(body))
    return bytes(out), first, last


class History:
    def __init__(self, directory: Path | None, *, period: float, memory: int, disk: int, keep_a: bool,
                 log) -> None:
        self.dir = directory
        self.period = period
        self.memory = memory
        self.disk = disk
        self.keep_a = keep_a
        self.log = log
        self.cur = None           # the current part, open for appending
        self.cur_bytes = 0
        self.cur_first = 0        # first serial in the current part
        self.last_serial = 0      # the last serial the history has seen (kept or not)
        self.last_spill = time.monotonic()
        self.warning: str | None = None
        self.window: dict | None = None   # the earliest point B logs reach back to
        self._spill_lock = threading.Lock()
        if self.dir is not None:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"replication.history_dir: cannot create {self.dir}: {exc.strerror}",
                                  key="replication.history_dir", problem=str(exc.strerror)) from None
            self.reader = HistoryDir(self.dir)
            parts = self.reader.parts()
            if parts:
                self.last_serial = parts[-1][1]
            cur = self.dir / CURRENT
            if cur.exists():
                data = cur.read_bytes()
                n = 0
                for pos, f in walk(data):
                    n = pos + f[E_LEN]
                    self.cur_first = self.cur_first or f[E_SERIAL]
                    self.last_serial = max(self.last_serial, f[E_SERIAL])
                if n != len(data):        # a torn last entry (the agent was killed writing it)
                    with open(cur, "r+b") as f:
                        f.truncate(n)
                self.cur_bytes = n
            self.cur = open(cur, "ab")
            self._find_window()

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def files(self) -> list[tuple[int, int, Path]]:
        return self.reader.parts()

    def should_spill(self) -> bool:
        return self.cur_bytes >= self.memory or (self.cur_bytes > 0 and
                                                 time.monotonic() - self.last_spill > CLOSE_AFTER_S)

    def append(self, blob: bytes, spill: bool = True) -> None:
        """Keep the entries of `blob` the history does not hold yet; with
        `spill` false the caller closes the current part (should_spill)."""
        if not self.enabled:
            return
        kept, first, last = _strip(blob, self.keep_a, self.last_serial)
        if not first:
            return
        if self.last_serial and first > self.last_serial + 1:
            # lost entries: a new part starts with the marker (the rewind window starts after it)
            self.log.warning("history_gap", first_missing=self.last_serial + 1, resumes_at=first)
            self.spill()
            self._write(gap_marker(self.last_serial + 1, self.last_serial), self.last_serial + 1)
        if kept:
            self._write(kept, first)
        self.last_serial = last
        if self.window is None and kept:
            self._find_window()
        if spill and self.should_spill():
            self.spill()

    def _write(self, data: bytes, first: int) -> None:
        if not self.cur_bytes:
            self.cur_first = first
        self.cur.write(data)
        self.cur.flush()
        self.cur_bytes += len(data)

    def spill(self) -> None:
        """Close the current part: compress it into a closed part, then put
        an empty current part in its place. A primary's agent runs it in a
        thread: one spill at a time (a stop's waits for the thread's)."""
        with self._spill_lock:
            self._spill()

    def _spill(self) -> None:
        self.last_spill = time.monotonic()
        if not self.enabled or not self.cur_bytes:
            return
        cur = self.dir / CURRENT
        data = cur.read_bytes()[:self.cur_bytes]
        name = part_name(self.cur_first, self.last_serial)
        tmp = self.dir / (name + ".tmp")
        with lz4.frame.open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.dir / name)
        empty = self.dir / (CURRENT + ".tmp")
        empty.write_bytes(b"")
        os.replace(empty, cur)
        self.cur.close()
        self.cur = open(cur, "ab")
        self.cur_bytes = 0
        self.trim()

    def trim(self) -> None:
        files = self.files()
        now = time.time()
        total = 0
        sizes = []
        for first, last, p in files:
            st = p.stat()
            sizes.append((first, last, p, st.st_size, st.st_mtime))
            total += st.st_size
        dropped = False
        for first, last, p, size, mtime in sizes:
            if now - mtime > self.period or total > self.disk:
                p.unlink(missing_ok=True)
                total -= size
                dropped = True
                if now - mtime <= self.period:
                    self.log.warning("history_cap_reached_oldest_dropped", file=p.name, disk_cap=self.disk)
        w = f"log history at {total / self.disk:.0%} of history_disk" if total >= 0.8 * self.disk else None
        if w != self.warning:
            self.warning = w
            if w:
                self.log.warning("history_near_cap", bytes=total, cap=self.disk)
        if dropped:
            self._find_window()

    def truncate_after(self, serial: int) -> int:
        """A rewind after a failover undid what this appliance held past
        `serial` (the fork): those entries are no longer its history (the new
        primary's stream brings other ones under the same serials), so they
        go — whole parts past it, the tail of the part that spans it, the
        current part's; returns the entries dropped."""
        if not self.enabled or self.last_serial <= serial:
            return 0
        with self._spill_lock:
            self._spill()
            dropped = 0
            for first, last, p in self.files():
                if last <= serial:
                    continue
                data = lz4.frame.decompress(p.read_bytes())
                keep = bytearray()
                for pos, f in walk(data):
                    if f[E_SERIAL] <= serial:
                        keep += data[pos:pos + f[E_LEN]]
                    else:
                        dropped += 1
                if keep and first <= serial:
                    name = part_name(first, serial)
                    tmp = self.dir / (name + ".tmp")
                    with lz4.frame.open(tmp, "wb") as f:
                        f.write(bytes(keep))
                    os.replace(tmp, self.dir / name)
                if p.name != part_name(first, serial):
                    p.unlink(missing_ok=True)
            self.last_serial = serial
            self.cur_first = 0
        self.log.warning("history_truncated", after_serial=serial, entries_dropped=dropped,
                         reason="rewound to the fork after a failover")
        self._find_window()
        return dropped

    def _find_window(self) -> None:
        """The earliest point the history can restore to: just before the
        first whole transaction after the last gap (a part that starts with a
        GAP marker), or in the oldest part."""
        parts = self.files()
        start = 0
        for i, (_f, _l, p) in enumerate(parts):
            if _first_kind(p) == GAP:
                start = i
        sources = [p for _f, _l, p in parts[start:]] + [self.dir / CURRENT]
        self.window = None
        for p in sources:
            try:
                data = p.read_bytes() if p.name == CURRENT else lz4.frame.decompress(p.read_bytes())
            except FileNotFoundError:
                continue
            for _pos, f in walk(data):
                if f[E_KIND] == lib.APL_CE_BEGIN:
                    self.window = {"serial": f[E_SERIAL] - 1, "time_ns": f[E_TIME]}
                    return

    def status(self) -> dict:
        if not self.enabled:
            return {"enabled": False}
        files = self.files()
        return {"enabled": True, "dir": str(self.dir), "files": len(files),
                "disk_bytes": sum(_size(p) for _, _, p in files), "current_bytes": self.cur_bytes,
                "first_serial": files[0][0] if files else self.cur_first, "last_serial": self.last_serial,
                "window": self.window, "warning": self.warning}

    def read(self, since_serial: int = 0):
        """Every kept entry from `since_serial` on, oldest first (raw bytes each)."""
        seen = since_serial - 1
        for blob in self.reader.blobs(since_serial):
            for pos, f in walk(blob):
                if f[E_SERIAL] > seen:
                    seen = f[E_SERIAL]
                    yield blob[pos:pos + f[E_LEN]]

    def close(self) -> None:
        if self.cur is not None:
            self.cur.close()
            self.cur = None


def _first_kind(p: Path) -> int | None:
    try:
        with lz4.frame.open(p, "rb") as f:
            head = f.read(ENTRY.size)
    except (FileNotFoundError, RuntimeError):
        return None
    return ENTRY.unpack(head)[E_KIND] if len(head) == ENTRY.size else None


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0
