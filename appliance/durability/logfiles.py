"""Log files: the change log on disk, and the thread that writes it.

A durability directory holds log files ``log-<seq>.apl`` (seq: that of the
file's first record, its HEADER; format: :mod:`.records`) and checkpoints
(:mod:`.checkpoint`). Records are appended to the newest log file; a new
one is started when it holds ``log_file_size`` bytes, or after a checkpoint
when it is past half of that (each new file is one made in advance, all
zeros: one per checkpoint would write more than frequent checkpoints do).
The files a checkpoint makes unnecessary are the whole files before the
one its log seq is in (deleted then); the current file is never deleted.

The log, read back, is every record of the files in seq order up to the
first one that is not whole, valid and next in seq: a crash cuts at most the
tail of the newest file (a write in flight), and that is cut off (the file
truncated there) before anything is written after it. A bad record anywhere
else ends the log as well: what follows is set aside (``<name>.cut``), never
applied, and logged.

The writer thread (:class:`LogWriter`)
--------------------------------------
Shared between the controller's loop thread and the writer thread, all
under ``_cv`` (a threading.Condition); the lock is held only to hand over
the queue or read the counters, never across a write or an fsync:

- ``_queue``: records to write (kind, payload, serials, seq), appended by
  the loop thread (:meth:`submit`), taken whole by the writer thread;
- ``written_seq`` / ``synced_seq`` (and the serials of those records):
  what is in the file (os.pwrite returned) and what is on disk (fdatasync
  returned); only the thread holding ``_io`` (below) writes them, the loop
  thread reads them;
- ``error``: why writing stopped (ENOSPC, EIO ...), set by the thread whose
  write failed (holding ``_io``), cleared by the writer thread once it
  wrote again; ``_stop``, ``_rotate``: requests of the loop thread.

The file itself — the descriptor, the offset, what is written but not
forced (``_unsynced``), the file in use — is touched under ``_io`` (a
threading.Lock) only, by one thread at a time: the writer thread holds it
from taking the queue to the end of that write and fsync; the loop thread
takes it (without waiting) to write a group itself, below. Lock order: a
thread holding ``_io`` may take ``_cv``, never the other way round (the
writer waits on ``_cv`` without ``_io``; the loop thread never blocks on
``_io``).

With log_sync = "commit" on a fast disk (fdatasync under SLOW_FSYNC_S on
average), a group whose queue is empty and whose writer thread is idle is
written and forced by the loop thread itself, in submit(), as Redis's
``appendfsync always`` does: the fdatasync then costs no hand-over to
another thread and back, and none of the GIL's (measured with 8 durable
writers over 20,000 records, four interleaved rounds each: the
controller's CPU a commit 73–83 µs against 125–163 µs through the thread,
9,097–10,146 commits/s against 6,449–8,614/s). Commits that arrive
meanwhile wait in their sockets and form the next group. Anything else goes through the writer
thread: a record queued behind another, a slow disk (where the loop must
stay free while groups wait for each other), an error (the thread retries).
Records are written in seq order either way: the loop thread writes
inline only when nothing is queued, and the writer takes queued records
only while it holds ``_io``.

Otherwise the loop thread never waits for the disk: submit() takes the
lock for a list append. The writer thread wakes the loop through an eventfd
(``wake_fd``, in the loop's epoll) after each write or fsync, and when an
error starts or ends; the loop then answers the commits that were waiting
for those records (appliance/controller/durable.py). Group commit: every
record that queued while an fsync ran goes out in the next write and
shares the next fsync. On a slow disk (fdatasync above SLOW_FSYNC_S on
average) that alone splits the committing clients into two groups, each
waiting for two fsyncs; so there the next write waits, up to half an
fsync (HOLD_MAX_S at most), for the commits the last fsync answered to
come back (``_queued_commits`` reaching what the last two groups held) and
both groups share one fsync — what PostgreSQL's commit_delay does, by
measure instead of by setting.

Why this cannot lose an acknowledged commit: with log_sync = "commit" a
commit is answered only once ``synced_seq`` has passed its record, which the
writer thread publishes only after fdatasync returned for every byte up to
it; records are written in seq order at increasing offsets of one file (or
of a new file whose creation was fsynced into its directory before any
record in it counts as written), so a record on disk has every earlier one
on disk before it. A write that fails (a full disk) is retried at the same
offset with the same bytes until it succeeds, so the file never holds a
record after a gap. An fsync that fails leaves no certainty about the pages
it was flushing: the bytes written since the last good fsync are kept and
written again before the next one.

Log files are made in advance, full of zeros (a spare, ``log-spare.ready``,
prepared by a helper thread at nice 19 and forced to disk): records then
overwrite blocks the file already has, so an fdatasync writes the data and
flushes the disk, without a journal commit for the file's size and block
allocation — which, on ext4, would also wait for whatever other files
(a checkpoint being written) have pending. The writer takes the spare when
it starts a file (and moves onto one as soon as it is ready if the file it
writes was not made in advance); without a spare (the disk full, not ready
yet) it starts an empty file and appends, as correct and slower. Reading
stops at the zeros (a header of zeros is the end).

The GIL: the thread spends its time in os.pwrite and os.fdatasync, which
release it; the Python around them is a few microseconds per write (the
checksum of a large record is the C helpers', records.crc32, which
releases it too).
"""
from __future__ import annotations

import errno
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from .. import errors
from . import records as rec

__all__ = ["LogDir", "LogWriter", "LogEnd", "StopLog", "log_name", "fsync_dir", "disk_error", "write_all",
           "entries_after", "writev_all", "write_yielding", "file_header"]

_LOG = re.compile(r"^log-(\d{20})\.apl$")
_CKP = re.compile(r"^checkpoint-(\d{20})\.apl$")
RETRY_S = 0.5          # a failed write or fsync is tried again this often
OFF_WRITE_S = 0.01     # log_sync = "off": what is queued is written this often
WRITE_BYTES = 1 << 20  # ... or as soon as this much is queued (any mode)
SLOW_FSYNC_S = 0.0005  # "commit": an fdatasync slower than this (on average) makes the next group wait ...
HOLD_MAX_S = 0.002     # ... at most half an fdatasync and this long for the commits just answered to join it


YIELD_PIECE = 64 << 10  # a background write (checkpoint, spare) while commits wait: forced this much at a time
YIELD_WINDOW_S = 0.1    # "commits wait on the log": it forced records for them within this long
YIELD_SHARE = 0.1      # ... and then the background writer takes this share of the disk's time at most,
YIELD_MIN_RATE = 16 << 20  # ... but it sleeps no longer than to write this many bytes a second (1 GiB in ~64 s)

SPARE = "log-spare.ready"       # a log file made in advance (zeros), forced to disk
SPARE_TMP = "log-spare.tmp"     # one being made (removed at start: .tmp)


def log_name(seq: int) -> str:
    return f"log-{seq:020d}.apl"


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a created, renamed or removed file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_error(exc: OSError, what: str, path) -> errors.DiskError:
    """The typed error for an OSError on a durability file."""
    cls = errors.DiskFullError if exc.errno in (errno.ENOSPC, errno.EDQUOT) else errors.DiskError
    why = exc.strerror or str(exc)
    return cls(f"{what} {path}: {why}", path=str(path), errno=exc.errno or 0, strerror=why)


class StopLog(Exception):
    """Raised by LogDir.read's callback: the log cannot go on past this
    record (it and what follows are cut)."""


@dataclass
class LogEnd:
    """Where the log ends: the last good record, and where the next goes."""

    seq: int = 0                 # seq of the last good record (0: none)
    path: Path | None = None     # the file it is in
    offset: int = 0              # the end of that record (the next record's offset)
    serial: int = 0              # the last serial of the last ENTRIES/APPLIED record
    source: int = 0              # APPLIED: the primary instance of that serial
    kinds: set = field(default_factory=set)   # kinds of record seen (a scan of the whole log only)


class LogDir:
    """A durability directory: its log files and checkpoints, by name.
    `readonly`: another process's view of the controller's directory (the
    agent reading old log records): nothing is created, removed or cut."""

    def __init__(self, path: Path, log, mode: int = 0o640, *, readonly: bool = False) -> None:
        self.path = path
        self.log = log
        self.mode = mode & 0o660
        self.readonly = readonly
        self.continue_at: LogEnd | None = None   # set by a cold start: where the log goes on
        self.copy_incomplete = False             # a cold start ended inside a secondary's block copy
        if readonly:
            return
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".probe"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.close(fd)
            probe.unlink()
        except OSError as exc:
            raise disk_error(exc, "durability.dir: cannot use", path) from None
        for p in path.glob("*.tmp"):    # a checkpoint or file creation a crash interrupted
            p.unlink(missing_ok=True)

    def logs(self) -> list[tuple[int, Path]]:
        """(first seq, path) of every log file, in seq order."""
        return sorted((int(m.group(1)), self.path / m.group(0))
                      for m in map(_LOG.match, os.listdir(self.path)) if m)

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(log seq it covers, path) of every checkpoint file, oldest first."""
        return sorted((int(m.group(1)), self.path / m.group(0))
                      for m in map(_CKP.match, os.listdir(self.path)) if m)

    def has_data(self) -> bool:
        return bool(self.logs() or self.checkpoints())

    # -- reading the log ---------------------------------------------------------------------

    def read(self, after: int, on_record, *, payloads=lambda kind: True,
             reuse: bool = False) -> tuple[LogEnd, dict | None]:
        """Call on_record(record) for every record with seq > `after`, in seq
        order, up to the end of the log; what cannot be read is cut (see the
        module docstring), and so is a record on_record refuses (StopLog) with
        everything after it. Returns (where the log ends, what was cut or
        None). HEADER records are not passed on (the files', not the log's).
        `reuse`: a large payload is a view of a buffer read into again once
        on_record returns (ReadAhead(reuse=True)): on_record must not keep it."""
        end = LogEnd(seq=after)
        files = self.logs()
        start = max([i for i, (first, _p) in enumerate(files) if first <= after + 1], default=0)
        for i in range(start, len(files)):
            first, path = files[i]
            if first > end.seq + 1:
                return end, self._cut(files, i, None, 0, f"log records {end.seq + 1}..{first - 1} are "
                                                          "missing (no file holds them)")
            records = rec.ReadAhead(path, rec.LOG_MAGIC, payloads=payloads, reuse=reuse)
            res = records.result
            bad = None
            for r in records:
                if r.kind == rec.KIND_HEADER:
                    end.path, end.offset = path, r.offset + r.size   # the newest file goes on, even with no record
                    continue
                if r.seq <= after:        # before the part asked for (a checkpoint covers it)
                    end.path, end.offset = path, r.offset + r.size
                    continue
                if r.seq != end.seq + 1:
                    bad = (r.offset, f"record seq {r.seq} at offset {r.offset} does not follow seq {end.seq}")
                    break
                try:
                    on_record(r)
                except StopLog as e:
                    bad = (r.offset, str(e))
                    break
                end.seq, end.path, end.offset = r.seq, path, r.offset + r.size
                _note(end, r)
            if bad is None and res.stop != "end":
                bad = (res.stop_offset if res.magic_ok else 0, f"{res.stop}: {res.problem}")
            if bad is not None:
                return end, self._cut(files, i, path, bad[0], bad[1])
        return end, None

    def _cut(self, files, i: int, path: Path | None, offset: int, reason: str) -> dict:
        """End the log at (path, offset): truncate that file there (set it
        aside when nothing of it is usable) and set every later file aside
        (read-only: only say where it ends)."""
        if self.readonly:
            return {"file": path.name if path is not None else None, "offset": offset, "reason": reason}
        aside, cut_bytes = [], 0
        later = files[i + 1:] if path is not None else files[i:]
        if path is not None:
            size = path.stat().st_size
            cut_bytes = size - offset
            if offset <= rec.MAGIC_LEN:
                os.replace(path, path.with_name(path.name + ".cut"))
                aside.append(path.name)
            else:
                with open(path, "r+b") as f:
                    f.truncate(offset)
                    os.fsync(f.fileno())
        for _first, p in later:
            cut_bytes += p.stat().st_size
            os.replace(p, p.with_name(p.name + ".cut"))
            aside.append(p.name)
        fsync_dir(self.path)
        facts = {"file": path.name if path is not None else None, "offset": offset, "reason": reason,
                 "bytes_cut": cut_bytes, "set_aside": aside}
        self.log.warning("log_cut", **facts)
        return facts

    def tail(self) -> tuple[LogEnd, dict | None]:
        """Where the newest log file ends (a plain restart continues there),
        its torn tail cut first. Only the newest file is read: earlier ones
        were whole when the writer moved past them. The serial is that of the
        last record that carries one (looked for in earlier files when the
        newest holds none)."""
        cut = None
        while True:
            files = self.logs()
            if not files:
                return LogEnd(), cut
            first, path = files[-1]
            res = rec.Scan(path)
            end = LogEnd(seq=first - 1, path=path, offset=0)
            bad = None
            for r in rec.read(path, rec.LOG_MAGIC, res, payloads=lambda k: False):
                if r.kind == rec.KIND_HEADER:
                    end.offset = r.offset + r.size
                    continue
                if r.seq != end.seq + 1:
                    bad = (r.offset, f"record seq {r.seq} at offset {r.offset} does not follow seq {end.seq}")
                    break
                end.seq, end.offset = r.seq, r.offset + r.size
                _note(end, r)
            if bad is None and res.stop != "end":
                bad = (res.stop_offset if res.magic_ok else 0, f"{res.stop}: {res.problem}")
            if bad is not None:
                cut = self._cut(files, len(files) - 1, path, bad[0] if end.offset else 0, bad[1])
            if end.offset == 0:           # nothing usable in it: it was set aside; the one before ends the log
                continue
            if not end.kinds & _SERIAL_KINDS:
                end.serial, end.source = self._serial_before(files[:-1])
            return end, cut

    def _serial_before(self, files) -> tuple[int, int]:
        """(serial, source) of the last record that carries one, in the newest
        earlier file that has such a record."""
        for _first, path in reversed(files):
            res = rec.Scan(path)
            end = LogEnd()
            for r in rec.read(path, rec.LOG_MAGIC, res, payloads=lambda k: False):
                _note(end, r)
            if end.kinds & _SERIAL_KINDS:
                return end.serial, end.source
        return 0, 0

    def log_bytes_after(self, seq: int, end: LogEnd | None = None) -> int:
        """Bytes of the log files that hold records after `seq` (whole files;
        the one `end` is in up to its end, not its zeros made in advance)."""
        files = self.logs()
        total = 0
        for i, (first, p) in enumerate(files):
            nxt = files[i + 1][0] if i + 1 < len(files) else None
            if nxt is None or nxt > seq + 1:
                try:
                    total += end.offset if end is not None and p == end.path else p.stat().st_size
                except FileNotFoundError:
                    pass
        return total

    def remove_logs_before(self, seq: int, current: Path | None) -> list[str]:
        """Delete the log files all of whose records have seq <= `seq` (a
        checkpoint covers them); never `current`, the file being written."""
        files = self.logs()
        gone = []
        for i, (first, p) in enumerate(files):
            if i + 1 >= len(files) or p == current:
                break
            if files[i + 1][0] - 1 <= seq:
                p.unlink(missing_ok=True)
                gone.append(p.name)
        if gone:
            fsync_dir(self.path)
        return gone


def file_header(path: Path) -> dict | None:
    """The HEADER record of a log file (None when it has none)."""
    res = rec.Scan(path)
    for r in rec.read(path, rec.LOG_MAGIC, res, payloads=lambda k: k == rec.KIND_HEADER):
        return r.doc() if r.kind == rec.KIND_HEADER else None
    return None


def entries_after(d: LogDir, after: int, upto: int, cap: int = 256 << 20) -> list[bytes] | None:
    """A primary's change-log entries with serials after..upto (inclusive),
    read back from its log files (entries back to back, whole transactions),
    for a secondary its change-log ring no longer reaches; None when the
    files do not hold every one of them or they exceed `cap` bytes."""
    from ..store.changelog import E_SERIAL, walk
    out: list[bytes] = []
    state = {"covered": after, "bytes": 0}

    def on_record(r: rec.Record) -> None:
        if r.kind == rec.KIND_GAP and r.last > state["covered"]:
            raise StopLog("a gap")
        if r.kind != rec.KIND_ENTRIES or r.last <= state["covered"]:
            return
        if r.first > state["covered"] + 1:
            raise StopLog("serials missing")
        blob = r.payload
        if r.first <= after:   # a batch that began before: only the entries after `after`
            start = next((pos for pos, f in walk(blob) if f[E_SERIAL] > after), len(blob))
            blob = blob[start:]
        out.append(blob)
        state["covered"], state["bytes"] = r.last, state["bytes"] + len(blob)
        if r.last >= upto or state["bytes"] > cap:
            raise StopLog("done")
    d.read(0, on_record, payloads=lambda kind: kind == rec.KIND_ENTRIES)
    if state["covered"] < upto or state["bytes"] > cap:
        return None
    return out


class LogWriter:
    """The writer thread (see the module docstring)."""

    def __init__(self, d: LogDir, *, mode: str, sync_interval: float, file_size: int, header: dict,
                 end: LogEnd, log) -> None:
        self.dir = d
        self.mode = mode                  # "commit", "interval", "off"
        self.sync_interval = sync_interval
        self.file_size = file_size
        self.header = dict(header)        # what each new file's HEADER says (plus its seq)
        self.log = log
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._cv = threading.Condition(threading.Lock())
        self._io = threading.Lock()       # the file's state (see the module's docstring)
        self._queue: list = []
        self._queued_bytes = 0
        self._queued_commits = 0          # commits the queued records carry (group commit on a slow disk)
        self._hold: tuple | None = None   # (commits to wait for, until when) before the next write
        self._fsync_ema = 0.0
        self._stop = False
        self._rotate = end.path is None   # no file yet: the first record opens one
        # loop thread only
        self.next_seq = end.seq + 1
        # writer thread writes, loop thread reads
        self.written_seq = end.seq
        self.synced_seq = end.seq
        self.written_serial = self.synced_serial = end.serial
        self.error: errors.DiskError | None = None
        self._retry_at = 0.0              # after a failure: when the writer tries again (RETRY_S later)
        self.bytes_written = 0            # since start
        self.fsyncs = 0
        self.current: Path | None = end.path
        self.spares_made = 0
        # writer thread only
        self._preallocated = end.path is not None and end.path.stat().st_size >= file_size
        self._spare_thread: threading.Thread | None = None
        self._fd = -1
        self._offset = end.offset
        self._tried_end = end.offset      # how far a write may have reached: past _offset, a refused write's bytes
        self._unsynced: list[tuple[int, bytes]] = []   # (offset, bytes) written since the last good fsync
        self._unsynced_seq = (end.seq, end.serial)
        self._last_sync = time.monotonic()
        self._period = sync_interval if mode == "interval" else OFF_WRITE_S
        self._next_tick = self._last_sync + self._period
        self.want_wake = mode == "commit"   # the loop waits for something: wake it after each write/fsync
        if end.path is not None:
            self._fd = os.open(end.path, os.O_WRONLY | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="durability-log-writer", daemon=True)
        self._thread.start()
        self._make_spare()

    # -- the loop thread ---------------------------------------------------------------------

    def submit(self, kind: int, payload: bytes, *, first: int = 0, last: int = 0, aux1: int = 0,
               aux2: int = 0, commits: int = 0) -> int:
        """Queue a record (of `commits` commits waiting for it) — or, with
        log_sync = "commit" on a fast disk and nothing queued, write and
        force it now (the module's docstring); returns its seq (written in
        this order)."""
        seq = self.next_seq
        self.next_seq = seq + 1
        record = (seq, kind, payload, first, last, aux1, aux2)
        if self.mode == "commit" and not self._queue and self.error is None and not self._stop \
                and self._fsync_ema < SLOW_FSYNC_S and self._io.acquire(blocking=False):
            try:               # the writer is idle and nothing is queued (the loop alone queues)
                self._inline(record, commits)
            finally:
                self._io.release()
            return seq
        with self._cv:
            self._queue.append(record)
            self._queued_bytes += len(payload) + rec.HDR.size
            self._queued_commits += commits
            if self.mode == "commit" or len(self._queue) == 1 or self._queued_bytes >= WRITE_BYTES:
                self._cv.notify()      # "interval", "off": once a tick (the writer then waits for _next_tick)
        return seq

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def forcing(self) -> bool:
        """Whether commits wait on this log's fdatasyncs now (log_sync =
        "commit" and one forced records within YIELD_WINDOW_S): background
        writes then give way to them (write_yielding). Any thread."""
        return self.mode == "commit" and time.monotonic() - self._last_sync < YIELD_WINDOW_S

    def rotate(self, past: float = 0.0) -> None:
        """Start a new file before the next record (after a checkpoint) when
        the current one holds more than `past` of log_file_size. (It reads
        the writer thread's offset without the lock: one int, at worst a
        write old, which moves the choice by that write.)"""
        if self._offset <= past * self.file_size and self.current is not None:
            return
        with self._cv:
            self._rotate = True
            self._cv.notify()

    def drain(self) -> int:
        """Read the eventfd (the loop's wake-up); returns how many wake-ups were pending."""
        try:
            return int.from_bytes(os.read(self.wake_fd, 8), "little")
        except BlockingIOError:
            return 0

    def stop(self, timeout: float = 30.0) -> bool:
        """Write and fsync everything queued, then end the thread; False when
        it could not (the disk still refuses)."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)
        ok = not self._thread.is_alive() and self.synced_seq == self.next_seq - 1
        if not self._thread.is_alive():
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            os.close(self.wake_fd)
        return ok

    # -- the writer thread -------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            os.eventfd_write(self.wake_fd, 1)
        except OSError:
            pass

    def _run(self) -> None:
        pending: list = []              # records taken from the queue, not yet written
        give_up = None                  # stopping while the disk refuses: until when to keep trying
        while True:
            with self._cv:
                while not self._ready(pending):
                    self._cv.wait(self._wait_s())
                if self._hold is not None:     # a slow disk: let the commits just answered join this group
                    target, until = self._hold
                    self._hold = None
                    while self._queued_commits < target and not self._stop and (left := until - time.monotonic()) > 0:
                        self._cv.wait(left)
            if self.error is not None and (left := self._retry_at - time.monotonic()) > 0:
                time.sleep(left)           # a failed write or fsync (its own or the loop's) is tried again later
            with self._io:
                with self._cv:
                    taken, self._queued_commits = self._queued_commits, 0
                    pending.extend(self._queue)
                    self._queue = []
                    stop, rotate = self._stop, self._rotate
                    self._next_tick = time.monotonic() + self._period
                try:
                    if pending:
                        self._write(pending, rotate)
                    if self._unsynced and (self.mode == "commit" or stop or self._sync_due()):
                        self._sync()
                        if self.mode == "commit" and self._fsync_ema >= SLOW_FSYNC_S:
                            with self._cv:
                                group = taken + self._queued_commits
                            if group >= 2:
                                self._hold = (group, time.monotonic() + min(self._fsync_ema / 2, HOLD_MAX_S))
                    failed = None
                except OSError as exc:
                    failed = exc
                    self._failed(exc, len(pending))
            if failed is not None:
                if stop:
                    give_up = give_up or time.monotonic() + 10.0
                    if time.monotonic() > give_up:
                        return
                continue                   # tried again RETRY_S after the failure (above)
            if self.error is not None:
                self.error = None
                self.log.warning("durability_write_resumed", file=str(self.current))
                self._wake()
            if stop and not pending and not self._unsynced:
                with self._cv:
                    if self._queue:
                        continue
                if self.mode == "off" and self._fd >= 0:
                    try:
                        os.fdatasync(self._fd)      # a clean stop leaves everything on disk, in every mode
                    except OSError:
                        pass
                return

    def _inline(self, record: tuple, commits: int) -> None:
        """Write and force one record from the loop thread, holding _io (see
        the module's docstring). A failure leaves the rest to the writer
        thread, which retries it as its own: the record goes back to the
        queue unless it was written whole, and bytes written but not forced
        stay in _unsynced for its next fsync."""
        size = len(record[2]) + rec.HDR.size
        with self._cv:
            self._queued_bytes += size       # counted as queued until written (_write takes it off)
        pending = [record]
        try:
            self._write(pending, self._rotate)
            self._sync()
        except OSError as exc:
            self._failed(exc, len(pending))
            with self._cv:
                self._queue[:0] = pending
                self._queued_commits += commits if pending else 0
                self._cv.notify()

    def _failed(self, exc: OSError, waiting: int) -> None:
        """A write or an fsync failed (the caller holds _io): the error
        stands until a write and fsync succeed again; said once, with a
        wake-up of the loop."""
        first = self.error is None
        self.error = disk_error(exc, "write log file", self.current or self.dir.path)
        self._retry_at = time.monotonic() + RETRY_S
        if first:
            self.log.error("durability_write_failed", error=str(self.error), errno=exc.errno,
                           file=str(self.current), waiting_records=waiting)
            self._wake()

    def _ready(self, pending: list) -> bool:
        """Whether the writer has work now (under _cv)."""
        if self._stop or self.error is not None or pending or self._sync_due():
            return True
        if not self._queue:
            return False
        return self.mode == "commit" or self._rotate or self._queued_bytes >= WRITE_BYTES or \
            time.monotonic() >= self._next_tick

    def _wait_s(self):
        if self.mode == "commit" or not (self._queue or self._unsynced):
            return None
        tick = self._next_tick if self._queue else self._last_sync + self.sync_interval
        return max(0.0, tick - time.monotonic())

    def _sync_due(self) -> bool:
        return self.mode == "interval" and bool(self._unsynced) and \
            time.monotonic() >= self._last_sync + self.sync_interval

    def _open_next(self, seq: int) -> None:
        """A new log file whose HEADER is record `seq` (the spare when there
        is one); its directory entry is fsynced before anything in it counts
        as written."""
        if self._fd >= 0:
            self._cut_refused()
            if self._unsynced or self.mode != "off":
                self._sync()
            os.close(self._fd)
            self._fd = -1
        path = self.dir.path / log_name(seq)
        spare = self.dir.path / SPARE
        hdr = dict(self.header, first_seq=seq, created_ns=time.time_ns())
        data = rec.LOG_MAGIC + b"".join(rec.frame(0, rec.KIND_HEADER, rec.pack(hdr)))
        made = spare.exists() and spare.stat().st_size >= self.file_size
        tmp = spare if made else path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC | (0 if made else os.O_CREAT | os.O_TRUNC), self.dir.mode)
        try:
            write_all(fd, data, 0)
            os.fdatasync(fd)
            os.replace(tmp, path)
            fsync_dir(self.dir.path)
        except BaseException:
            os.close(fd)
            if not made:
                tmp.unlink(missing_ok=True)
            raise
        self._fd = fd
        self._offset = self._tried_end = len(data)
        self.current = path
        self._rotate = False
        self._preallocated = made
        self._make_spare()

    def _cut_refused(self) -> None:
        """Before the writer leaves a file: a write the disk refused part-way
        left bytes of a record after the last whole one. A retry in the same
        file writes over them; one in the next file would leave them as a torn
        record in the middle of the log, which a cold start cuts there with
        every later file. So they go: the file is truncated (zeros written
        over them in a file made in advance, whose zeros are its end) and
        forced."""
        if self._tried_end <= self._offset:
            return
        if self._preallocated:
            write_all(self._fd, bytes(self._tried_end - self._offset), self._offset)
        else:
            os.ftruncate(self._fd, self._offset)
        os.fdatasync(self._fd)
        self._tried_end = self._offset

    def _make_spare(self) -> None:
        """Make the next file in advance, in a helper thread (at most one)."""
        if self.mode == "off" or (self._spare_thread is not None and self._spare_thread.is_alive()):
            return
        if (self.dir.path / SPARE).exists():
            return
        self._spare_thread = threading.Thread(target=self._spare, name="durability-log-spare", daemon=True)
        self._spare_thread.start()

    def _spare(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass
        tmp = self.dir.path / SPARE_TMP
        zeros = bytes(1 << 20)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, self.dir.mode)
            try:
                off = 0
                while off < self.file_size and not self._stop:
                    off, _ = write_yielding(fd, [zeros[:min(len(zeros), self.file_size - off)]], off, self.forcing)
                os.fdatasync(fd)
            finally:
                os.close(fd)
            if self._stop:
                tmp.unlink(missing_ok=True)
                return
            os.replace(tmp, self.dir.path / SPARE)
            fsync_dir(self.dir.path)
            self.spares_made += 1
            with self._cv:
                self._cv.notify()      # the writer may move onto it now
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            self.log.info("log_spare_not_made", error=str(exc))

    def _write(self, pending: list, rotate: bool) -> None:
        """Write `pending` (records in seq order) at the end of the current
        file, opening a new file first when asked or when it is full. What is
        written leaves `pending` as it goes, so a retry writes the rest."""
        while pending:
            if not self._preallocated and self._fd >= 0 and (self.dir.path / SPARE).exists():
                rotate = True          # onto a file made in advance: cheaper fsyncs from now on
            if rotate or self._fd < 0 or self._offset >= self.file_size:
                self._open_next(pending[0][0])
                rotate = False
            pieces: list = []
            size = self._offset
            j = 0
            while j < len(pending) and (size < self.file_size or j == 0):
                seq, kind, payload, first, last, aux1, aux2 = pending[j]
                fr = rec.frame(seq, kind, payload, first=first, last=last, aux1=aux1, aux2=aux2)
                pieces.extend(fr)
                size += sum(len(x) for x in fr)
                j += 1
            data = b"".join(pieces)
            self._tried_end = max(self._tried_end, self._offset + len(data))
            write_all(self._fd, data, self._offset)
            if self.mode != "off":
                self._unsynced.append((self._offset, data))
            self._offset += len(data)
            self.bytes_written += len(data)
            for k in range(j):
                if pending[k][1] in _SERIAL_KINDS:
                    self.written_serial = pending[k][4]
            self.written_seq = pending[j - 1][0]
            with self._cv:
                self._queued_bytes -= sum(len(p[2]) + rec.HDR.size for p in pending[:j])
            del pending[:j]
            self._unsynced_seq = (self.written_seq, self.written_serial)
            if self.mode == "off":
                self.synced_seq, self.synced_serial = self.written_seq, self.written_serial
            if self.want_wake and self.mode != "commit":
                self._wake()

    def _sync(self) -> None:
        t0 = time.monotonic()
        try:
            os.fdatasync(self._fd)
        except OSError:
            # the pages of the failed fsync may be gone: write them again before the next one
            for off, data in self._unsynced:
                write_all(self._fd, data, off)
            raise
        self.fsyncs += 1
        self._unsynced.clear()
        self._last_sync = time.monotonic()
        self._fsync_ema = 0.8 * self._fsync_ema + 0.2 * (self._last_sync - t0)
        self.synced_seq, self.synced_serial = self._unsynced_seq
        if self.want_wake:
            self._wake()


_SERIAL_KINDS = {rec.KIND_ENTRIES, rec.KIND_APPLIED, rec.KIND_GAP, rec.KIND_COPY_BEGIN, rec.KIND_COPY_END}


def _note(end: LogEnd, r: rec.Record) -> None:
    """What a record says about the serial the log stands at."""
    end.kinds.add(r.kind)
    if r.kind in (rec.KIND_ENTRIES, rec.KIND_APPLIED, rec.KIND_GAP):
        end.serial = r.last
        if r.kind == rec.KIND_APPLIED:
            end.source = r.aux1
    elif r.kind == rec.KIND_COPY_BEGIN:
        end.serial, end.source = r.first, r.aux1
    elif r.kind == rec.KIND_COPY_END:
        end.serial, end.source = r.last, r.aux1


def writev_all(fd: int, pieces: list, offset: int) -> int:
    """pwritev every byte of `pieces` (buffers, in order) at `offset`, without
    joining them; returns the offset after them."""
    views = [memoryview(p) for p in pieces if len(p)]
    while views:
        n = os.pwritev(fd, views, offset)
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]
    return offset


def _sync_file_range():
    """sync_file_range(fd, off, n, flags) from libc (it releases the GIL: ctypes), or a no-op."""
    try:
        import ctypes
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
        fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        return fn
    except (OSError, AttributeError):
        return lambda fd, off, n, flags: 0


sync_range = _sync_file_range()
RANGE_WRITE, RANGE_WAIT = 2, 1 | 2 | 4   # SYNC_FILE_RANGE_WRITE; WAIT_BEFORE | WRITE | WAIT_AFTER


def write_yielding(fd: int, pieces: list, offset: int, forcing) -> tuple[int, bool]:
    """A background writer's write (a checkpoint's record, a spare log file's
    zeros) of `pieces` at `offset`, giving way to the commits that wait on
    the log's fdatasyncs. Returns the offset after them and whether they are
    on disk already.

    Why: an fdatasync asks the disk to flush its cache, and the cache holds
    whatever any file wrote before it; a commit's fsync that comes after a
    4 MiB checkpoint write waits for those 4 MiB (checkpoints back to back
    took a durable commit's p99 from 1 ms to 12-30 ms). So while
    ``forcing()`` says commits wait on the log (LogWriter.forcing), the bytes
    go in YIELD_PIECE slices, each forced (fdatasync) before the next is
    written, and after each the writer sleeps so that it takes YIELD_SHARE
    of the disk's time at most: a commit's fsync finds one slice before it
    at most, and rarely that. It never sleeps longer than YIELD_MIN_RATE
    allows, so a checkpoint under a load that never stops still ends (on a
    2-core VM under 8 durable writers a slice's write and fsync take ~1 ms,
    so that floor is what it writes at: p99 of the commits 1.2-1.8x of
    without over six runs; with no floor ~6 MB/s and 1.1-1.3x). Otherwise
    (no commit waits: a checkpoint alone, log_sync "interval" or "off") they
    are written whole at the disk's speed and their write-back is started
    (sync_file_range), not waited for."""
    views = [memoryview(p).cast("B") for p in pieces if len(p)]
    if not forcing():
        start = offset
        offset = writev_all(fd, views, offset)
        sync_range(fd, start, offset - start, RANGE_WRITE)
        return offset, False
    for v in views:
        for i in range(0, len(v), YIELD_PIECE):
            t0 = time.monotonic()
            offset = write_all(fd, v[i:i + YIELD_PIECE], offset)
            os.fdatasync(fd)
            took = time.monotonic() - t0
            time.sleep(max(0.0, min(took * (1 / YIELD_SHARE - 1), YIELD_PIECE / YIELD_MIN_RATE - took)))
    return offset, True


def write_all(fd: int, data: bytes, offset: int) -> int:
    """pwrite every byte of `data` at `offset`; returns the offset after it."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
    return offset
