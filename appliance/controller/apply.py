"""A secondary's controller applying its primary's stream: the agent's
OP_APPLY (whole transactions of the primary's change-log entries) and
OP_COPY (a block copy: begin, blocks, end; [0079], [0127]).

The controller stays the only writer of its segments: the agent hands it
the entries, and each OP_APPLY is one batch — applied, then published as one
version, so readers of a serving secondary never see part of a transaction.
A batch that fails part-way is rolled back in-process, never published
(Writer.abort: the start-up recovery over the same memory, sound while
readers read; see apl_batch_abort), reads go on at the last published
version, and the secondary refuses the stream until a block copy begins
(``needs_copy``): the agent asks its primary for one. While a copy runs,
``copied`` marks the block numbers it has brought, so the entries that follow
skip blocks the copy will carry. With [durability] each published batch
is also one log record (what it applied, or the copy's step:
:mod:`.durable`), and the agent gets its answer — and acknowledges — once
that record is on disk (``log_sync = "commit"``). In batch mode
(:mod:`.batch`) OP_APPLY is refused with ``{"batch": true}``: the agent
keeps the stream and catches up once the batch ends. Everything runs on the
loop thread.
"""
from __future__ import annotations

import os
import time

from .. import errors
from ..durability import records as rec
from ..store import changelog
from ..wire import messages as m
from .ops import handler

__all__ = ["SecondaryApply"]


class SecondaryApply:
    def __init__(self, ctl) -> None:
        self.ctl = ctl
        self.log = ctl.log
        self.copied: bytearray | None = None   # blocks copied so far while a copy runs
        self.needs_copy: str | None = None     # why the primary's stream was refused
        self.partial = False                   # the copy running brings some blocks only (recovery.py)
        self.last_consumed = 0
        self.seq = 0                           # the log record of the last batch (with [durability])

    def apply(self, source, after, blob) -> dict:
        """Apply whole transactions of the primary's entries."""
        if type(source) is not int or type(after) is not int or not isinstance(blob, bytes):
            raise errors.WrongTypeError("apply: expects (source instance, after serial, entries)")
        applied, have = self.ctl.agents.applied_serial()
        if self.needs_copy is not None:
            raise errors.ProtocolError(f"apply: this secondary refused its primary's stream earlier "
                                       f"({self.needs_copy}) and waits for a block copy", need_copy=True)
        if have and source != have and self.copied is None:
            raise errors.ProtocolError(f"apply: these changes come from primary instance {source}, "
                                       f"this secondary follows {have}: copy first", need_copy=True)
        if self.ctl.batch.refuses_apply():
            # batch mode: reads see one frozen state; the agent keeps what arrives and catches up later
            return {"applied": applied, "consumed": 0, "batch": True}
        first = changelog.first_serial(blob)
        if first is not None and first > applied + 1:
            raise errors.ProtocolError(f"apply: gap: serial {first} follows {applied}",
                                       gap=True, expected=applied + 1)
        self.batch(lambda wr: wr.apply_entries(blob, applied, self.copied), source,
                   lambda consumed, last: (rec.KIND_APPLIED, blob[:consumed], first or 0, last) if consumed else None)
        return {"applied": self.ctl.agents.applied_serial()[0], "consumed": self.last_consumed}

    def batch(self, fn, source: int, record=None) -> None:
        """Run `fn(writer)` in one batch and publish it; fn returns (bytes
        consumed, last serial, last COMMIT serial). `record(consumed, last)`:
        the log record of the batch, (kind, payload, first, last) or None."""
        wr = self.ctl.writer
        wr.begin()
        try:
            consumed, last, _ = fn(wr)
            self.last_consumed = consumed
            if consumed:
                wr.set_source(last, source)
        except errors.ApplianceError as e:
            self._refuse(e)
        wr.publish(time.time_ns(), 0)
        durable = self.ctl.durable
        if durable is not None and record is not None:
            r = record(consumed, last)
            if r is not None:
                kind, payload, first, last = r
                self.seq = durable.applied(kind, payload, first=first, last=last, source=source)
        self.ctl.published()
        wr.reclaim()

    def _refuse(self, e: errors.ApplianceError):
        """The primary's changes failed to apply part-way: roll the batch back
        (see the module docstring) and raise the refusal for the agent, which
        asks its primary for a block copy."""
        try:
            facts = self.ctl.writer.abort()
        except errors.ApplianceError:
            self.log.critical("apply_rollback_failed_exiting", error=str(e), exc_info=True)
            os._exit(errors.EXIT_SOFTWARE)  # the restarted controller rolls the unpublished batch back
        applied = self.ctl.agents.applied_serial()[0]
        self.copied = None
        self.needs_copy = f"{e.code}: {e.message}"
        self.log.error("apply_refused", error=e.message, code=e.code, rolled_back=facts["rolled_back"],
                       applied=applied)
        raise errors.error_for(e.code, f"apply refused ({e.message}): nothing of it was applied, serial "
                                       f"{applied} stays the last applied; this secondary needs a block copy",
                               need_copy=True, applied=applied)

    def copy(self, phase, source, payload) -> dict:
        """A block copy from the primary ([0079], [0127]): begin, blocks, end."""
        if type(source) is not int:
            raise errors.WrongTypeError("copy: the source instance must be an int")
        sb = self.ctl.att.sb
        if phase == "begin":
            limit = payload.get("limit") if isinstance(payload, dict) else None
            if type(limit) is not int or not 0 <= limit <= sb.sb_max_blocks:
                raise errors.WrongTypeError("copy begin: needs the primary's block limit")
            serial = payload.get("serial")
            if type(serial) is not int:
                raise errors.WrongTypeError("copy begin: needs the stream serial it starts at")
            self.ctl.batch.interrupted("a block copy from the primary began")
            blocks = payload.get("blocks")
            if blocks is not None:    # a copy of these numbers only (a rewind, a repair: recovery.py)
                self.copied = partial_copy(blocks, sb.sb_max_blocks)
                self.partial = True
                applied, _ = self.ctl.agents.applied_serial()
                # (with [durability] a log record of its own, so a cold start replays the copy as it ran)
                self.batch(lambda wr: (0, 0, 0), source, lambda c, last: (
                    rec.KIND_COPY_BEGIN, rec.pack({"limit": limit, "serial": serial, "blocks": blocks}),
                    applied, applied))
                self.log.info("copy_started", source=source, blocks=len(blocks), serial=serial, partial=True)
                return {"copied": 0}
            self.copied = bytearray((sb.sb_max_blocks + 7) // 8)
            self.partial = False
            self.needs_copy = None
            # the stream continues after `serial`: record it, so entries that follow are not a gap
            self.batch(lambda wr: (1, serial, serial), source,
                       lambda c, last: (rec.KIND_COPY_BEGIN, rec.pack({"limit": limit, "serial": serial}),
                                        serial, serial))
            self.log.info("copy_started", source=source, blocks=limit, serial=serial)
            return {"copied": 0}
        if self.copied is None:
            raise errors.ProtocolError("copy: no copy in progress", need_copy=True)
        if phase == "blocks":
            if not isinstance(payload, bytes):
                raise errors.WrongTypeError("copy blocks: expects block images (apl_block_images format)")
            copied = self.copied

            def run(wr):
                wr.apply_images(payload, copied)
                return 0, 0, 0
            applied, _ = self.ctl.agents.applied_serial()
            self.batch(run, source, lambda c, last: (rec.KIND_COPY_BLOCKS, payload, 0, 0))
            return {"applied": applied}
        if phase == "end":
            serial = payload.get("serial") if isinstance(payload, dict) else None
            if type(serial) is not int:
                raise errors.WrongTypeError("copy end: needs the stream serial")
            copied, partial = self.copied, self.partial
            applied, _ = self.ctl.agents.applied_serial()

            def finish(wr):
                wr.drop_uncopied(copied)   # numbers in use here that the primary does not have
                # a whole copy ends at `serial`; a copy of some blocks leaves the stream where it is
                return (0, 0, 0) if partial else (1, serial, serial)
            self.copied = None
            self.partial = False
            self.batch(finish, source, lambda c, last: (
                rec.KIND_COPY_END, rec.pack({"serial": serial, "partial": partial}),
                *((applied, applied) if partial else (serial, serial))))
            self.ctl.failover.repair_done()
            self.log.info("copy_finished", source=source, serial=serial, partial=partial)
            return {"applied": self.ctl.agents.applied_serial()[0]}
        raise errors.ProtocolError(f"copy: unknown phase {phase!r}")

    def status(self) -> dict:
        applied, source = self.ctl.agents.applied_serial()
        return {"applied_serial": applied, "source_instance": source, "copying": self.copied is not None,
                "needs_copy": self.needs_copy, "batch": self.ctl.batch.status()}


def partial_copy(blocks, max_blocks: int) -> bytearray:
    """The `copied` bitmap of a copy of `blocks` only: every other number is
    "copied" already (its changes apply as they come), these are not until
    their images arrive (their changes until then are dropped: the images
    carry them). It starts where the stream is; the applied serial stays."""
    if type(blocks) is not list or not all(type(n) is int and 0 <= n < max_blocks for n in blocks):
        raise errors.WrongTypeError("copy begin: blocks must be a list of block numbers")
    copied = bytearray(b"\xff" * ((max_blocks + 7) // 8))
    for n in blocks:
        copied[n >> 3] &= ~(1 << (n & 7)) & 0xFF
    return copied


@handler(m.OP_APPLY, roles=("secondary",))
def apply(ctl, sess, source, after, entries):
    result = ctl.applier.apply(source, after, entries)
    if ctl.durable is not None:
        yield from ctl.durable.wait_seq(sess, ctl.applier.seq)   # "backup complete" once it is on disk
    return result


@handler(m.OP_COPY, roles=("secondary",))
def copy(ctl, sess, phase, source, payload):
    result = ctl.applier.copy(phase, source, payload)
    if ctl.durable is not None:
        yield from ctl.durable.wait_seq(sess, ctl.applier.seq)
    return result
