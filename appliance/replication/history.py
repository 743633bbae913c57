"""The secondary's log history ([0085]–[0086]): B logs and T logs (and A logs
when configured) for a configured period, so an operator can go back in time
(apply B logs in reverse) or re-run transactions (T logs) after a program is
fixed.

The newest part is in memory; when that exceeds ``history_memory`` (or every
few seconds) it is spilled to an lz4-compressed file in ``history_dir``:
``history-<first serial>-<last serial>.lz4``, each holding change-log entries
back to back (format of cext/apl_layout.h, A images left out unless
``history_a_logs``; a BLOCK entry is kept without its image — structure,
not data — so the serials have no gap and a rewind after a failover knows
which block numbers changed structure: see controller/recovery.py).
Files older than ``history_period`` are deleted; past ``history_disk`` the
oldest are deleted too, with a warning from 80% on.

A restarted agent knows the last serial its history holds and asks its
primary to resume from there, so the history has no gap as long as the
primary still retains the entries.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import lz4.frame

from .._native import lib
from ..store.changelog import E_ALEN, E_BLEN, E_KIND, E_KLEN, E_LEN, E_SERIAL, ENTRY, walk

__all__ = ["History"]

_FILE = re.compile(r"^history-(\d{20})-(\d{20})\.lz4$")
_KEEP = {lib.APL_CE_BEGIN, lib.APL_CE_INSERT, lib.APL_CE_UPDATE, lib.APL_CE_DELETE,
         lib.APL_CE_COMMIT, lib.APL_CE_CANCEL, lib.APL_CE_BLOCK}


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
        self.buf: list[bytes] = []
        self.buf_bytes = 0
        self.buf_first = 0
        self.last_serial = 0
        self.last_spill = time.monotonic()
        self.warning: str | None = None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            files = self.files()
            if files:
                self.last_serial = files[-1][1]

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def files(self) -> list[tuple[int, int, Path]]:
        out = []
        for p in self.dir.iterdir():
            mm = _FILE.match(p.name)
            if mm:
                out.append((int(mm.group(1)), int(mm.group(2)), p))
        return sorted(out)

    def append(self, blob: bytes) -> None:
        if not self.enabled:
            return
        kept, first, last = _strip(blob, self.keep_a, self.last_serial)
        if not first:
            return
        if kept:
            if not self.buf:
                self.buf_first = first
            self.buf.append(kept)
            self.buf_bytes += len(kept)
        self.last_serial = last
        if self.buf_bytes >= self.memory or time.monotonic() - self.last_spill > 5.0:
            self.spill()

    def spill(self) -> None:
        self.last_spill = time.monotonic()
        if not self.enabled or not self.buf:
            return
        name = f"history-{self.buf_first:020d}-{self.last_serial:020d}.lz4"
        tmp = self.dir / (name + ".tmp")
        with lz4.frame.open(tmp, "wb") as f:
            for b in self.buf:
                f.write(b)
        os.replace(tmp, self.dir / name)
        self.buf, self.buf_bytes = [], 0
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
        for first, last, p, size, mtime in sizes:
            if now - mtime > self.period or total > self.disk:
                p.unlink(missing_ok=True)
                total -= size
                if now - mtime <= self.period:
                    self.log.warning("history_cap_reached_oldest_dropped", file=p.name, disk_cap=self.disk)
        w = f"log history at {total / self.disk:.0%} of history_disk" if total >= 0.8 * self.disk else None
        if w != self.warning:
            self.warning = w
            if w:
                self.log.warning("history_near_cap", bytes=total, cap=self.disk)

    def status(self) -> dict:
        if not self.enabled:
            return {"enabled": False}
        files = self.files()
        return {"enabled": True, "dir": str(self.dir), "files": len(files),
                "disk_bytes": sum(p.stat().st_size for _, _, p in files), "memory_bytes": self.buf_bytes,
                "first_serial": files[0][0] if files else self.buf_first, "last_serial": self.last_serial,
                "warning": self.warning}

    def read(self, since_serial: int = 0):
        """Every kept entry from `since_serial` on, oldest first (raw bytes each)."""
        chunks = []
        for first, last, p in self.files():
            if last >= since_serial:
                with lz4.frame.open(p, "rb") as f:
                    chunks.append(f.read())
        chunks.extend(self.buf)
        for blob in chunks:
            for pos, f in walk(blob):
                if f[E_SERIAL] >= since_serial:
                    yield blob[pos:pos + f[E_LEN]]
