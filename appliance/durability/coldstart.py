"""Cold start: the segments made anew from the durability files.

When the controller finds no segments but a durability directory that
holds data (every machine lost power, or was rebooted), it:

1. takes the newest checkpoint (none, when no checkpoint was ever taken and
   the log reaches back to its first record);
2. makes fresh segments with the appliance's instance (so secondaries and
   clients see the same appliance), and in one batch lays the checkpoint's
   block images into them — the way a secondary takes a block copy
   (apl_apply_images, then apl_drop_uncopied);
3. replays the log records after the checkpoint in the same batch — the
   way a secondary applies its primary's stream (apl_apply_entries: whole
   transactions only, a record's entries carry their own block numbers and
   BLOCK images, so the blocks come out as they were); a secondary's own
   records (the entries it applied, its block copies) are replayed the way
   it first applied them;
4. sets the serial, transaction numbers, epoch and role (with the primary
   a promoted appliance continues, the fork) where the files end,
   publishes, and rebuilds the free lists as a restart does.

A checkpoint found corrupt or incomplete part-way (a checksum, a missing
end) is given up — the segments it was being laid into are removed — and
the previous one is used with its logs (which are kept for that: see
checkpoint.retire). The log ends at its first record that is not whole and
valid: a torn tail is cut there, never applied in part. Nothing runs in
parallel with this but the thread that maps the new segments' pages
(store/prefault.py): the controller serves only once it is done.
"""
from __future__ import annotations

import time

from .. import errors
from .._native import ffi
from .._os import sdnotify
from ..config import Config, layout_differences
from ..store.prefault import Prefault
from ..store.segment import unlink_all
from . import checkpoint as ckp
from . import records as rec
from .logfiles import LogDir, LogEnd, StopLog, file_header

__all__ = ["cold_start", "file_directory"]


def file_directory(att) -> list[list]:
    """The file directory of a store: [name, kind, root, meta, table] per file."""
    sb = att.sb
    fl = ffi.cast("struct apl_file *", att.meta.ptr + sb.sb_files_off)
    return [[ffi.string(fl[i].fl_name).decode(), fl[i].fl_kind, fl[i].fl_root, fl[i].fl_meta, fl[i].fl_table]
            for i in range(sb.sb_nfiles)]


def _log_header(d: LogDir) -> dict | None:
    """The HEADER of the oldest log file (who the files belong to)."""
    logs = d.logs()
    return file_header(logs[0][1]) if logs else None


def _check_header(cfg: Config, h: dict, what: str) -> None:
    """Files of another appliance or another layout are refused, never loaded."""
    if h.get("appliance") != cfg.name:
        raise errors.DiskError(f"{cfg.path}: durability.dir: {what} belongs to appliance {h.get('appliance')!r}, "
                               f"not {cfg.name!r}; give each appliance its own directory",
                               path=str(cfg.durability_dir))
    if h.get("schema_hash") != cfg.schema_hash():
        differ = "; ".join(layout_differences(h.get("layout") or {}, cfg.layout())) or "tables or storage settings"
        raise errors.FormatError(f"{cfg.path}: {what} was made with a different layout ({differ.replace('in shared memory', 'in the files')}). "
                                 "Restore the previous configuration, or move durability.dir aside to start empty",
                                 appliance=cfg.name)


class _Replay:
    """The state a replay carries from record to record."""

    def __init__(self, wr, cfg: Config, start: dict) -> None:
        self.wr = wr
        self.cfg = cfg
        self.serial = start.get("serial", 0)
        self.txn_last = start.get("txn_last", 0)
        self.txn_next = start.get("txn_next", 1)
        self.epoch = start.get("epoch", 0)
        self.role = start.get("role")
        self.source_serial = start.get("source_serial", 0)
        self.source = start.get("source_instance", 0)
        self.fork = (start.get("fork_instance", 0), start.get("fork_serial", 0))
        self.fenced = (start.get("fenced_epoch", 0), start.get("fenced_by", ""))
        self.copied: bytearray | None = None
        self.records = 0
        self.entries = 0
        self.gap: dict | None = None
        self.nbits = wr.att.sb.sb_max_blocks
        self.strict = "version" not in start    # the log alone: it must begin at the first serial

    def record(self, r: rec.Record) -> None:
        try:
            self._record(r)
        except errors.ApplianceError as e:   # a record whole and valid that does not apply: refuse, load nothing
            raise errors.DiskError(f"{self.cfg.path}: cold start: log record seq {r.seq} "
                                   f"({rec.KIND_NAMES.get(r.kind, r.kind)}) does not apply to the state before "
                                   f"it ({e}); nothing was loaded", path=str(self.cfg.durability_dir)) from None
        self.records += 1

    def _record(self, r: rec.Record) -> None:
        wr, k = self.wr, r.kind
        if k == rec.KIND_ENTRIES:
            if r.first != self.serial + 1:
                if self.strict and not self.entries:
                    raise errors.DiskError(
                        f"{self.cfg.path}: durability.dir {self.cfg.durability_dir}: the log begins at serial "
                        f"{r.first} and no checkpoint holds the serials before it (durability was enabled on an "
                        "appliance with data and its first checkpoint was not written); nothing was loaded",
                        path=str(self.cfg.durability_dir))
                raise StopLog(f"record seq {r.seq} holds serials {r.first}..{r.last} after serial {self.serial}")
            consumed, last, _ = wr.apply_entries(r.payload, self.serial, None)
            if consumed != len(r.payload) or last != r.last:
                raise StopLog(f"record seq {r.seq}: its entries do not end with a whole transaction")
            self.serial = r.last
            self.txn_last, self.txn_next = max(self.txn_last, r.aux1), max(self.txn_next, r.aux2)
            self.entries += r.last - r.first + 1
        elif k == rec.KIND_APPLIED:
            if self.source and r.aux1 != self.source:
                raise StopLog(f"record seq {r.seq}: entries of primary {r.aux1} after {self.source}'s")
            consumed, last, _ = wr.apply_entries(r.payload, self.source_serial, self.copied)
            if last < r.last:
                raise StopLog(f"record seq {r.seq}: entries {r.first}..{r.last} apply only up to {last}")
            self.source_serial, self.source = r.last, r.aux1
            self.entries += r.last - r.first + 1
        elif k == rec.KIND_COPY_BEGIN:
            blocks = r.doc().get("blocks")
            if blocks is not None:    # a copy of some blocks (a rewind's, a repair's): the stream stays
                from ..controller.apply import partial_copy
                self.copied = partial_copy(blocks, self.nbits)
            else:
                self.copied = bytearray((self.nbits + 7) // 8)
                self.source_serial, self.source = r.first, r.aux1
        elif k == rec.KIND_COPY_BLOCKS:
            if self.copied is None:
                raise StopLog(f"record seq {r.seq}: copied blocks outside a copy")
            wr.apply_images(r.payload, self.copied)
        elif k == rec.KIND_COPY_END:
            if self.copied is None:
                raise StopLog(f"record seq {r.seq}: the end of a copy that did not begin")
            wr.drop_uncopied(self.copied)
            self.copied = None
            if not r.doc().get("partial"):
                self.source_serial, self.source = r.last, r.aux1
        elif k == rec.KIND_ROLE:
            doc = r.doc()
            self.role, self.epoch = doc.get("role", self.role), max(self.epoch, int(doc.get("epoch", 0)))
            if "fork_instance" in doc:
                self.fork = (doc["fork_instance"], doc.get("fork_serial", 0))
            if "fenced_epoch" in doc:
                self.fenced = (doc["fenced_epoch"], doc.get("fenced_by", ""))
        elif k == rec.KIND_GAP:
            self.gap = {"after": r.first, "next": r.last, "seq": r.seq}
            raise StopLog(f"record seq {r.seq}: serials {r.first + 1}..{r.last - 1} never reached the files "
                          "(the controller stopped before writing them and its change log no longer held them)")


def _discard(cfg: Config, wr, pages: Prefault | None) -> None:
    """Give up the segments being laid in: the thread mapping their pages
    stops first (it must not touch them once unmapped), then they go."""
    if pages is not None:
        pages.stop()
    wr.close()
    unlink_all(cfg.name, cfg.storage.segments)


def cold_start(cfg: Config, log, d: LogDir):
    """Make the segments from the files; (writer, recovery facts)."""
    from ..controller.role import ROLES
    from ..controller.storage import create
    t0 = time.monotonic()
    skipped = []
    candidates = list(reversed(d.checkpoints())) + [None]
    for cand in candidates:
        if cand is None:
            logs = d.logs()
            if not logs or logs[0][0] != 1:
                continue          # without a checkpoint the log must reach back to its first record
            header = _log_header(d)
            if header is None:
                continue
            _check_header(cfg, header, f"log file {logs[0][1].name}")
            start = {"serial": 0, "role": header.get("role"), "epoch": header.get("epoch", 0)}
            after, path = 0, None
        else:
            after, path = cand
            try:
                header = ckp.read_header(path)
            except ckp.BadCheckpoint as e:
                skipped.append({"file": path.name, "reason": str(e)})
                log.error("checkpoint_unusable", file=path.name, reason=str(e))
                continue
            _check_header(cfg, header, f"checkpoint {path.name}")
            start = header
        sdnotify.status(f"cold start of {cfg.name}: loading "
                        + (f"checkpoint {path.name} and the log after it" if path else "the log from its start"))
        log.info("cold_start_loading", checkpoint=path.name if path else None, dir=str(d.path))
        # reads while create() reserves; its buffers are used again (records._Pool: apply_images and
        # apply_entries are done with a record's payload when the next is asked for)
        ahead = rec.ReadAhead(path, rec.CHECKPOINT_MAGIC, reuse=True) if path is not None else None
        t_reserve = time.monotonic()
        try:
            wr = create(cfg, instance=header.get("instance"))
        except BaseException:
            if ahead is not None:
                ahead.close()
            raise
        # the pages mapped on the other core while this one lays the blocks in (each page's first
        # fault was most of the load); the controller maps the rest once it serves
        pages = Prefault(wr.att.devices, log).start() if cfg.storage.prefault else None
        phases = {"reserve": time.monotonic() - t_reserve}
        try:
            wr.begin()
            t = time.monotonic()
            if path is not None:
                copied = bytearray((wr.att.sb.sb_max_blocks + 7) // 8)
                try:
                    ckp.load(path, lambda images: wr.apply_images(images, copied), ahead)
                except ckp.BadCheckpoint as e:
                    skipped.append({"file": path.name, "reason": str(e)})
                    log.error("checkpoint_unusable", file=path.name, reason=str(e))
                    _discard(cfg, wr, pages)
                    continue
                if header.get("files") and header["files"] != file_directory(wr.att):
                    raise errors.FormatError(f"{cfg.path}: checkpoint {path.name} has another file directory "
                                             "than this configuration makes", appliance=cfg.name)
                wr.drop_uncopied(copied)
            phases["checkpoint"], t = time.monotonic() - t, time.monotonic()
            replay = _Replay(wr, cfg, start)
            end, cut = d.read(after, replay.record, reuse=True)
            phases["log"], t = time.monotonic() - t, time.monotonic()
            role = replay.role
            if replay.epoch:
                wr.set_epoch(replay.epoch)
            if role in ROLES:
                wr.att.sb.sb_role = ROLES[role]
            wr.att.sb.sb_fork_instance, wr.att.sb.sb_fork_serial = replay.fork
            if replay.fenced[0] > replay.epoch and role == "primary":    # a fenced primary stays fenced
                wr.att.sb.sb_fenced_epoch = replay.fenced[0]
                by = str(replay.fenced[1] or "").encode()[:47]
                ffi.memmove(wr.att.sb.sb_fenced_by, by + b"\0" * (48 - len(by)), 48)
            if replay.source or replay.source_serial:
                wr.set_source(replay.source_serial, replay.source)
            wr.resume(replay.serial, replay.txn_next)
            wr.publish(time.time_ns(), replay.txn_last)
            rec_facts = wr.recover()
            phases["recover"] = time.monotonic() - t
        except BaseException:
            _discard(cfg, wr, pages)
            raise
        if pages is not None:
            pages.stop()
        seconds = round(time.monotonic() - t0, 3)
        facts = {"cold_start": {
            "checkpoint": path.name if path is not None else None,
            "checkpoint_serial": start.get("serial") if path is not None else None,
            "checkpoint_seq": after, "records_replayed": replay.records, "entries_replayed": replay.entries,
            "serial": replay.serial, "source_serial": replay.source_serial, "log_seq": end.seq,
            "seconds": seconds, "phases": {k: round(v, 3) for k, v in phases.items()},
            "checkpoints_skipped": skipped, "log_cut": cut,
            "copy_incomplete": replay.copied is not None, "gap": replay.gap},
            **{k: v for k, v in rec_facts.items() if k in ("blocks_live", "slots_used")}}
        log.warning("cold_start_loaded", **{k: v for k, v in facts["cold_start"].items() if v not in (None, [], {})},
                    blocks=rec_facts["blocks_live"])
        d.continue_at = end    # where the log goes on (controller/durable.py)
        d.copy_incomplete = replay.copied is not None
        return wr, facts
    raise errors.DiskError(
        f"{cfg.path}: durability.dir {d.path}: no usable checkpoint "
        f"({'; '.join(s['file'] + ': ' + s['reason'] for s in skipped) or 'none'}) and the log does not reach back "
        "to its first record; nothing was loaded. Move the directory aside to start empty",
        path=str(d.path))
