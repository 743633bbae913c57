"""Open the appliance's segments, or create them: what a controller does first.

Shared memory outlives the controller: a restarted controller re-attaches to
the segments its predecessor left and recovers (rolls back the batch a crash
interrupted, rebuilds free lists), so it serves again within a second. It
refuses segments made for another layout rather than reinterpret them.
"""
from __future__ import annotations

from .. import errors
from .._native import lib
from ..config import Config
from ..store.segment import Attachment, Geometry, SegmentNames, exists, unlink_all
from ..store.writer import FileSpec, Writer

__all__ = ["open_or_create", "geometry"]


def geometry(cfg: Config) -> Geometry:
    s = cfg.storage
    compressed = cfg.compressed
    max_blocks = s.max_blocks or (s.segments * s.segment_size // s.block_size * 4 if compressed else 0)
    return Geometry(block_size=s.block_size, nsegments=s.segments, segment_size=s.segment_size,
                    nfiles=len(cfg.files()), max_overflow=s.max_overflow, nreaders=s.max_readers,
                    log_size=s.log_size, compressed=compressed, max_blocks=max_blocks)


def _file_specs(cfg: Config) -> list[FileSpec]:
    ids = {name: i for i, (name, _t, _f) in enumerate(cfg.files())}
    out = []
    for name, table, field in cfg.files():
        if field is None:
            out.append(FileSpec(name, lib.APL_FILE_PRIMARY, ids[name]))
        else:
            out.append(FileSpec(name, lib.APL_FILE_ALTKEY, ids[table]))
    return out


def open_or_create(cfg: Config, log) -> tuple[Writer, dict, bool]:
    """(writer, recovery facts, created)."""
    s = cfg.storage
    names = SegmentNames(cfg.name, s.segments)
    reserve = cfg.controller.reserve_blocks
    if exists(names.meta):
        att = Attachment(cfg.name, writable=True)
        sb = att.sb
        mismatch = []
        if sb.sb_schema_hash != cfg.schema_hash():
            mismatch.append("tables or storage settings")
        if sb.sb_block_size != s.block_size or sb.sb_nsegments != s.segments:
            mismatch.append("block_size/segments")
        if sb.sb_version == 0:
            # a create that never finished: nothing was ever committed
            att.close()
            unlink_all(cfg.name, s.segments)
            log.warning("segments_incomplete_recreated", appliance=cfg.name)
        elif mismatch:
            att.close()
            raise errors.FormatError(
                f"{cfg.path}: appliance {cfg.name!r} already exists in shared memory with a different "
                f"layout ({', '.join(mismatch)} changed). Restore the previous configuration, or delete "
                f"its data with `appliance destroy --config {cfg.path}`.", appliance=cfg.name)
        else:
            w = Writer(att, reserve)
            facts = w.recover()
            return w, facts, False
    else:
        leftovers = [n for n in names.all() if exists(n)]
        if leftovers:
            unlink_all(cfg.name, s.segments)
            log.warning("orphan_segments_removed", segments=leftovers)
    w = Writer.create(cfg.name, geometry(cfg), mode=s.mode_bits, gid=cfg.gid(),
                      schema_hash=cfg.schema_hash(), files=_file_specs(cfg), reserve_slots=reserve)
    return w, {}, True
