"""What a secondary in batch mode receives and does not apply yet ([0156]).

While its controller refuses to apply (appliance/controller/batch.py), the
secondary's agent appends every ENTRIES message it receives, as received
(A images, deltas, BLOCK images: everything applying needs), to
``<history_dir>/batch-backlog.log``; when the batch ends it reads the file
from the start and has its controller apply it, in chunks of whole
transactions, while new messages keep being appended behind. The file is
removed once everything in it is applied.

Shared: nothing across processes or threads; the agent's loop alone writes
and reads it (appends are flushed before the catch-up reads them back).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..store.changelog import E_LEN, E_SERIAL, walk

__all__ = ["Backlog"]

NAME = "batch-backlog.log"


class Backlog:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / NAME
        self.f = open(self.path, "w+b")    # a new batch starts empty
        self.first = 0          # first serial kept
        self.last = 0           # last serial kept
        self.size = 0           # bytes written
        self.read_pos = 0       # bytes applied so far (whole transactions)

    def append(self, blob: bytes, first: int, last: int) -> None:
        """Keep the entries of an ENTRIES message (first, last serial) not kept yet."""
        if not blob or last <= self.last:
            return
        if first <= self.last:          # a resend overlapping what is kept: only what is new
            out = bytearray()
            for pos, f in walk(blob):
                if f[E_SERIAL] > self.last:
                    out += blob[pos:pos + f[E_LEN]]
            blob = bytes(out)
        self.f.seek(0, os.SEEK_END)
        self.f.write(blob)
        self.f.flush()
        self.size += len(blob)
        self.first = self.first or first
        self.last = last

    def read(self, pos: int, n: int) -> bytes:
        self.f.seek(pos)
        return self.f.read(n)

    @property
    def pending_bytes(self) -> int:
        return self.size - self.read_pos

    def close(self) -> None:
        self.f.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
