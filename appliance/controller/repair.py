"""Damaged blocks ([0123], partial recovery): the local check and the repair.

**Check** (OP_CHECK, any role): every block number's checksum is kept at
each publish (cext/apl_sums.c); this recomputes them over the current
version and names those that no longer match — bytes changed in a segment
without the controller. It runs on the loop thread between batches, a slice
of numbers per turn (``YIELD``), so clients are served meanwhile; a block
that changes between two slices is checked at its new version, which its
checksum describes.

**Repair** (OP_REPAIR): only the blocks asked for — the damaged ones by
default, or numbers, a table (its file and its alternate-key indexes), or
a device (every number with a block on that segment) — are copied again from
a peer at a consistent version, while the appliance keeps running:

- on a secondary, from its primary: the agent asks for them (REPAIR on the
  link) and the primary copies those numbers only, from where the stream is
  (the copy the rewind uses, see :mod:`.recovery` and apply.py); until it
  ends ``sb_repair_pending`` is set.
- on a primary, from a secondary: commits wait (integrity first, [0125])
  until a secondary has acknowledged everything published, so its images
  are those of this appliance's published version; the agent fetches them
  (FETCH, BLOCKS on the link), they are laid in as one batch, and commits go
  on. The wait is the secondary's lag plus one round trip for the images.

Shared: nothing beyond what the store and the agent parts own; everything
here runs on the loop thread.
"""
from __future__ import annotations

import time

from .. import errors
from ..wire import messages as m
from .loop import WAIT_AGENT, YIELD
from .ops import handler

__all__ = ["Repairs"]

#: numbers checked per loop turn
CHECK_SLICE = 8192
#: seconds a primary's repair waits for a secondary to catch up, by default
REPAIR_TIMEOUT = 30.0


class Repairs:
    def __init__(self, ctl) -> None:
        self.ctl = ctl
        self.log = ctl.log
        self.last: dict | None = None     # the last repair's report (status)
        self.paused = 0                   # repairs holding commits back

    # ------------------------------------------------------------------ facts

    def blocks(self, *, damaged_only: bool, start: int = 0, limit: int | None = None):
        """(block infos, next number) of one slice: see apl_check_blocks."""
        lim = self.ctl.reader.block_limit() if limit is None else limit
        return self.ctl.writer.check_blocks(start, lim, damaged_only, CHECK_SLICE)

    def scan(self, damaged_only: bool):
        """Every number in use (or only the damaged ones), a slice per loop
        turn (a generator: it yields YIELD between slices)."""
        out, start, checked = [], 0, 0
        while True:
            limit = self.ctl.reader.block_limit()
            if start >= limit:
                return out, checked
            infos, nxt = self.ctl.writer.check_blocks(start, min(limit, start + CHECK_SLICE), damaged_only,
                                                      CHECK_SLICE)
            out.extend(infos)
            checked += nxt - start
            start = nxt
            yield YIELD

    def describe(self, infos: list[dict]) -> list[dict]:
        files = {i: name for i, (name, _t, _f) in enumerate(self.ctl.cfg.files())}
        return [{"block": b["number"], "file": files.get(b["file"]), "devices": b["devices"]} for b in infos]

    def status(self) -> dict:
        return {"last": self.last, "commits_held": self.paused > 0}

    # ------------------------------------------------------------------ check

    def check(self):
        t0 = time.monotonic()
        damaged, checked = yield from self.scan(True)
        sb = self.ctl.att.sb
        rep = {"checked": checked, "damaged": self.describe(damaged), "version": sb.sb_version,
               "seconds": round(time.monotonic() - t0, 3)}
        if damaged:
            self.log.error("blocks_damaged", count=len(damaged), blocks=[b["number"] for b in damaged][:50])
        return rep

    # ------------------------------------------------------------------ repair

    def select(self, opts: dict):
        """The block numbers a repair is about (a generator: the default scans)."""
        ctl = self.ctl
        which = [k for k in ("blocks", "table", "device") if opts.get(k) is not None]
        if len(which) > 1:
            raise errors.WrongTypeError("repair: give at most one of blocks, table, device")
        limit = ctl.reader.block_limit()
        if not which:
            damaged, _ = yield from self.scan(True)
            return [b["number"] for b in damaged]
        if which == ["blocks"]:
            nums = opts["blocks"]
            if type(nums) is not list or not nums or not all(type(n) is int and 0 <= n < limit for n in nums):
                raise errors.WrongTypeError(f"repair: blocks must be block numbers below {limit} (the highest in "
                                            "use + 1)")
            return sorted(set(nums))
        every, _ = yield from self.scan(False)
        if which == ["table"]:
            t = opts["table"]
            if t not in ctl.schema.tables:
                raise errors.NoSuchTableError(f"repair: no table {t!r} in {ctl.cfg.name!r}", table=str(t))
            ids = {i for i, (_n, table, _f) in enumerate(ctl.cfg.files()) if table == t}
            return [b["number"] for b in every if b["file"] in ids]
        dev = opts["device"]
        if type(dev) is not int or not 0 <= dev < ctl.att.sb.sb_nsegments:
            raise errors.WrongTypeError(f"repair: device must be 0..{ctl.att.sb.sb_nsegments - 1}")
        return [b["number"] for b in every if b["devices"] >> dev & 1]

    def repair(self, sess, options):
        ctl = self.ctl
        opts = options if isinstance(options, dict) else None
        if opts is None or not set(opts) <= {"blocks", "table", "device", "dry_run", "timeout"}:
            raise errors.WrongTypeError("repair: options must be a map of blocks, table, device, dry_run, timeout")
        timeout = opts.get("timeout", REPAIR_TIMEOUT)
        if type(timeout) not in (int, float) or not 0 < timeout <= 3600:
            raise errors.WrongTypeError("repair: timeout must be seconds (0..3600]")
        t0 = time.monotonic()
        nums = yield from self.select(opts)
        rep = {"blocks": nums, "dry_run": bool(opts.get("dry_run")), "role": ctl.role.name}
        if not nums or opts.get("dry_run"):
            return dict(rep, repaired=[], failed=[], seconds=round(time.monotonic() - t0, 3))
        if ctl.role.is_secondary:
            yield from self._from_primary(sess, nums, timeout)
            rep["source"] = " or ".join(ctl.cfg.replication.primaries)
        elif ctl.role.is_primary:
            rep.update((yield from self._from_secondary(sess, nums, timeout)))
        else:
            raise errors.RoleError(f"repair: appliance {ctl.cfg.name!r} is {ctl.role.name}: it has no peer to "
                                   "copy blocks from", role=ctl.role.name)
        still = {n for n in nums if ctl.writer.check_blocks(n, n + 1, True, 1)[0]}
        rep["failed"] = sorted(still | set(rep.get("failed", ())))
        rep["repaired"] = [n for n in nums if n not in set(rep["failed"])]
        rep["seconds"] = round(time.monotonic() - t0, 3)
        self.last = dict(rep, blocks=len(nums), at=time.time())
        self.log.warning("blocks_repaired", count=len(rep["repaired"]), failed=rep["failed"][:50],
                         source=rep.get("source"), seconds=rep["seconds"])
        return rep

    def _from_primary(self, sess, nums: list[int], timeout: float):
        ctl = self.ctl
        fo = ctl.failover
        fo.repair = sorted(set(fo.repair) | set(nums))
        ctl.att.sb.sb_repair_pending = 1
        if ctl.agents.attached():
            answer = yield from fo.ask_agent(sess, {"kind": "repair", "blocks": fo.repair}, 10.0)
            if not answer or not answer.get("sent"):
                self.log.warning("repair_waits_for_primary", blocks=len(nums))
        deadline = time.monotonic() + timeout
        while fo.repair:
            if time.monotonic() > deadline:
                raise errors.UnavailableError(
                    f"repair: the primary did not copy {len(fo.repair)} block(s) within {timeout:g} s (is the link "
                    "up?); they stay asked for and are copied when it is", pending=len(fo.repair))
            yield from _sleep(ctl, sess, 0.02)

    def _from_secondary(self, sess, nums: list[int], timeout: float):
        ctl = self.ctl
        sync = ctl.sync
        st = sync.status()["secondaries"]
        ready = [n for n, x in st.items() if x["connected"] and x["state"] == "streaming"]
        if not ready or not ctl.agents.attached():
            raise errors.UnavailableError(f"repair: no secondary of {ctl.cfg.name!r} is streaming: there is no "
                                          "copy to repair from", secondaries=", ".join(st) or "none")
        ready.sort(key=lambda n: (st[n]["mode"] != "sync", -st[n]["acked_serial"]))
        self.paused += 1
        ctl.commits.paused = True
        try:
            serial = ctl.agents.published_serial()
            deadline = time.monotonic() + timeout
            while True:          # commits wait: a secondary at our published serial holds our blocks
                name = next((n for n in ready if sync.acked[n] >= serial), None)
                if name is not None:
                    break
                if time.monotonic() > deadline:
                    raise errors.UnavailableError(f"repair: no secondary caught up with serial {serial} within "
                                                  f"{timeout:g} s; nothing was changed", serial=serial)
                yield from _sleep(ctl, sess, 0.005)
            answer = yield from ctl.failover.ask_agent(
                sess, {"kind": "fetch", "secondary": name, "blocks": nums}, timeout)
            if not answer or not isinstance(answer.get("images"), bytes):
                why = (answer or {}).get("error", "no answer")
                raise errors.UnavailableError(f"repair: {name!r} did not send the blocks ({why}); nothing was "
                                              "changed", secondary=name)
            if answer.get("serial") != serial:
                raise errors.UnavailableError(f"repair: {name!r} sent its blocks at serial {answer.get('serial')}, "
                                              f"not {serial}; nothing was changed", secondary=name)
            failed = self._lay(answer["images"], nums)
        finally:
            self.paused -= 1
            ctl.commits.paused = self.paused > 0
        return {"source": name, "serial": serial, "failed": failed}

    def _lay(self, blob: bytes, nums: list[int]) -> list[int]:
        """Lay a peer's images (apl_block_images format) into the store as
        one published batch; the numbers it had no image of are returned."""
        import struct
        hdr = struct.Struct("<II")
        images, pos = {}, 0
        while pos + hdr.size <= len(blob):
            n, ln = hdr.unpack_from(blob, pos)
            images[n] = blob[pos + hdr.size: pos + hdr.size + ln]
            pos += hdr.size + ln
        wr = self.ctl.writer
        wr.begin()
        try:
            for n in nums:
                if images.get(n):
                    wr.apply_image(n, images[n])
        except errors.ApplianceError:
            wr.abort()
            raise
        wr.publish(time.time_ns(), 0)
        self.ctl.published()
        return [n for n in nums if not images.get(n)]


def _sleep(ctl, sess, seconds: float):
    """Let the loop run for `seconds` (a request's generator waits)."""
    timer = ctl.add_timer(seconds, lambda: ctl.resume(sess))
    try:
        yield WAIT_AGENT
    finally:
        ctl.cancel_timer(timer)


# ---------------------------------------------------------------------- requests

@handler(m.OP_CHECK)
def check(ctl, sess):
    return (yield from ctl.repairs.check())


@handler(m.OP_REPAIR)
def repair(ctl, sess, options):
    return (yield from ctl.repairs.repair(sess, options))


@handler(m.OP_IMAGES, roles=("secondary",))
def images(ctl, sess, blocks):
    """The images of `blocks` at the applied serial (a primary repairs from them)."""
    if type(blocks) is not list or not all(type(n) is int and n >= 0 for n in blocks):
        raise errors.WrongTypeError("images: expects a list of block numbers")
    pin = ctl.reader.pin()
    try:
        blob, _ = ctl.reader.images_of(blocks, 0, pin.version, 1 << 62)
        return {"serial": ctl.agents.applied_serial()[0], "images": blob}
    finally:
        pin.close()
