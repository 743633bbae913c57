"""The storage devices: the device segments (/apl.<name>.dev<i>) data is
spread over ([0061], [0125]), as the controller reports them.
"""
from __future__ import annotations

__all__ = ["device_status"]


def device_status(ctl, stats: dict) -> list[dict]:
    """One entry per device segment: its name, size, block slots used and free."""
    sb = ctl.att.sb
    size = ctl.cfg.storage.segment_size
    per_seg = sb.sb_segment_slots
    return [{"index": i, "name": d.name, "size": size, "slots": per_seg,
             "used": per_seg - stats["segment_free"][i], "free": stats["segment_free"][i]}
            for i, d in enumerate(ctl.att.devices)]
