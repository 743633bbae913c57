"""Checkpoints: every block of the appliance at one version, in one file.

A checkpoint ``checkpoint-<seq>.apl`` (format: :mod:`.records`) is a HEADER
(where it stands: the log record seq it covers, the version, serial,
transaction numbers, epoch, role, and what it was made for: the appliance,
its instance, schema and layout, its file directory), BLOCKS records (block
images as apl_block_images writes them: every block number below the
limit, a primary block with its overflow chain as one image, the
alternate-key files like the tables; an unused number has an empty image)
and END (how many blocks and bytes). It is written as ``.tmp``, forced to
disk, renamed and its directory forced: a checkpoint file that exists was
complete when it was made, and one that a reader finds incomplete or that
fails a checksum is corrupt.

Consistency without stopping: the controller pins the version it stands at
(a reader snapshot, on its loop thread, where that version and the last log
record's seq describe the same moment: records are queued in the loop turn
that publishes their batch). The thread here then reads block images at
that version while commits go on: committed block versions are never
modified, and the pin keeps the versions it reads from being freed
(cext/apl_layout.h, "Readers' consistent access"). Replaying the log
records after that seq onto the images gives every later state.

The thread runs at the lowest CPU priority (nice 19, its own thread only):
alone on the machine it writes at the disk's speed, beside a commit load
it takes what the commits leave. Its writes go to the disk a record at a
time, with one record in flight (sync_file_range: start the write-back of
a record, then wait for the one before), and the final fdatasync has
little left. What is on disk leaves the page cache (records.drop_cached):
a checkpoint keeps two records' pages cached, not the whole file, and
writes into the pages it just gave back rather than fresh ones. While
commits wait on the log's fdatasyncs (log_sync = "commit" under load) it
gives way to them: each record goes in small
slices, each forced before the next, and it takes a tenth of the disk's
time at most, 16 MiB/s at least (logfiles.write_yielding says why: a
flush of the disk's cache carries whatever was written before it).
``yielded_bytes`` in its result says how much went that way.

Shared with the loop thread: ``progress`` (a dict replaced, never mutated:
one reference store), ``result``/``error`` (set once, before the thread
wakes the loop through the eventfd it was given), nothing else; the thread
has its own file and buffer and reads shared memory only through the pin.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from .. import errors
from . import records as rec
from .logfiles import RANGE_WAIT, LogDir, disk_error, fsync_dir, sync_range, write_all, write_yielding

__all__ = ["CheckpointWriter", "checkpoint_name", "read_header", "load", "BadCheckpoint", "retire"]

CHUNK = 4 << 20                # bytes of block images per BLOCKS record


def checkpoint_name(seq: int) -> str:
    return f"checkpoint-{seq:020d}.apl"


class BadCheckpoint(Exception):
    """A checkpoint that cannot be used (incomplete, a checksum that fails,
    not this appliance's): the previous one is tried."""


class CheckpointWriter:
    """Writes one checkpoint in a thread of its own (see the module docstring)."""

    def __init__(self, d: LogDir, reader, pin, header: dict, *, wake_fd: int, log, number: int,
                 forcing=lambda: False) -> None:
        self.dir = d
        self.forcing = forcing         # LogWriter.forcing: commits wait on the log, give way to them
        self.reader = reader
        self.pin = pin
        self.header = header
        self.wake_fd = wake_fd
        self.log = log
        self.number = number
        self.path = d.path / checkpoint_name(header["log_seq"])
        self.started = time.monotonic()
        self.progress = {"blocks": 0, "total": header["block_limit"], "bytes": 0}
        self.result: dict | None = None
        self.error: errors.ApplianceError | None = None
        self._cancel = False              # the controller stops: give up between two records
        self._thread = threading.Thread(target=self._run, name="durability-checkpoint", daemon=True)
        self._thread.start()

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def cancel(self) -> None:
        self._cancel = True

    def _run(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = -1
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)   # this thread only (Linux)
        except OSError:
            pass
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, self.dir.mode)
            off = write_all(fd, rec.CHECKPOINT_MAGIC + b"".join(rec.frame(0, rec.KIND_HEADER, rec.pack(self.header))),
                         0)
            version, limit = self.header["version"], self.header["block_limit"]
            n = nrec = images = 0
            out = _Writer(fd, off, self.forcing)   # writes while this thread reads the next images
            try:
                while n < limit:
                    if self._cancel:
                        raise errors.UnavailableError("checkpoint: given up, the controller stops")
                    batch, n = self.reader.block_images(n, version, CHUNK, limit, copy=False)
                    nrec += 1
                    out.put(rec.frame(nrec, rec.KIND_BLOCKS, batch, first=n))
                    images += len(batch)
                    self.progress = {"blocks": n, "total": limit, "bytes": out.queued}
            finally:
                off = out.close()
                yielded = out.yielded
            self.pin.close()
            self.pin = None
            end = {"blocks": n, "bytes": images, "records": nrec}
            off = write_all(fd, b"".join(rec.frame(nrec + 1, rec.KIND_END, rec.pack(end))), off)
            os.fdatasync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, self.path)
            fsync_dir(self.dir.path)
            seconds = time.monotonic() - self.started
            self.result = {"file": self.path.name, "log_seq": self.header["log_seq"],
                           "serial": self.header["serial"], "version": version, "blocks": n, "bytes": off,
                           "seconds": round(seconds, 3), "rate_mb_s": round(off / max(seconds, 1e-6) / 1e6, 1),
                           "yielded_bytes": yielded,
                           "at_ns": time.time_ns()}
        except OSError as exc:
            self.error = disk_error(exc, "write checkpoint", tmp)
        except errors.ApplianceError as exc:     # reading the pinned version failed (a bug)
            self.error = exc
        finally:
            if self.pin is not None:
                self.pin.close()
                self.pin = None
            if fd >= 0:
                os.close(fd)
            if self.error is not None:
                tmp.unlink(missing_ok=True)
            try:
                os.eventfd_write(self.wake_fd, 1)
            except OSError:
                pass


class _Writer:
    """The checkpoint's writes, in a thread of their own (two records
    ahead at most): pwritev of each record's pieces (no copy), its
    write-back started, the previous record's waited for (see the module
    docstring). close() waits for it and returns the offset reached, or
    raises its OSError."""

    def __init__(self, fd: int, off: int, forcing) -> None:
        import queue
        self.fd, self.off, self.queued = fd, off, off
        self.forcing = forcing
        self.yielded = 0               # bytes written giving way to commits (write_yielding)
        self.dropped = off             # the page cache before this offset was dropped (on disk already)
        self._prev = (0, 0)
        self.error: OSError | None = None
        self._q: "queue.Queue" = queue.Queue(maxsize=2)
        self._t = threading.Thread(target=self._run, name="durability-checkpoint-write", daemon=True)
        self._t.start()

    def put(self, pieces: list) -> None:
        if self.error is not None:
            raise self.error
        self.queued += sum(len(p) for p in pieces)
        self._q.put(pieces)

    def _run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass
        clean = 0                      # the file's bytes before this are on disk
        while (pieces := self._q.get()) is not None:
            if self.error is not None:
                continue
            try:
                start = self.off
                self.off, forced = write_yielding(self.fd, pieces, start, self.forcing)
                if forced:
                    self.yielded += self.off - start
                if self._prev[1]:
                    sync_range(self.fd, self._prev[0], self._prev[1], RANGE_WAIT)
                    clean = self._prev[0] + self._prev[1]
                if forced:
                    clean = self.off
                self._prev = (0, 0) if forced else (start, self.off - start)
                self.dropped = rec.drop_cached(self.fd, self.dropped, clean)
            except OSError as exc:
                self.error = exc

    def close(self) -> int:
        self._q.put(None)
        self._t.join()
        if self.error is not None:
            raise self.error
        return self.off


def read_header(path: Path) -> dict:
    """The HEADER of a checkpoint (BadCheckpoint when even that is unusable)."""
    res = rec.Scan(path)
    try:
        for r in rec.read(path, rec.CHECKPOINT_MAGIC, res, payloads=lambda k: k == rec.KIND_HEADER):
            if r.kind != rec.KIND_HEADER:
                break
            return r.doc()
    except (OSError, ValueError) as exc:
        raise BadCheckpoint(f"{path.name}: {exc}") from None
    raise BadCheckpoint(f"{path.name}: no header ({res.stop}: {res.problem or 'empty'})")


def load(path: Path, on_images, records: rec.ReadAhead | None = None) -> tuple[dict, dict]:
    """Read a checkpoint, calling on_images(bytes) for each BLOCKS record in
    order; (header, END's counts). BadCheckpoint when it is not whole and
    valid — possibly after some images were handed over (the caller undoes).
    `records`: a read-ahead of the file already started (ReadAhead)."""
    records = records or rec.ReadAhead(path, rec.CHECKPOINT_MAGIC)
    res = records.result
    header = end = None
    nrec = 0
    try:
        for r in records:
            if header is None:
                if r.kind != rec.KIND_HEADER:
                    raise BadCheckpoint(f"{path.name}: its first record is not a header")
                header = r.doc()
            elif r.kind == rec.KIND_BLOCKS and end is None:
                nrec += 1
                if r.seq != nrec:
                    raise BadCheckpoint(f"{path.name}: record {r.seq} where {nrec} belongs")
                on_images(r.payload)
            elif r.kind == rec.KIND_END and end is None:
                end = r.doc()
            else:
                raise BadCheckpoint(f"{path.name}: a {rec.KIND_NAMES.get(r.kind, r.kind)} record at offset {r.offset}")
    except (OSError, ValueError) as exc:
        raise BadCheckpoint(f"{path.name}: {exc}") from None
    if res.stop != "end":
        raise BadCheckpoint(f"{path.name}: {res.stop}: {res.problem}")
    if header is None or end is None:
        raise BadCheckpoint(f"{path.name}: incomplete (no {'header' if header is None else 'end'} record)")
    if end.get("records") != nrec:
        raise BadCheckpoint(f"{path.name}: {nrec} block records, its end says {end.get('records')}")
    return header, end


def retire(d: LogDir, keep: int, current_log: Path | None, log) -> dict:
    """Keep the newest `keep` checkpoints; delete older ones and the log
    files that only the deleted ones needed (all of whose records the
    oldest kept checkpoint covers)."""
    cps = d.checkpoints()
    gone = []
    for seq, p in cps[:-keep] if len(cps) > keep else []:
        p.unlink(missing_ok=True)
        gone.append(p.name)
    kept = d.checkpoints()
    # with fewer than `keep` checkpoints the oldest fallback is the log from its start: keep it all
    logs_gone = d.remove_logs_before(kept[0][0], current_log) if len(kept) >= keep else []
    if gone:
        fsync_dir(d.path)
    if gone or logs_gone:
        log.info("durability_files_retired", checkpoints=gone, log_files=logs_gone,
                 oldest_checkpoint=kept[0][1].name if kept else None)
    return {"checkpoints": gone, "log_files": logs_gone}
