"""The storage devices: the device segments (/apl.<name>.dev<i>) data is
spread over ([0061], [0125]), as the controller reports them: in status
(slots per segment), and in OP_DEVICES (``appliance device list``), which
also walks every block number to say how many blocks have a part on each
device and how many of those no longer match their checksum (a slice of
numbers per loop turn, as the check of repair.py does).
"""
from __future__ import annotations

from ..wire import messages as m
from .ops import handler

__all__ = ["device_status", "device_list"]


def device_status(ctl, stats: dict) -> list[dict]:
    """One entry per device segment: its name, size, block slots used and free."""
    sb = ctl.att.sb
    size = ctl.cfg.storage.segment_size
    per_seg = sb.sb_segment_slots
    return [{"index": i, "name": d.name, "size": size, "slots": per_seg,
             "used": per_seg - stats["segment_free"][i], "free": stats["segment_free"][i]}
            for i, d in enumerate(ctl.att.devices)]


def device_list(ctl):
    """device_status, and per device: blocks (numbers with a part on it),
    damaged (of those, not matching their checksum), bytes in use, state."""
    every, _ = yield from ctl.repairs.scan(False)
    out = device_status(ctl, ctl.writer.stats())
    unit = ctl.att.sb.sb_page_size if ctl.att.compressed else ctl.att.sb.sb_block_size
    for d in out:
        bit = 1 << d["index"]
        on = [b for b in every if b["devices"] & bit]
        d.update(state="in service", blocks=len(on), damaged=sum(1 for b in on if b["damaged"]),
                 bytes=d["used"] * unit)
    return out


@handler(m.OP_DEVICES)
def devices(ctl, sess):
    return (yield from device_list(ctl))
