"""Referential batch mode on a secondary ([0156]): OP_BATCH.

``begin`` stops applying the primary's stream: the controller refuses
OP_APPLY with ``{"batch": true}``, its agent then keeps what arrives in a
backlog file (and the log history) without applying it, tells the primary
(SUSPEND) and acknowledges on receipt, so clients attached here read one
frozen, consistent state — the last whole transaction applied — for as long
as the batch lasts. With ``at`` it first rewinds to that earlier point with
its B logs (appliance.recovery.restore.plan over its history): every record
changed since is put back as it was, in the chain its key belongs to
(apl_leaf_of), one published version, so reads see the past on a live
in-memory copy. ``end`` takes the rewind back (the records as they were at
``begin``), and lets OP_APPLY through again: the agent catches up from its
backlog, then tells the primary it is back (RESUME). Batch mode lives in
the controller's memory: a controller restart ends it (the agent then
catches up); one during a rewind leaves a marker file (``batch-rewound`` in
the history directory) so the restarted controller asks for a block copy
instead of applying the stream onto an earlier state.

The rewind and its undo are changes of this secondary alone: they are
applied like its primary's entries (apl_apply_entries, kinds INSERT /
UPDATE / DELETE into the chains of the block numbers the keys belong to,
counts by kind), never logged and never sent anywhere, and they leave the
applied primary serial alone, so the stream resumes exactly after it.

Shared: nothing outside the loop thread, except the rewind's plan, read in
a worker thread (:mod:`.history`) while OP_APPLY is refused, so the state it
reads does not change under it.
"""
from __future__ import annotations

import time

from .. import errors
from .._native import lib
from ..recovery.restore import Planner, Target
from ..store.changelog import ENTRY, FIELDS
from ..wire import messages as m
from .ops import handler

__all__ = ["BatchMode"]

_F = {name: i for i, name in enumerate(FIELDS)}


class BatchMode:
    def __init__(self, ctl) -> None:
        self.ctl = ctl
        self.log = ctl.log
        self.active = False            # OP_APPLY is refused: reads see one frozen state
        self.since: float | None = None
        self.frozen_serial = 0         # the primary serial applied when the batch began
        self.at: dict | None = None    # the rewind's target and what it did
        self.saved: dict = {}          # (file, key) -> image at begin, for records the rewind changed
        self.ended: float | None = None
        self.catch_up_from = 0         # applied serial when the batch ended
        marker = self._marker()
        if marker is not None and marker.exists():
            # a rewind was never taken back (the controller stopped during a batch --at): these
            # blocks hold an earlier state than the applied serial says; only a block copy mends that
            ctl.applier.needs_copy = "batch mode's rewind was not taken back before the controller stopped"
            self.log.error("batch_rewind_left_behind", marker=str(marker), action="asking the primary for a block copy")
            marker.unlink()

    def _marker(self):
        """A file that exists while the blocks are rewound (batch begin --at until end)."""
        rc = self.ctl.cfg.replication
        if rc is None or rc.history_dir is None or rc.role != "secondary":
            return None
        return self.ctl.cfg.resolve(rc.history_dir) / "batch-rewound"

    # ------------------------------------------------------------------ begin / end

    def begin(self, sess, at):
        ctl = self.ctl
        if self.active:
            raise errors.BusyError(f"batch begin: {ctl.cfg.name!r} is in batch mode since "
                                   f"{time.ctime(self.since)} (frozen at serial {self.frozen_serial})")
        if ctl.att.compressed:
            raise errors.NotServingReadsError(
                f"batch begin: {ctl.cfg.name!r} keeps lz4 backup blocks and serves no reads "
                "(replication.serve_reads = false): a batch has nothing to read here")
        rc = ctl.cfg.replication
        if rc is None or rc.history_dir is None:
            raise errors.HistoryError(
                f"batch begin: {ctl.cfg.name!r} keeps no log history (replication.history_dir in "
                f"{ctl.cfg.path}): batch mode keeps what arrives meanwhile there")
        if ctl.applier.copied is not None or ctl.applier.needs_copy is not None:
            raise errors.BusyError(f"batch begin: {ctl.cfg.name!r} is being copied from its primary; "
                                   "try again once the copy is done")
        target = None
        if at is not None:
            target = Target(serial=at) if type(at) is int else Target.from_wire(at)
            if ctl.durable is not None:
                raise errors.RoleError(
                    f"batch begin --at: {ctl.cfg.name!r} keeps its data on disk too ([durability]): the rewind "
                    "changes its blocks without a log record, so a checkpoint meanwhile would hold the past; "
                    "use batch begin without --at here, or --at on a secondary without [durability]")
        self.active, self.since, self.ended = True, time.time(), None
        self.frozen_serial = ctl.agents.applied_serial()[0]
        self.at, self.saved = None, {}
        self.log.warning("batch_mode_started", frozen_serial=self.frozen_serial,
                         at=target.wire() if target else None)
        if target is not None:
            try:
                yield from self._rewind(sess, target)
            except BaseException:
                self.active = False
                self.log.warning("batch_mode_ended", reason="the rewind was refused")
                raise
        return self.status()

    def end(self) -> dict:
        ctl = self.ctl
        if not self.active:
            raise errors.TransactionStateError(f"batch end: {ctl.cfg.name!r} is not in batch mode")
        if self.saved:
            self._apply(self.saved)          # the records as they were at begin
            undone = len(self.saved)
            self.saved = {}
            self._marker().unlink(missing_ok=True)
        else:
            undone = 0
        self.active = False
        self.ended = time.time()
        self.catch_up_from = ctl.agents.applied_serial()[0]
        self.log.warning("batch_mode_ended", frozen_serial=self.frozen_serial, rewind_undone=undone,
                         held_s=round(self.ended - self.since, 3))
        return self.status()

    def interrupted(self, why: str) -> None:
        """A block copy from the primary began: it replaces the blocks, so
        the batch's frozen state (and any rewind) is gone."""
        if not self.active:
            return
        self.active, self.saved, self.ended = False, {}, time.time()
        marker = self._marker()
        if marker is not None:
            marker.unlink(missing_ok=True)   # the copy brings the primary's blocks
        self.log.warning("batch_mode_ended", frozen_serial=self.frozen_serial, reason=why)

    # ------------------------------------------------------------------ rewind

    def _rewind(self, sess, target: Target):
        ctl = self.ctl
        hist = ctl.history
        applied = self.frozen_serial
        if target.serial is not None and target.serial > applied:
            raise errors.WrongTypeError(f"batch begin --at {target.serial}: this secondary has applied "
                                        f"serial {applied}; it can rewind only to before that")
        version = ctl.att.sb.sb_version

        def plan():
            pl = Planner(target, files=None, upto=applied, where=hist.where())
            for blob in hist.blobs(hist.since_for(target)):
                if not pl.feed(blob):
                    break
            p = pl.finish()
            cur = hist._current(version)
            now = {k: cur(*k) for k in p.records}
            return p, now
        t0 = time.monotonic()
        p, now = yield from hist._work(sess, plan)
        target_images = {k: img for k, img in p.records.items() if now[k] != img}
        saved = {k: now[k] for k in target_images}
        marker = self._marker()
        if target_images:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"rewound to serial {p.to_serial} from {applied}\n")
        self._apply(target_images)
        self.saved = saved
        self.at = {"target": target.wire(), "to_serial": p.to_serial, "records": len(target_images),
                   "entries": p.entries, "transactions": p.transactions,
                   "seconds": round(time.monotonic() - t0, 4)}
        self.log.warning("batch_mode_rewound", **self.at)

    def _apply(self, images: dict) -> None:
        """Put `images` ((file, key) -> image, None: absent) in place as one
        published version, without logging them or moving the applied serial."""
        ctl = self.ctl
        version = ctl.att.sb.sb_version
        view = ctl.reader.view
        reader = ctl.reader
        blob = bytearray()
        serial = 0

        def entry(kind, file=0, block=0, key=b"", a=b""):
            nonlocal serial
            serial += 1
            f = [0] * len(FIELDS)
            n = ENTRY.size + len(key) + len(a)
            ln = (n + 7) & ~7
            f[_F["ce_len"]], f[_F["ce_kind"]], f[_F["ce_file"]], f[_F["ce_block"]] = ln, kind, file, block
            f[_F["ce_serial"]], f[_F["ce_klen"]], f[_F["ce_alen"]] = serial, len(key), len(a)
            blob.extend(ENTRY.pack(*f))
            blob.extend(key)
            blob.extend(a)
            blob.extend(b"\0" * (ln - n))

        entry(lib.APL_CE_BEGIN)
        for (file, key), img in images.items():
            block = lib.apl_leaf_of(view, file, key, len(key), version)
            if block < 0:
                raise errors.error_for("APL_ECORRUPT", f"batch: no leaf for a key of file {file} ({block})")
            present = reader.get_raw(file, key, version) is not None
            if img is None:
                if present:
                    entry(lib.APL_CE_DELETE, file, block, key)
            else:
                entry(lib.APL_CE_UPDATE if present else lib.APL_CE_INSERT, file, block, key, img)
        entry(lib.APL_CE_COMMIT)
        wr = ctl.writer
        wr.begin()
        try:
            wr.apply_entries(bytes(blob), 0, None)
        except errors.ApplianceError:
            wr.abort()        # nothing of it is published
            raise
        wr.publish(time.time_ns(), 0)
        ctl.published()
        wr.reclaim()

    # ------------------------------------------------------------------ what the rest asks

    def refuses_apply(self) -> bool:
        return self.active

    def status(self) -> dict:
        applied = self.ctl.agents.applied_serial()[0]
        agent = (self.ctl.agents.state or {}).get("batch") or {}
        # after end, until the agent has applied its backlog (it reports one while it has it)
        state = "suspended" if self.active else ("catching_up" if agent else None)
        out = {"state": state, "since": self.since, "frozen_serial": self.frozen_serial if self.active else None,
               "at": self.at if self.active else None, "applied_serial": applied}
        if agent:
            out.update({k: agent.get(k) for k in ("received", "backlog_bytes", "backlog_transactions",
                                                   "catch_up_rate_bytes_s", "eta_s", "suspended_told")})
        if self.ended and not self.active:
            out["ended"] = self.ended
        return out


@handler(m.OP_BATCH, roles=("secondary",))
def batch(ctl, sess, action, at=None):
    if action == "begin":
        return (yield from ctl.batch.begin(sess, at))
    if action == "end":
        return ctl.batch.end()
    if action == "status":
        return ctl.batch.status()
    raise errors.WrongTypeError(f"batch: action must be 'begin', 'end' or 'status', not {action!r}")
