"""The storage devices: the device segments (/apl.<name>.dev<i>) data is
spread over ([0061], [0125]), as the controller reports them (status;
OP_DEVICES, ``appliance device list``), and taken out of service and
replaced ([0125], [0127], [0129]–[0132]).

**Detach** (OP_DEVICE_DETACH): the device gets no new blocks, and every
block number whose current blocks lie on it is unavailable: reads and
changes of it fail with DeviceUnavailableError naming the device; the rest
works as before (cext/apl_devices.c). On a secondary the primary's changes
to those numbers are set aside until the numbers are refilled (as during a
partial block copy: the copy brings them).

**Replace** (OP_DEVICE_REPLACE), in three phases, each in status
(``devices.replace``: phase, blocks, done, bytes, rate, seconds left):

1. *refill*: exactly the numbers that lived on the device are copied again
   from a peer at a consistent version. On a primary from a secondary (the
   images the repair fetches, repair.py), a slice at a time; by default
   commits wait for the whole refill (integrity first, [0125]); with
   ``online`` they wait only while one slice is fetched and laid in, so
   processing goes on and the numbers already refilled take changes as
   usual ([0127], [0130]). On a secondary from its primary (a partial block
   copy: the primary keeps running, its sync policy deciding whether its
   commits wait for this secondary meanwhile).
2. *renew*: once no pin can still read a version that lived on the old
   device (the slots come back through the retire queue), its memory is
   given back and it is in service again, empty.
3. *fill*: the refilled numbers are moved back onto it (copy-on-write with
   its slots taken first), a slice per batch, so it holds exactly its
   blocks again.

Shared: nothing beyond the store; everything here runs on the loop thread.
"""
from __future__ import annotations

import time

from .. import errors
from .._native import detached
from ..wire import messages as m
from .apply import partial_copy
from .loop import YIELD
from .ops import handler
from .repair import sleep

__all__ = ["Devices", "device_status", "device_list"]

#: block numbers fetched and laid in per slice of a refill (one message from the peer)
REFILL_SLICE = 512
#: the same, online: commits wait while one slice is fetched and laid in
ONLINE_SLICE = 256
#: online: after a slice, commits run undisturbed for this many times the slice's duration
ONLINE_GAP = 2.0
#: block numbers moved back onto the renewed device per batch
FILL_SLICE = 1024
#: seconds a replace waits, by default, for the peer and for old pins to pass
REPLACE_TIMEOUT = 120.0


class Devices:
    def __init__(self, ctl) -> None:
        self.ctl = ctl
        self.log = ctl.log
        self.replace_job: dict | None = None   # the replace running (status)
        self.last: dict | None = None          # the last replace's report

    def detached(self) -> list[int]:
        return detached(self.ctl.att.sb)

    def status(self) -> dict:
        job = self.replace_job
        if job is not None:
            job = dict(job)
            elapsed = time.monotonic() - job.pop("t0")
            rate = job["done"] / elapsed if elapsed > 0 else 0.0
            job["seconds"] = round(elapsed, 3)
            job["rate_blocks_s"] = round(rate, 1)
            job["bytes_s"] = round(job["bytes"] / elapsed, 1) if elapsed > 0 else 0.0
            left = job["blocks"] - job["done"]
            job["eta_s"] = round(left / rate, 1) if rate > 0 and job["phase"] == "refill" else None
        return {"detached": self.detached(), "replace": job, "last_replace": self.last}

    # ------------------------------------------------------------------ detach

    def _device(self, dev, what: str) -> int:
        ctl = self.ctl
        n = ctl.att.sb.sb_nsegments
        if type(dev) is not int or not 0 <= dev < n:
            raise errors.WrongTypeError(f"{what}: device must be a device segment number 0..{n - 1}", device=dev)
        if ctl.att.compressed:
            raise errors.RoleError(f"{what}: {ctl.cfg.name!r} keeps lz4 backup blocks; a device of it is "
                                   "rebuilt by a whole block copy (`appliance resync` on its primary)",
                                   role=ctl.role.name)
        return dev

    def detach(self, dev) -> dict:
        ctl = self.ctl
        dev = self._device(dev, "device detach")
        was = dev in self.detached()
        n = ctl.writer.detach_device(dev)
        if ctl.role.is_secondary and n:
            self._set_aside(dev)
        if not was:
            self.log.error("device_detached", device=dev, blocks=n, role=ctl.role.name)
        return {"device": dev, "blocks": n, "state": "detached"}

    def _set_aside(self, dev: int) -> None:
        """A secondary: its primary's changes to the numbers of `dev` are
        dropped until their images come (apply.py's `copied` bitmap)."""
        ap = self.ctl.applier
        nums = self._numbers(dev)
        if ap.copied is None:
            ap.copied = partial_copy(nums, self.ctl.att.sb.sb_max_blocks)
            ap.partial = True
        else:
            for n in nums:
                ap.copied[n >> 3] &= ~(1 << (n & 7)) & 0xFF
        self.ctl.att.sb.sb_repair_pending = 1

    def _numbers(self, dev: int) -> list[int]:
        """The numbers with a block on `dev` (between batches, one pass)."""
        return self.ctl.writer.device_numbers(dev)

    # ------------------------------------------------------------------ replace

    def replace(self, sess, dev, options):
        ctl = self.ctl
        dev = self._device(dev, "device replace")
        opts = options if isinstance(options, dict) else None
        if opts is None or not set(opts) <= {"online", "timeout"}:
            raise errors.WrongTypeError("device replace: options must be a map of online, timeout")
        online = bool(opts.get("online", False))
        timeout = opts.get("timeout", REPLACE_TIMEOUT)
        if type(timeout) not in (int, float) or not 0 < timeout <= 86400:
            raise errors.WrongTypeError("device replace: timeout must be seconds (0..86400]")
        if self.replace_job is not None:
            raise errors.BusyError(f"device replace: device {self.replace_job['device']} is being replaced")
        if not (ctl.role.is_primary or ctl.role.is_secondary):
            raise errors.RoleError(f"device replace: {ctl.cfg.name!r} is {ctl.role.name}: it has no peer to "
                                   "refill the device from", role=ctl.role.name)
        self.detach(dev)
        nums = self._numbers(dev)
        t0 = time.monotonic()
        job = self.replace_job = {"device": dev, "mode": "online" if online else "offline", "phase": "refill",
                                  "blocks": len(nums), "done": 0, "bytes": 0, "failed": 0, "t0": t0}
        self.log.warning("device_replace_started", device=dev, blocks=len(nums), mode=job["mode"],
                         role=ctl.role.name)
        rep = {"device": dev, "mode": job["mode"], "blocks": len(nums), "role": ctl.role.name}
        try:
            rep.update((yield from self._refill(sess, dev, nums, online, timeout)))
            refill_s = time.monotonic() - t0
            job["phase"] = "renew"
            yield from self._renew(sess, dev, timeout)
            job["phase"] = "fill"
            rep["moved"] = yield from self._fill(dev, nums)
        except BaseException as e:
            self.log.error("device_replace_failed", device=dev, phase=job["phase"], done=job["done"],
                           error=str(e))
            raise
        finally:
            self.replace_job = None
        rep["seconds"] = round(time.monotonic() - t0, 3)
        rep["refill_seconds"] = round(refill_s, 3)
        rep["bytes"] = job["bytes"]
        rep["rate_bytes_s"] = round(job["bytes"] / refill_s, 1) if refill_s > 0 and job["bytes"] else None
        self.last = dict(rep, at=time.time())
        self.log.warning("device_replaced", device=dev, blocks=len(nums), failed=rep["failed"],
                         moved=rep["moved"], seconds=rep["seconds"], mode=job["mode"])
        return rep

    def _refill(self, sess, dev: int, nums: list[int], online: bool, timeout: float):
        ctl, job = self.ctl, self.replace_job
        failed: list[int] = []
        spent = {"wait_s": 0.0, "fetch_s": 0.0, "lay_s": 0.0}
        if ctl.role.is_secondary:
            yield from ctl.repairs._from_primary(sess, nums, timeout)
            job["done"] = len(nums)        # (the bytes came with the primary's copy: not counted here)
            source = " or ".join(ctl.cfg.replication.primaries)
        else:
            source = None
            if not online:
                ctl.repairs.hold_commits()     # processing suspended for the whole refill
            step = ONLINE_SLICE if online else REFILL_SLICE
            try:
                for i in range(0, len(nums), step):
                    part = nums[i:i + step]
                    t0 = time.monotonic()
                    got = yield from ctl.repairs._from_secondary(sess, part, timeout)
                    failed += got["failed"]
                    source = got["source"]
                    job["done"] += len(part)
                    job["bytes"] += got["bytes"]
                    for k in ("wait_s", "fetch_s", "lay_s"):
                        spent[k] += got[k]
                    if online:     # commits run between slices: at most a third of the time is held
                        yield from sleep(ctl, sess, max(0.002, ONLINE_GAP * (time.monotonic() - t0)))
                    else:
                        yield YIELD
            finally:
                if not online:
                    ctl.repairs.release_commits()
        left = ctl.writer.device_marked(dev)
        return {"refilled": len(nums) - len(failed) - left, "failed": sorted(failed), "unrefilled": left,
                "source": source, **{k: round(v, 4) for k, v in spent.items()}}

    def _renew(self, sess, dev: int, timeout: float):
        """Wait until no pin reads a version on the old device, then renew it."""
        ctl = self.ctl
        deadline = time.monotonic() + timeout
        while True:
            ctl.writer.reclaim()
            if ctl.writer.device_marked(dev) == 0 and ctl.writer.renew_device(dev):
                self.log.info("device_renewed", device=dev)
                return
            if time.monotonic() > deadline:
                raise errors.BusyError(
                    f"device replace: device {dev} is refilled, but versions on it are still read (an open "
                    f"snapshot, or blocks not refilled) after {timeout:g} s; it stays detached — run the "
                    "replace again once they are done", device=dev)
            yield from sleep(ctl, sess, 0.02)

    def _fill(self, dev: int, nums: list[int]):
        ctl, wr = self.ctl, self.ctl.writer
        moved = 0
        for i in range(0, len(nums), FILL_SLICE):
            wr.begin()
            try:
                moved += wr.fill_device(dev, nums[i:i + FILL_SLICE])
            except errors.ApplianceError:
                wr.abort()
                raise
            wr.publish(time.time_ns(), 0)
            ctl.published()
            yield YIELD
        return moved


def device_status(ctl, stats: dict) -> list[dict]:
    """One entry per device segment: its name, size, block slots used and free, state."""
    sb = ctl.att.sb
    size = ctl.cfg.storage.segment_size
    per_seg = sb.sb_segment_slots
    off = set(detached(sb))
    job = ctl.devices.replace_job
    out = []
    for i, d in enumerate(ctl.att.devices):
        state = "in service"
        if job is not None and job["device"] == i:
            state = {"refill": "refilling", "renew": "renewing", "fill": "filling"}[job["phase"]]
        elif i in off:
            state = "detached"
        out.append({"index": i, "name": d.name, "size": size, "slots": per_seg,
                    "used": per_seg - stats["segment_free"][i], "free": stats["segment_free"][i],
                    "state": state})
    return out


def device_list(ctl):
    """device_status, and per device: blocks (numbers with a part on it),
    damaged (of those, not matching their checksum), unavailable (of those,
    not refilled since it was detached), bytes in use."""
    every, _ = yield from ctl.repairs.scan(False)
    out = device_status(ctl, ctl.writer.stats())
    unit = ctl.att.sb.sb_page_size if ctl.att.compressed else ctl.att.sb.sb_block_size
    off = set(detached(ctl.att.sb))
    for d in out:
        bit = 1 << d["index"]
        on = [b for b in every if b["devices"] & bit]
        d.update(blocks=len(on), damaged=sum(1 for b in on if b["damaged"]), bytes=d["used"] * unit,
                 unavailable=len(on) if d["index"] in off else 0)
    return out


@handler(m.OP_DEVICES)
def devices(ctl, sess):
    return (yield from device_list(ctl))


@handler(m.OP_DEVICE_DETACH)
def device_detach(ctl, sess, device):
    return ctl.devices.detach(device)


@handler(m.OP_DEVICE_REPLACE)
def device_replace(ctl, sess, device, options):
    return (yield from ctl.devices.replace(sess, device, options))
