"""Durability on disk, the controller's part ([durability]; the files and
threads are appliance/durability/).

- Each batch the controller publishes becomes one log record: on a primary
  (or a standalone appliance) the change-log entries the batch appended,
  copied out of the ring right after the publish (:meth:`Durable.published`);
  on a secondary what it applied of its primary's stream, or a step of a
  block copy (:meth:`Durable.applied`). The record goes to the writer
  thread (durability.logfiles.LogWriter), which appends and forces it.
- With ``log_sync = "commit"`` a commit's answer waits until its record is
  on disk (:meth:`Durable.when_durable`; group commit: every record that
  queued during one fdatasync shares the next). A commit that also waits for
  synchronous secondaries waits for both: commit.py asks for the disk once
  the secondaries confirmed. The records stay locked only for the
  secondaries ([0104]): a later transaction that reads a record is logged
  after it, so it is never on disk without it. A secondary answers OP_APPLY
  (its agent then acknowledges) once what it applied is on disk.
- ``"interval"`` and ``"off"`` answer at once; the writer forces the files
  at most every sync_interval, or never. Should the writer fall behind by
  more than BACKLOG bytes, commits wait for it to write (not to force), so
  memory stays bounded.
- A disk that refuses (ENOSPC, EIO): commits are refused before they change
  anything (DiskFullError / DiskError, typed, "nothing was changed");
  commits already applied whose record is not on disk are answered with the
  same error saying so (committed in memory, not durable: not
  acknowledged); the writer keeps trying and everything goes on once it can
  write again.
- Checkpoints (:meth:`Durable.start_checkpoint`: ``appliance checkpoint``,
  or ``checkpoint_every``); afterwards the checkpoints past
  ``keep_checkpoints`` and the log files only they needed are deleted.

Shared: with the writer and checkpoint threads only through the objects of
durability/ (their docstrings say what and how); everything here runs on the
loop thread, woken through the writer's eventfd (Loop.watch_fd).
"""
from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque

from .. import errors
from .._native import ffi, lib
from ..durability import checkpoint as ckp
from ..durability import records as rec
from ..durability.coldstart import file_directory
from ..durability.logfiles import LogDir, LogEnd, LogWriter, file_header
from ..store import changelog
from ..wire import messages as m
from .ops import handler

__all__ = ["Durable", "WAIT_DURABLE", "BACKLOG"]

WAIT_DURABLE = object()      # a request waits for its record to be on disk (a secondary's OP_APPLY)
BACKLOG = 64 << 20           # bytes queued for the writer past which commits wait (interval, off)
_EXPORT_CAP = 1 << 20


class Durable:
    def __init__(self, ctl, d: LogDir) -> None:
        self.ctl = ctl
        self.dir = d
        self.log = ctl.log.bind(durability_dir=str(d.path))
        self.cfg = ctl.cfg.durability
        self.mode = self.cfg.log_sync
        self.att = ctl.att
        self._waiting: list = []            # heap of (seq, n, fn): answers waiting for their record on disk
        self._waiting_written: list = []    # the same, waiting only for it to be written (BACKLOG)
        self._n = itertools.count()
        self._unsynced: deque = deque()     # (last serial, seq) of this primary's ENTRIES not yet on disk
        self.needs_checkpoint: str | None = None
        self.cut = None
        self.gap = None
        self.checkpoint: ckp.CheckpointWriter | None = None
        self._retirer: threading.Thread | None = None   # deleting files a checkpoint made unneeded
        self.checkpoints = {"taken": 0, "failed": 0, "last_error": None}
        self.last_checkpoint = self._newest_checkpoint()
        self._last_checkpoint_mono = time.monotonic()
        self._reported_error = None
        self._buf = ffi.new("uint8_t[]", _EXPORT_CAP)
        self._cap = _EXPORT_CAP
        self._pos = ffi.new("uint64_t *")
        self._first, self._last, self._count = (ffi.new("uint64_t *") for _ in range(3))
        cold = d.continue_at
        if cold is not None:
            end = cold                       # a cold start read the whole log
            if d.copy_incomplete:
                ctl.applier.needs_copy = "the cold start ended inside a block copy from the primary"
        else:
            end, self.cut = d.tail()
        sb = self.att.sb
        pb = sb.sb_pub[sb.sb_version & 1]
        self.pos = pb.pb_log_head           # the change log is copied out from here
        self.exported = pb.pb_serial         # ... and this is the last serial copied out
        header = {"format": rec.FORMAT, "kind": "log", "appliance": ctl.cfg.name, "instance": sb.sb_instance,
                  "schema_hash": ctl.cfg.schema_hash(), "layout": ctl.cfg.layout(), "role": ctl.role.name,
                  "epoch": sb.sb_epoch}
        self._check_files(end, header)
        self.writer = LogWriter(d, mode=self.mode, sync_interval=self.cfg.sync_interval,
                                file_size=self.cfg.log_file_size, header=header, end=end, log=self.log)
        # bytes since the checkpoint = what the files held after it at start + what is written from now on
        self._bytes_at_checkpoint = -d.log_bytes_after(self.last_checkpoint["log_seq"] if self.last_checkpoint else 0,
                                                       end)
        if cold is None:
            self._continue(end, pb)
        ctl.watch_fd(self.writer.wake_fd, self._woken)
        ctl.role.on_change(self._role_changed)
        if self.needs_checkpoint:
            self.log.warning("checkpoint_needed", reason=self.needs_checkpoint)
            self.start_checkpoint(self.needs_checkpoint)

    # ------------------------------------------------------------------ start-up

    def _newest_checkpoint(self) -> dict | None:
        for seq, path in reversed(self.dir.checkpoints()):
            try:
                h = ckp.read_header(path)
            except ckp.BadCheckpoint:
                continue
            return {"file": path.name, "log_seq": seq, "serial": h.get("serial"), "version": h.get("version"),
                    "at_ns": h.get("created_ns"), "blocks": h.get("block_limit")}
        return None

    def _check_files(self, end: LogEnd, header: dict) -> None:
        """Files of another incarnation of the appliance are refused (the segments win only over nothing)."""
        newest = self.dir.logs()[-1:]
        if not newest:
            newest = self.dir.checkpoints()[-1:]
        for _first, path in newest:
            try:
                h = ckp.read_header(path) if path.name.startswith("checkpoint-") else file_header(path) or {}
            except ckp.BadCheckpoint:
                continue
            if h.get("instance") != header["instance"] or h.get("appliance") != header["appliance"]:
                raise errors.DiskError(
                    f"{self.ctl.cfg.path}: durability.dir {self.dir.path} holds the files of another "
                    f"appliance or of another incarnation of it (instance {h.get('instance')}, these segments "
                    f"are {header['instance']}); move it aside (the next start writes a checkpoint) or "
                    f"remove the segments (appliance destroy) to load the files", path=str(self.dir.path))

    def _continue(self, end: LogEnd, pb) -> None:
        """A plain restart (the segments were there): make the files reach
        the published state, from the change log ring when it still holds
        what they miss, else by a checkpoint."""
        ctl = self.ctl
        if ctl.role.is_secondary:
            here, source = pb.pb_source_serial, pb.pb_source_instance
            if end.seq == 0 and not self.dir.checkpoints():
                if here:
                    self.needs_checkpoint = "durability was enabled on a secondary that holds data"
            elif (end.serial, end.source) != (here, source) and here:
                self._gap(end.serial, here, "the segments have applied past the files")
            return
        here = pb.pb_serial
        if end.seq == 0 and not self.dir.checkpoints():
            if here:
                self.needs_checkpoint = "durability was enabled on an appliance that holds data"
            return
        if end.serial > here:
            raise errors.DiskError(
                f"{ctl.cfg.path}: durability.dir {self.dir.path} holds serials up to {end.serial} but the "
                f"segments only up to {here}: not the same history. Move the directory aside (the next start "
                f"writes a checkpoint) or remove the segments (appliance destroy) to load the files",
                path=str(self.dir.path))
        if end.serial == here:
            return
        rc = lib.apl_log_seek(ctl.reader.view, end.serial + 1, self._pos)
        if rc == lib.APL_OK:
            self.pos = self._pos[0]
            self.published()
            self.log.warning("log_files_caught_up", serials=f"{end.serial + 1}..{here}",
                             reason="the controller stopped before writing them")
        else:
            self._gap(end.serial, here + 1, "the change log no longer holds what the files miss")

    def _gap(self, after: int, nxt: int, why: str) -> None:
        """The files cannot follow the segments: say so in the log (GAP) and
        take a checkpoint now (the log before the gap is kept for the older
        checkpoints; a cold start replays no further than the gap)."""
        self.gap = {"after": after, "next": nxt, "reason": why}
        self.writer.submit(rec.KIND_GAP, rec.pack(self.gap), first=after, last=nxt)
        self.needs_checkpoint = f"log gap after serial {after}: {why}"
        self.log.error("log_gap", after=after, next=nxt, reason=why)

    def history_changed(self, why: str) -> None:
        """A failover changed the memory in a way no log record replays (a
        promote restarting the change log, a rewind from B logs, lz4 backup
        blocks laid out as primary blocks in new segments): the log says so
        (GAP: a cold start replays no further than the state before it) and a
        checkpoint of the state now is taken at once."""
        ctl = self.ctl
        self.att = ctl.att                  # (a promote of an lz4 secondary made new segments)
        sb = self.att.sb
        pb = sb.sb_pub[sb.sb_version & 1]
        serial = pb.pb_source_serial if ctl.role.is_secondary else pb.pb_serial
        self._gap(serial, serial + 1, why)
        if not ctl.role.is_secondary:
            self.pos = changelog.bounds(ctl.reader)["head"]
        self._try_checkpoint(self.needs_checkpoint)

    # ------------------------------------------------------------------ records

    def published(self, commits: int = 0) -> None:
        """A primary published a batch (of `commits` commits to answer): its
        change-log entries become one record (called right after the publish,
        in the same loop turn)."""
        blob, first, last = self._export()
        if not blob:
            return
        sb = self.att.sb
        seq = self.writer.submit(rec.KIND_ENTRIES, blob, first=first, last=last,
                                 aux1=sb.sb_pub[sb.sb_version & 1].pb_txn, aux2=sb.sb_txn_next, commits=commits)
        self._unsynced.append((last, seq))
        self.exported = last

    def _export(self) -> tuple[bytes, int, int]:
        """Entries from self.pos to the published head, whole."""
        view = self.ctl.reader.view
        chunks, first, last = [], 0, 0
        while True:
            self._pos[0] = self.pos
            n = lib.apl_log_export(view, self._pos, self._buf, self._cap, 0, 0, self._first, self._last,
                                   self._count)
            if n == lib.APL_EBUFSIZE:
                self._cap = max(self._cap * 2, int.from_bytes(bytes(ffi.buffer(self._buf, 8)), "little"))
                self._buf = ffi.new("uint8_t[]", self._cap)
                continue
            if n == lib.APL_ELOGFULL:     # a batch larger than the ring: what it overwrote is lost to the files
                b = changelog.bounds(self.ctl.reader)
                self._gap(last or self.exported, b["serial"] + 1, "a batch overwrote the change "
                          "log ring before it was copied out (storage.log_size too small for it)")
                self.pos = b["head"]
                return b"", 0, 0
            if n < 0:
                raise errors.error_for("APL_ECORRUPT", f"copy the change log out for the log files ({n})")
            if n == 0:
                break
            if not first:
                first = self._first[0]
            last = self._last[0]
            chunks.append(bytes(ffi.buffer(self._buf, n)))
            self.pos = self._pos[0]
        return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), first, last

    def applied(self, kind: int, payload: bytes, *, first: int = 0, last: int = 0, source: int = 0) -> int:
        """A secondary published what it applied of its primary's stream (or
        a step of a block copy); returns the record's seq."""
        return self.writer.submit(kind, payload, first=first, last=last, aux1=source)

    def _role_changed(self, old: str, new: str) -> None:
        self._role_record(new)

    def fenced(self) -> None:
        """The primary was fenced (recovery.py): the files say so too, so a
        cold start of it still takes no writes."""
        self._role_record(self.ctl.role.name)

    def _role_record(self, role: str) -> None:
        sb = self.att.sb
        epoch = sb.sb_epoch
        # with the primary a promoted one continues (recovery.py: what a rejoin of that primary rewinds to),
        # and the newer epoch a fenced primary learnt of
        fork = {"fork_instance": sb.sb_fork_instance, "fork_serial": sb.sb_fork_serial, **fence_of(sb)}
        self.writer.header.update(role=role, epoch=epoch, **fork)
        self.writer.submit(rec.KIND_ROLE, rec.pack({"role": role, "epoch": epoch, **fork}))
        self._unsynced.clear()
        self.pos = changelog.bounds(self.ctl.reader)["head"]

    # ------------------------------------------------------------------ answers that wait for the disk

    def refusal(self) -> errors.DiskError | None:
        """Why commits are refused now (the disk refuses the log), or None."""
        e = self.writer.error
        if e is None:
            return None
        return type(e)(f"the log cannot be written to {self.dir.path} ({e.details.get('strerror')} writing "
                       f"{e.details.get('path')}); commits are refused until it can be, nothing was changed",
                       code=e.code, path=str(self.dir.path), committed=False)

    def acknowledgeable(self, applied: int) -> int:
        """On a secondary with log_sync = "commit": the last primary serial
        its agent may tell the primary it holds (START after the agent
        restarts) — `applied`, unless records it applied are not on disk yet
        (queued, or the disk refuses them), then the serial that is. The
        primary resends the rest; applying skips what is here already and its
        answer waits for the disk, so nothing is acknowledged before it is
        durable."""
        w = self.writer
        if self.mode != "commit" or (w.error is None and w.synced_seq >= w.next_seq - 1):
            return applied
        return min(applied, w.synced_serial)

    def when_durable(self, serial: int, fn) -> None:
        """Call fn(None) once the record holding commit serial `serial` is on
        disk (log_sync = "commit"; otherwise at once), or fn(error) when the
        disk refuses it."""
        w = self.writer
        backlog = w.queued_bytes > BACKLOG
        if self.mode != "commit" and not backlog:
            fn(None)
            return
        seq = None
        for last, s in self._unsynced:
            if last >= serial:
                seq = s
                break
        self._wait(seq, fn, written=self.mode != "commit")

    def _wait(self, seq, fn, *, written: bool = False) -> None:
        w = self.writer
        if seq is None or seq <= (w.written_seq if written else w.synced_seq):
            fn(None)
        elif w.error is not None:
            fn(self._not_durable(seq))
        else:
            heapq.heappush(self._waiting_written if written else self._waiting, (seq, next(self._n), fn))
            w.want_wake = True

    def wait_seq(self, sess, seq: int):
        """A request's wait for record `seq` on disk (log_sync = "commit"): a
        generator for the op handlers."""
        if self.mode != "commit" or seq <= self.writer.synced_seq:
            return None
        if self.writer.error is not None:   # _wait would answer before this request waits: raise it here
            raise self._not_durable(seq)
        ctl = self.ctl
        self._wait(seq, lambda exc: ctl.resume(sess, None, exc))
        return (yield WAIT_DURABLE)

    def _not_durable(self, seq) -> errors.DiskError:
        e = self.writer.error
        return type(e)(f"applied in memory, but its log could not be written to {self.dir.path} "
                       f"({e.details.get('strerror')} writing {e.details.get('path')}); it is not durable yet and "
                       "is written once the disk takes it again; do not retry it",
                       code=e.code, path=str(self.dir.path), committed=True)

    def _woken(self) -> None:
        """The writer or the checkpoint thread moved (the eventfd)."""
        w = self.writer
        w.drain()
        synced, written = w.synced_seq, w.written_seq
        while self._unsynced and self._unsynced[0][1] <= synced:
            self._unsynced.popleft()
        for heap, upto in ((self._waiting, synced), (self._waiting_written, written)):
            while heap and heap[0][0] <= upto:
                heapq.heappop(heap)[2](None)
        if w.error is not None:
            if self._reported_error is None:
                self._reported_error = w.error
            for heap in (self._waiting, self._waiting_written):
                while heap:
                    seq, _, fn = heapq.heappop(heap)
                    fn(self._not_durable(seq))
        elif self._reported_error is not None:
            self._reported_error = None
        if self.mode != "commit" and not self._waiting and not self._waiting_written:
            w.want_wake = False
        cp = self.checkpoint
        if cp is not None and cp.done and not getattr(cp, "handled", False):
            cp.handled = True
            self._checkpoint_done(cp)

    # ------------------------------------------------------------------ checkpoints

    def start_checkpoint(self, reason: str) -> int:
        """Begin a checkpoint at the version published now (or join the one
        running); returns its number."""
        cp = self.checkpoint
        if cp is not None and not cp.done:
            return cp.number
        ctl = self.ctl
        if ctl.applier.copied is not None:
            raise errors.BusyError("checkpoint: a block copy from the primary is in progress; the checkpoint "
                                   "can be taken once it ends")
        pin = ctl.reader.pin()
        sb = self.att.sb
        v = pin.version
        pb = sb.sb_pub[v & 1]
        header = {"format": rec.FORMAT, "kind": "checkpoint", "appliance": ctl.cfg.name,
                  "instance": sb.sb_instance, "schema_hash": ctl.cfg.schema_hash(), "layout": ctl.cfg.layout(),
                  "files": file_directory(self.att), "log_seq": self.writer.next_seq - 1, "version": v,
                  "serial": pb.pb_serial, "txn_last": pb.pb_txn, "txn_next": sb.sb_txn_next, "epoch": sb.sb_epoch,
                  "role": ctl.role.name, "source_serial": pb.pb_source_serial,
                  "source_instance": pb.pb_source_instance, "fork_instance": sb.sb_fork_instance,
                  "fork_serial": sb.sb_fork_serial, **fence_of(sb), "block_limit": ctl.reader.block_limit(),
                  "block_size": sb.sb_block_size, "created_ns": time.time_ns(), "reason": reason,
                  "log_bytes": self.writer.bytes_written}
        number = self.checkpoints["taken"] + self.checkpoints["failed"] + 1
        self.checkpoint = ckp.CheckpointWriter(self.dir, ctl.reader, pin, header, wake_fd=self.writer.wake_fd,
                                               log=self.log, number=number, forcing=self.writer.forcing)
        self._last_checkpoint_mono = time.monotonic()
        self.log.info("checkpoint_started", number=number, version=v, serial=pb.pb_serial,
                      log_seq=header["log_seq"], blocks=header["block_limit"], reason=reason)
        return number

    def _checkpoint_done(self, cp: ckp.CheckpointWriter) -> None:
        if cp.error is not None:
            self.checkpoints["failed"] += 1
            self.checkpoints["last_error"] = str(cp.error)
            self.log.error("checkpoint_failed", number=cp.number, error=str(cp.error))
            return
        self.checkpoints["taken"] += 1
        self.checkpoints["last_error"] = None
        self.last_checkpoint = dict(cp.result, number=cp.number)
        self._bytes_at_checkpoint = cp.header["log_bytes"]
        if self.needs_checkpoint:
            self.needs_checkpoint = None
            self.gap = None
        self.log.info("checkpoint_written", number=cp.number, **cp.result)
        # a new log file only when the current one is past half full: the files before the
        # checkpoint can go either way, and each new file is log_file_size of zeros made in
        # advance (under frequent checkpoints, more disk writes than the checkpoints themselves)
        self.writer.rotate(past=0.5)
        self._retire = True

    def housekeeping(self) -> None:
        """Once a second: retire files after a checkpoint; checkpoint_every."""
        if getattr(self, "_retire", False) and self.writer.current is not None and \
                self.writer.written_seq > (self.last_checkpoint or {}).get("log_seq", 0) and \
                (self._retirer is None or not self._retirer.is_alive()):
            self._retire = False       # the writer moved to a new file: the old ones may go
            # in a thread of its own: unlinking a checkpoint of a gigabyte takes the file system
            # tens of milliseconds, which the loop (every commit) must not wait out. It deletes
            # only files older than the newest `keep` checkpoints and the current log file, which
            # nothing else touches; one at a time
            self._retirer = threading.Thread(
                target=ckp.retire, name="durability-retire", daemon=True,
                args=(self.dir, self.ctl.cfg.durability.keep_checkpoints, self.writer.current, self.log))
            self._retirer.start()
        cp = self.checkpoint
        if cp is not None and not cp.done:
            return
        cfg = self.ctl.cfg.durability      # reloadable: read each round
        last_seq = (self.last_checkpoint or {}).get("log_seq", 0)
        if self.writer.next_seq - 1 <= last_seq or self.writer.error is not None:
            return                     # nothing new since the last checkpoint (or the disk refuses)
        if self.needs_checkpoint:
            if cp is None or cp.error is not None and time.monotonic() - self._last_checkpoint_mono > 10:
                self._try_checkpoint(self.needs_checkpoint)
            return
        every_s, every_b = cfg.checkpoint_seconds, cfg.checkpoint_bytes
        if every_s is not None and time.monotonic() - self._last_checkpoint_mono >= every_s:
            self._try_checkpoint("checkpoint_every")
        elif every_b is not None and self.log_bytes_since_checkpoint() >= every_b:
            self._try_checkpoint("checkpoint_every")

    def _try_checkpoint(self, reason: str) -> None:
        try:
            self.start_checkpoint(reason)
        except errors.BusyError:
            pass

    def log_bytes_since_checkpoint(self) -> int:
        return max(0, self.writer.bytes_written - self._bytes_at_checkpoint)

    # ------------------------------------------------------------------ status, stop

    def status(self) -> dict:
        w = self.writer
        cp = self.checkpoint
        running = None
        if cp is not None and not cp.done:
            el = max(time.monotonic() - cp.started, 1e-6)
            pr = cp.progress
            running = dict(pr, number=cp.number, seconds=round(el, 1), rate_mb_s=round(pr["bytes"] / el / 1e6, 1))
        return {
            "dir": str(self.dir.path), "log_sync": self.mode,
            "durable_serial": w.synced_serial, "written_serial": w.written_serial,
            "durable_seq": w.synced_seq, "log_seq": w.next_seq - 1,
            "log_bytes_since_checkpoint": self.log_bytes_since_checkpoint(),
            "log_files": len(self.dir.logs()), "current_file": w.current.name if w.current else None,
            "fsyncs": w.fsyncs, "queued_bytes": w.queued_bytes,
            "waiting_commits": len(self._waiting) + len(self._waiting_written),
            "error": str(w.error) if w.error is not None else None,
            "last_checkpoint": self.last_checkpoint, "checkpoint": running,
            "checkpoints": dict(self.checkpoints), "checkpoint_every": str(self.cfg.checkpoint_every),
            "keep_checkpoints": self.ctl.cfg.durability.keep_checkpoints,
            "needs_checkpoint": self.needs_checkpoint, "gap": self.gap, "log_cut": self.cut,
        }

    def close(self) -> None:
        """Stop: a running checkpoint is given up (its .tmp is removed at the
        next start), everything queued is written and forced."""
        cp = self.checkpoint
        if cp is not None and not cp.done:
            cp.cancel()
            cp.join(30)
        if self._retirer is not None:
            self._retirer.join(30)
        if not self.writer.stop():
            self.log.error("durability_stop_incomplete", durable_seq=self.writer.synced_seq,
                           log_seq=self.writer.next_seq - 1, error=str(self.writer.error))


@handler(m.OP_CHECKPOINT)
def checkpoint(ctl, sess):
    d = ctl.durable
    if d is None:
        raise errors.ConfigError(f"{ctl.cfg.path}: checkpoint: appliance {ctl.cfg.name!r} has no [durability] "
                                 "section (memory only): nothing to write a checkpoint to",
                                 file=str(ctl.cfg.path), key="durability", problem="no [durability] section")
    n = d.start_checkpoint("operator")
    return {"number": n, "dir": str(d.dir.path)}


def fence_of(sb) -> dict:
    """A fenced primary's newer epoch and the primary at it (0, "": none)."""
    return {"fenced_epoch": sb.sb_fenced_epoch,
            "fenced_by": ffi.string(sb.sb_fenced_by).decode(errors="replace")}
